"""Frozen DINOv3 ViT teacher: patch tokens of its last blocks as distillation targets (Sec. 3.2)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from sonodistill.models.weights import WeightsMismatchError, load_strict, read_state_dict

log = logging.getLogger(__name__)

WEIGHTS_ENV = "SONODISTILL_TEACHER_WEIGHTS"
WEIGHTS_HELP = (
    "DINOv3 teacher weights are needed: request access at "
    "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ and pass the file "
    "(e.g. dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth, a timm .safetensors, or the Hugging Face "
    "facebook/dinov3-vitb16-pretrain-lvd1689m model.safetensors) with --teacher.weights PATH or "
    f"the {WEIGHTS_ENV} environment variable; use --teacher.random_init true only for smoke tests."
)


@dataclass
class TeacherConfig:
    """DINOv3 ViT teacher."""

    name: str = "vit_base_patch16_dinov3_qkvb"
    """timm model name; the `_qkvb` variants keep DINOv3's q/v biases."""
    weights: str | None = None
    """Official .pth, timm (.safetensors/.pth) or Hugging Face safetensors; format detected."""
    random_init: bool = False
    """Explicitly allow a randomly initialised teacher (tests and smoke runs only)."""
    n_blocks: int = 2
    """Patch tokens of this many last blocks are concatenated on channels."""
    norm: bool = True
    """Pass each block's tokens through the final norm, as get_intermediate_layers(norm=True)."""
    model_kwargs: dict = field(default_factory=dict)
    """Architecture overrides passed to timm, e.g. {embed_dim: 64, depth: 2, num_heads: 2}."""


class Teacher(nn.Module):
    """Frozen teacher; always in eval mode (DINOv3's RoPE jitters coordinates in train mode)."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.model = timm.create_model(
            cfg.name, pretrained=False, num_classes=0, **cfg.model_kwargs
        )
        weights = cfg.weights or os.environ.get(WEIGHTS_ENV) or None
        if weights:
            load_teacher_weights(self.model, weights)
            self.weights_source = str(weights)
        elif cfg.random_init:
            log.warning("teacher %s is randomly initialised: results show mechanics only", cfg.name)
            self.weights_source = "random"
        else:
            raise FileNotFoundError(WEIGHTS_HELP)
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def out_channels(self) -> int:
        return self.cfg.n_blocks * self.model.embed_dim

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> tokens (B, n_blocks * D, H/16, W/16)."""
        blocks = self.model.forward_intermediates(
            x,
            indices=self.cfg.n_blocks,
            norm=self.cfg.norm,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        grid = blocks[-1].shape[-2:]
        blocks = [b if b.shape[-2:] == grid else _resize(b, grid) for b in blocks]
        return torch.cat(blocks, dim=1)


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# --- weights -------------------------------------------------------------------------------------


def load_teacher_weights(model: nn.Module, path: str | Path) -> str:
    """Load any supported DINOv3 weights file into a timm Eva model; returns the detected format."""
    sd = read_state_dict(path)
    if _is_hf(sd):
        sd, fmt = hf_to_official(sd, model.embed_dim), "huggingface"
    elif "storage_tokens" in sd:
        fmt = "official"
    else:
        fmt = "timm"
    if fmt in ("official", "huggingface"):
        _check_official(sd, model, f"{path} ({fmt} format)")
        _check_qkv_bias(sd, model, f"{path} ({fmt} format)")
        sd = checkpoint_filter_fn(sd, model)
    load_strict(model, sd, f"{path} ({fmt} format)")
    log.info("loaded teacher weights %s (%s format)", path, fmt)
    return fmt


def official_schema(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Meta's DINOv3 checkpoint for this architecture."""
    d = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    schema: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "storage_tokens": tuple(model.reg_token.shape),
        "mask_token": (1, d),
        "patch_embed.proj.weight": tuple(model.patch_embed.proj.weight.shape),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        schema |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d),
            b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden),
            b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        }
    return schema | {"norm.weight": (d,), "norm.bias": (d,)}


# Buffers of the official checkpoint that carry no learned values.
_OFFICIAL_OPTIONAL = re.compile(r"(rope_embed\.periods|.*\.bias_mask)$")


def _check_official(sd: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    schema = official_schema(model)
    missing = sorted(set(schema) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(schema) if not _OFFICIAL_OPTIONAL.match(k))
    reshaped = [
        f"{k}: file {tuple(sd[k].shape)} vs model {shape}"
        for k, shape in schema.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if missing or unexpected or reshaped:
        lines = [f"{source} does not fit {type(model).__name__} (embed_dim {model.embed_dim}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
        raise WeightsMismatchError("\n".join(lines))


def _check_qkv_bias(sd: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    # timm's filter silently drops q/v biases when the model has none (plain `_dinov3` names).
    has_bias = getattr(model.blocks[0].attn, "q_bias", None) is not None
    lost = [k for k, v in sd.items() if k.endswith("attn.qkv.bias") and bool(v.any())]
    if lost and not has_bias:
        raise WeightsMismatchError(
            f"{source}: the model has no q/v biases but the file has non-zero ones "
            f"({len(lost)} blocks, e.g. {lost[0]}); use a `_qkvb` model such as "
            "vit_base_patch16_dinov3_qkvb"
        )


def _is_hf(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.cls_token") for k in sd)


_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"),
    (r"^embeddings\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc1."),
    (r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
]


def hf_to_official(sd: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Rename Hugging Face DINOv3ViTModel tensors to Meta's names (q/k/v fused, k bias = 0)."""
    sd = {re.sub(r"^(dinov3_vit|model)\.", "", k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"^layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = value
            continue
        new = key
        for pattern, repl in _HF_RENAMES:
            new = re.sub(pattern, repl, new)
        if new == "mask_token":
            value = value.reshape(1, -1)
        out[new] = value
    for key, parts in qkv.items():
        if key.endswith("weight"):
            out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # DINOv3 has no key bias: it is masked to zero in the official checkpoint
            k_bias = parts.get("k", torch.zeros(dim, dtype=parts["q"].dtype))
            out[key] = torch.cat([parts["q"], k_bias, parts["v"]])
    return out
