"""The DINOv3 ViT teacher against an independent reference forward written here from the
published architecture (not timm): patch embedding, CLS + storage tokens, 2-D RoPE from the
file's periods, LayerScale, q/v biases with the k bias masked, final norm.

Weights are random but realistically scaled ("perturbed") tensors in Meta's checkpoint layout,
for ViT-B/16 (the key list in ../shared/fixtures), a SwiGLU ViT-S+/16 and a tiny config, with
standard, non-standard and bf16-rounded RoPE periods and altered bias masks.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    REPO,
    TINY,
    TINY_TEACHER_KWARGS,
    VITB,
    VITSP,
    official_shapes,
    perturbed_official,
    standard_periods,
)

from sonodistill.models import Teacher, TeacherConfig, WeightsMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS_TSV = REPO.parent / "shared" / "fixtures" / "dinov3_vitb16_official_keys.tsv"
TOL = 1e-5


# --- the reference forward ------------------------------------------------------------------------


def reference_forward(sd: dict, x: torch.Tensor, heads: int, n: int = 2, eps: float = 1e-5):
    """(CLS, [patch maps of the last n blocks]) through the final norm, straight from the
    official tensors."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    batch, _, height, width = x.shape
    gh, gw = height // patch, width // patch
    tokens = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    prefix = torch.cat([sd["cls_token"], sd["storage_tokens"]], dim=1).expand(batch, -1, -1)
    t = torch.cat([prefix, tokens], dim=1)
    n_prefix = prefix.shape[1]

    # 2-D RoPE: patch centres in [-1, 1] per axis, angle 2 pi c / period, rotate-half layout.
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    angles = 2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"].float()[None, None]
    angles = angles.reshape(coords.shape[0], -1).repeat(1, 2)  # (hw, head_dim)
    sin, cos = angles.sin(), angles.cos()

    def rope(u):  # (B, heads, hw, head_dim)
        first, second = u.chunk(2, dim=-1)
        return u * cos + torch.cat([-second, first], dim=-1) * sin

    def norm(u, name):
        return F.layer_norm(u, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps)

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = dim // heads
    outputs = []
    for i in range(depth):
        b = f"blocks.{i}."
        bias = sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]
        qkv = F.linear(norm(t, b + "norm1"), sd[b + "attn.qkv.weight"], bias)
        q, k, v = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :n_prefix], rope(q[:, :, n_prefix:])], dim=2)
        k = torch.cat([k[:, :, :n_prefix], rope(k[:, :, n_prefix:])], dim=2)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, -1, dim)
        t = t + sd[b + "ls1.gamma"] * F.linear(
            attn, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
        )
        y = norm(t, b + "norm2")
        if b + "mlp.w1.weight" in sd:  # SwiGLU: w3(silu(w1 y) * w2 y)
            lin = {
                j: F.linear(y, sd[f"{b}mlp.w{j}.weight"], sd[f"{b}mlp.w{j}.bias"]) for j in (1, 2)
            }
            mlp = F.linear(F.silu(lin[1]) * lin[2], sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            hidden = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
            mlp = F.linear(hidden, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "ls2.gamma"] * mlp
        outputs.append(t)
    final = [norm(o, "norm") for o in outputs[-n:]]
    maps = [f[:, n_prefix:].transpose(1, 2).reshape(batch, dim, gh, gw) for f in final]
    return final[-1][:, 0], maps


def check_teacher(path, sd, arch, x, **cfg):
    teacher = Teacher(TeacherConfig(weights=str(path), **cfg))
    with torch.no_grad():
        cls, maps = reference_forward(sd, x, arch["heads"])
        got = teacher(x)
        got_cls = teacher.encoder.vectors(x)["cls"]
    assert got.shape == (x.shape[0], 2 * arch["dim"], x.shape[-2] // 16, x.shape[-1] // 16)
    assert (got - torch.cat(maps, dim=1)).abs().max() < TOL
    assert (got_cls - cls).abs().max() < TOL
    return teacher


def _save(tmp_path, sd, name="dinov3.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def vitb(tmp_path_factory):
    sd = perturbed_official(VITB)
    return sd, _save(tmp_path_factory.mktemp("vitb"), sd)


# --- tests ----------------------------------------------------------------------------------------


def test_the_layout_written_here_is_metas_key_list():
    listed = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            listed[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    assert official_shapes(**VITB) == listed and len(listed) == 188


def test_vitb16_matches_the_reference(vitb):
    sd, path = vitb
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # a 4 x 6 grid
    teacher = check_teacher(path, sd, VITB, x)
    notes = " ".join(teacher.encoder.load_report.notes)
    assert "RoPE periods: computed" in notes and "bias_mask checked" in notes


def test_vitb16_with_non_standard_periods_copies_them_and_records_it(vitb, tmp_path):
    sd = dict(vitb[0])
    sd["rope_embed.periods"] = standard_periods(64, base=37.0) * (1 + 0.05 * torch.rand(16))
    path = _save(tmp_path, sd)
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    teacher = check_teacher(path, sd, VITB, x)
    assert "RoPE periods: copied from the file" in teacher.weights_info["notes"][-1]
    # the copy survives a dtype round trip (timm would recompute its own periods)
    teacher.encoder.to(torch.bfloat16).to(torch.float32)
    rope = teacher.encoder.backbone.rope
    assert torch.equal(rope.periods, sd["rope_embed.periods"])


def test_swiglu_vit_s_plus_matches_the_reference(tmp_path):
    sd = perturbed_official(VITSP, seed=3)
    path = _save(tmp_path, sd)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    check_teacher(path, sd, VITSP, x, name="vit_small_plus_patch16_dinov3_qkvb")


@pytest.mark.parametrize("periods", ["standard", "bf16", "base 1000"])
def test_tiny_config_matches_the_reference(tmp_path, periods):
    sd = perturbed_official(TINY, seed=5)
    if periods == "bf16":  # periods computed in bf16, as some training configs do
        sd["rope_embed.periods"] = standard_periods(24).to(torch.bfloat16)
    elif periods == "base 1000":
        sd["rope_embed.periods"] = standard_periods(24, base=1000.0)
    path = _save(tmp_path, sd)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    check_teacher(path, sd, TINY, x, model_kwargs=TINY_TEACHER_KWARGS)


def test_altered_bias_mask_on_q_and_v_is_folded_in(tmp_path):
    sd = perturbed_official(TINY, seed=7)
    sd["blocks.1.attn.qkv.bias_mask"][:10] = 0  # some q biases switched off
    sd["blocks.0.attn.qkv.bias_mask"][-5:] = 0.5
    path = _save(tmp_path, sd)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    check_teacher(path, sd, TINY, x, model_kwargs=TINY_TEACHER_KWARGS)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            "k mask on",
            r"blocks\.0\.attn\.qkv\.bias has a non-zero k bias and .*_mask lets it through",
        ),
        ("nan mask", r"blocks\.0\.attn\.qkv\.bias_mask holds NaN"),
        ("no mask", r"non-zero k bias and no bias_mask masks it"),
        ("periods", r"rope_embed\.periods differ from the periods the model computes"),
    ],
)
def test_altered_bias_mask_or_periods_are_refused(tmp_path, edit, message):
    sd = perturbed_official(TINY, seed=9)
    options = {}
    if edit == "k mask on":
        sd["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 48)
    elif edit == "nan mask":
        sd["blocks.0.attn.qkv.bias_mask"][0] = math.nan
    elif edit == "no mask":
        del sd["blocks.0.attn.qkv.bias_mask"], sd["blocks.1.attn.qkv.bias_mask"]
    else:
        sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.01
        options = {"rope_periods": "computed"}
    path = _save(tmp_path, sd, "altered.pth")
    with pytest.raises(WeightsMismatchError, match=message) as err:
        Teacher(TeacherConfig(weights=str(path), model_kwargs=TINY_TEACHER_KWARGS, options=options))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
