"""DINOv3 ViTs (S/16, S+/16, B/16, L/16, H+/16, 7B/16) through timm, loaded exactly.

Formats (detected): Meta's official `.pth` (also inside a training checkpoint
`{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}`, heads dropped and logged), Hugging Face
`model.safetensors` or snapshot folder (`DINOv3ViTModel` names, q/k/v split), and timm state dicts.

Exactness, checked for every official or Hugging Face file:
- RoPE periods: the file's `rope_embed.periods` either equal what the model computes (to fp32
  rounding) or are copied into the model (option `rope_periods: file`, the default, as Meta's
  code does); with `rope_periods: computed` a file whose periods differ is refused. The load
  report records which.
- q/k/v biases: the official layer adds `bias * bias_mask`; the mask is folded into the q and v
  biases, and a file whose masked k bias is non-zero (a k bias in use, which DINOv3 masks and timm's
  model cannot hold) is refused, as is a mask with NaN (never initialised). q/v biases are refused
  by a model without them (the plain `_dinov3` names) unless they are all zero.
- sizes: a file of another width, depth or MLP kind is refused in one line naming the timm name
  that fits it (e.g. `--teacher.name vit_large_patch16_dinov3_qkvb`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from torch import nn

from sonodistill.errors import UserError
from sonodistill.models.families.base import RANDOM, EncoderSpec, refuse_size
from sonodistill.models.families.timm_vit import TimmViT
from sonodistill.models.specs import FAMILIES, WEIGHTS_ENV, WEIGHTS_HELP
from sonodistill.models.weights import (
    LoadReport,
    UnknownFormatError,
    WeightsMismatchError,
    load_strict,
    mismatches,
)
from sonodistill.models.weights import read_state_dict as _read

# (public name, timm name, width, depth, SwiGLU MLP) of Meta's releases.
RELEASES = [
    ("ViT-S/16", "vit_small_patch16_dinov3_qkvb", 384, 12, False),
    ("ViT-S+/16", "vit_small_plus_patch16_dinov3_qkvb", 384, 12, True),
    ("ViT-B/16", "vit_base_patch16_dinov3_qkvb", 768, 12, False),
    ("ViT-L/16", "vit_large_patch16_dinov3_qkvb", 1024, 24, False),
    ("ViT-L+/16", None, 1024, 24, True),  # released by Meta, no timm architecture
    ("ViT-H+/16", "vit_huge_plus_patch16_dinov3_qkvb", 1280, 32, True),
    ("ViT-7B/16", "vit_7b_patch16_dinov3", 4096, 40, True),
]
# Tensors of the official checkpoint that inference does not use.
_UNUSED = re.compile(r"^(mask_token|local_cls_norm\..*)$")
_PERIODS = "rope_embed.periods"


@FAMILIES.register("dinov3")
class DINOv3ViT(TimmViT):
    family = "dinov3"
    title = "DINOv3 ViT"
    default_name = "vit_base_patch16_dinov3_qkvb"
    options = ("rope_periods", "periods")
    names = tuple(timm.list_models("vit_*_dinov3*"))

    @classmethod
    def create(cls, spec: EncoderSpec) -> nn.Module:
        model = super().create(spec)
        if "periods" in spec.options:  # RoPE periods recorded by `portable_spec`
            use_file_periods(model.rope, torch.tensor(spec.options["periods"]))
        return model

    @classmethod
    def fixed_input(cls, spec: EncoderSpec, size: int) -> EncoderSpec:
        """timm builds DINOv3 with `dynamic_img_size=True`: its RoPE grid is rebuilt on the host
        and copied to the device (a blocking copy) every forward. At one input size the grid is
        built once, with bitwise-equal tokens (no absolute position embedding to resample); the
        user's own model_kwargs win."""
        kwargs = {"img_size": size, "dynamic_img_size": False, **spec.model_kwargs}
        return spec.replace(model_kwargs=kwargs)

    def portable_spec(self) -> EncoderSpec:
        rope = self.backbone.rope
        if isinstance(rope, FilePeriodsRope):  # periods copied from a file are architecture
            return self.spec.replace(
                weights=RANDOM, options={"periods": rope.file_periods.tolist()}
            )
        return super().portable_spec()

    @classmethod
    def default_weights(cls, spec: EncoderSpec) -> str | None:
        weights = os.environ.get(WEIGHTS_ENV)
        if not weights:
            raise FileNotFoundError(WEIGHTS_HELP)
        return weights

    @classmethod
    def recognizes(cls, state: dict[str, torch.Tensor]) -> bool:
        return _format(state) is not None

    @classmethod
    def load(cls, model: nn.Module, path: Path, spec: EncoderSpec) -> LoadReport:
        mode = spec.options.get("rope_periods", "file")
        if mode not in ("file", "computed"):
            raise UserError(f"rope_periods must be 'file' or 'computed', not {mode!r}")
        report = LoadReport(str(path), "")
        state = _read(path, report)
        fmt = _format(state)
        if fmt is None:
            raise UnknownFormatError(path, state, DINOv3ViT.title)
        report.format = fmt + (" training checkpoint" if report.dropped else "")
        source = f"{path} ({report.format} format)"
        _check_size(state, model, spec.name, source)
        if fmt == "huggingface":
            state = hf_to_official(state, model.embed_dim)
        if fmt in ("official", "huggingface"):
            state = official_to_timm(state, model, source, report, mode)
        else:
            report.note("RoPE periods: computed by the model (a timm file stores none)")
        load_strict(model, state, source, spec.name)
        return report


def _format(state: dict) -> str | None:
    if any(k.endswith("embeddings.cls_token") for k in state):
        return "huggingface"
    if "storage_tokens" in state:
        return "official"
    if "reg_token" in state and "cls_token" in state:
        return "timm"
    return None


# --- architecture ---------------------------------------------------------------------------------


def _swiglu(model: nn.Module) -> bool:
    return hasattr(model.blocks[0].mlp, "fc1_g")


def _release(width: int, depth: int, swiglu: bool) -> tuple[str, str | None] | None:
    for title, name, w, d, s in RELEASES:
        if (w, d, s) == (width, depth, swiglu):
            return title, name
    return None


def _describe(width: int, depth: int, swiglu: bool) -> str:
    found = _release(width, depth, swiglu)
    mlp = "SwiGLU" if swiglu else "MLP"
    shape = f"width {width}, depth {depth}, {mlp}"
    return f"DINOv3 {found[0]} ({shape})" if found else f"a ViT of {shape}"


def _check_size(state: dict, model: nn.Module, name: str, source: str) -> None:
    """One line naming the architecture that fits a file of another size."""
    cls = next((state[k] for k in state if k.endswith("cls_token")), None)
    blocks = {int(m[1]) for k in state if (m := re.match(r"^(?:blocks|.*layer)\.(\d+)\.", k))}
    if cls is None or not blocks:
        return
    swiglu = any(re.search(r"\.mlp\.(w1|fc1_g|gate_proj)\.", k) for k in state)
    file_arch = (int(cls.shape[-1]), max(blocks) + 1, swiglu)
    model_arch = (int(model.embed_dim), len(model.blocks), _swiglu(model))
    if file_arch != model_arch:
        fits = _release(*file_arch)
        refuse_size(
            source,
            _describe(*file_arch),
            f"{name} ({_describe(*model_arch)})",
            fits[1] if fits else None,
            "dinov3",
            teacher=True,
        )


# --- Hugging Face -> official names ---------------------------------------------------------------

_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"),
    (r"^embeddings\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
]
# DINOv3ViTMLP: up_proj/down_proj; DINOv3ViTGatedMLP: gate_proj (SiLU), up_proj, down_proj.
_HF_MLP = {
    False: {"up_proj": "fc1", "down_proj": "fc2"},
    True: {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"},
}


def hf_to_official(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Rename Hugging Face DINOv3ViTModel tensors to Meta's (q/k/v fused; a missing k bias = 0)."""
    state = {re.sub(r"^(dinov3_vit|model)\.", "", k): v for k, v in state.items()}
    gated = any(".mlp.gate_proj." in k for k in state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = value
            continue
        m = re.match(r"^layer\.(\d+)\.mlp\.(\w+)\.(weight|bias)$", key)
        if m and m[2] in _HF_MLP[gated]:
            out[f"blocks.{m[1]}.mlp.{_HF_MLP[gated][m[2]]}.{m[3]}"] = value
            continue
        new = key
        for pattern, repl in _HF_RENAMES:
            new = re.sub(pattern, repl, new)
        out[new] = value.reshape(1, -1) if new == "mask_token" else value
    for key, parts in qkv.items():
        if key.endswith("weight"):
            out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # Hugging Face stores no k bias: DINOv3 masks it to zero
            k_bias = parts.get("k", torch.zeros(dim, dtype=parts["q"].dtype))
            out[key] = torch.cat([parts["q"], k_bias, parts["v"]])
    return out


# --- official -> timm names -----------------------------------------------------------------------

_TIMM_TO_OFFICIAL = [
    (r"^reg_token$", "storage_tokens"),
    (r"^blocks\.(\d+)\.gamma_(\d)$", r"blocks.\1.ls\2.gamma"),
    (r"^blocks\.(\d+)\.mlp\.fc1_g\.", r"blocks.\1.mlp.w1."),
    (r"^blocks\.(\d+)\.mlp\.fc1_x\.", r"blocks.\1.mlp.w2."),
]


def official_names(model: nn.Module) -> dict[str, str]:
    """{timm name: official name} for every tensor of the model except the q/v biases."""
    swiglu = _swiglu(model)
    names = {}
    for key in model.state_dict():
        if re.search(r"\.attn\.[qv]_bias$", key):
            continue
        official = key
        for pattern, repl in _TIMM_TO_OFFICIAL:
            official = re.sub(pattern, repl, official)
        if swiglu:
            official = re.sub(r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.w3.", official)
        names[key] = official
    return names


def official_schema(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of Meta's checkpoint tensors that this timm model uses."""
    own = model.state_dict()
    schema = {official: tuple(own[key].shape) for key, official in official_names(model).items()}
    for i, block in enumerate(model.blocks):
        if block.attn.q_bias is not None:
            schema[f"blocks.{i}.attn.qkv.bias"] = (3 * model.embed_dim,)
    return schema


def timm_to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors in Meta's checkpoint layout (the inverse of `official_to_timm`): q/v
    biases fused into `qkv.bias` with a zero k bias and the `bias_mask` that masks it, the RoPE
    periods, and an all-zero `mask_token` (used only by masked training, as in Meta's files)."""
    own = model.state_dict()
    state = {official: own[key] for key, official in official_names(model).items()}
    d = model.embed_dim
    for i, block in enumerate(model.blocks):
        if block.attn.q_bias is None:
            continue
        zero = torch.zeros(d, dtype=block.attn.q_bias.dtype)
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([block.attn.q_bias, zero, block.attn.v_bias])
        state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([zero + 1, zero, zero + 1])
    state[_PERIODS] = model.rope.periods.float()
    state["mask_token"] = torch.zeros(1, d)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def official_to_timm(
    state: dict, model: nn.Module, source: str, report: LoadReport, rope_periods: str
) -> dict[str, torch.Tensor]:
    """Check an official-layout state dict exactly and rename it for the timm model."""
    schema = official_schema(model)
    d = model.embed_dim
    unused = sorted(k for k in state if _UNUSED.match(k))
    for key in unused:
        if key != "mask_token":  # the mask token only serves masked training
            report.dropped[key.split(".")[0]] = report.dropped.get(key.split(".")[0], 0) + 1
    if any(k != "mask_token" for k in unused):
        report.note(
            "dropped training-only tensors: " + ", ".join(k for k in unused if k != "mask_token")
        )
    has_bias = "blocks.0.attn.qkv.bias" in state
    if has_bias and "blocks.0.attn.qkv.bias" not in schema:
        schema |= {f"blocks.{i}.attn.qkv.bias": (3 * d,) for i in range(len(model.blocks))}
    optional = {_PERIODS} | {f"blocks.{i}.attn.qkv.bias_mask" for i in range(len(model.blocks))}
    checked = {k: v for k, v in state.items() if k not in optional and k not in unused}
    problems = mismatches(schema, checked)
    if problems:
        raise WeightsMismatchError(f"{source} does not fit {_name(model)}: {problems}")

    out = {timm_key: state[official] for timm_key, official in official_names(model).items()}
    for i, block in enumerate(model.blocks):
        if not has_bias:
            continue
        q, k, v = _effective_bias(state, i, d, source).chunk(3)
        if block.attn.q_bias is not None:
            out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = q, v
        elif bool(q.any() or v.any()):
            raise WeightsMismatchError(
                f"{source}: the file has non-zero q/v biases (blocks.{i}.attn.qkv.bias) that "
                f"{_name(model)} has no place for; use a `_qkvb` model such as "
                f"{DINOv3ViT.default_name}"
            )
    if "blocks.0.attn.qkv.bias_mask" in state:
        report.note("bias_mask checked: k bias masked, mask folded into the q/v biases")
    _set_periods(model, state.get(_PERIODS), source, report, rope_periods)
    return out


def _name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or "the model"


def _effective_bias(state: dict, block: int, d: int, source: str) -> torch.Tensor:
    """`bias * bias_mask` as the official LinearKMaskedBias computes; the k part must be zero."""
    key = f"blocks.{block}.attn.qkv.bias"
    bias, mask = state[key], state.get(key + "_mask")
    if mask is not None:
        if not bool(torch.isfinite(mask).all()):
            raise WeightsMismatchError(f"{source}: {key}_mask holds NaN/inf (never initialised)")
        bias = bias * mask.to(bias.dtype)
    k = bias[d : 2 * d]
    if bool(k.any()):
        where = f"{key}_mask lets it through" if mask is not None else "no bias_mask masks it"
        raise WeightsMismatchError(
            f"{source}: {key} has a non-zero k bias and {where}; DINOv3 masks the k bias "
            f"(bias_mask 0 on elements {d}-{2 * d - 1}) and the timm model has none"
        )
    return bias


class FilePeriodsRope(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE with the periods of the weights file, kept through dtype casts."""

    file_periods: torch.Tensor

    def _compute_periods(self, device="cpu", dtype=torch.float32) -> torch.Tensor:
        return self.file_periods.to(device=device, dtype=dtype)


def use_file_periods(rope: nn.Module, periods: torch.Tensor) -> None:
    """Make timm's DINOv3 RoPE use `periods` (fp32), also after later dtype casts."""
    rope.__class__ = FilePeriodsRope
    rope.file_periods = periods.detach().float().cpu().clone()
    rope.init_non_persistent_buffers()


def _set_periods(
    model: nn.Module, periods: torch.Tensor | None, source: str, report: LoadReport, mode: str
) -> None:
    rope = model.rope
    if periods is None:
        report.note("RoPE periods: computed by the model (the file stores none)")
        return
    computed = rope.periods.detach().float().cpu()
    periods = periods.detach().float().cpu()
    if periods.shape != computed.shape:
        raise WeightsMismatchError(
            f"{source}: {_PERIODS} has shape {tuple(periods.shape)}, "
            f"the model {tuple(computed.shape)}"
        )
    diff = float(((periods - computed).abs() / computed.abs()).max())
    if diff <= 1e-6:  # equal to fp32 rounding
        report.note(
            f"RoPE periods: computed by the model, equal to the file's (max rel. diff {diff:.1e})"
        )
        return
    if mode == "computed":
        raise WeightsMismatchError(
            f"{source}: {_PERIODS} differ from the periods the model computes (max relative "
            f"difference {diff:.2e}); use rope_periods 'file' to copy them in"
        )
    use_file_periods(rope, periods)
    report.note(f"RoPE periods: copied from the file (max rel. diff {diff:.2e} vs computed)")
