"""DINOv3 teacher: weight formats, refusals, token shapes and the official norm semantics."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from sonodistill.models import Teacher, TeacherConfig, WeightsMismatchError, to_model_input
from sonodistill.models.teacher import WEIGHTS_ENV, official_schema
from tests.conftest import REPO, TINY_TEACHER_KWARGS

KEYS_TSV = REPO.parent / "shared" / "fixtures" / "dinov3_vitb16_official_keys.tsv"


def official_random_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under every name and shape of Meta's ViT-B/16 checkpoint."""
    sd = {}
    gen = torch.Generator().manual_seed(0)
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        dims = tuple(int(d) for d in re.findall(r"\d+", shape))
        sd[key] = torch.randn(dims, generator=gen)
    return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = official_random_state_dict()
    path = tmp_path_factory.mktemp("w") / "dinov3_vitb16_pretrain_lvd1689m-test.pth"
    torch.save(sd, path)
    return sd, path


def test_official_checkpoint_lands_tensor_by_tensor(official):
    sd, path = official
    assert len(sd) == 188
    model = Teacher(TeacherConfig(weights=str(path))).model
    d = 768
    assert torch.equal(model.cls_token, sd["cls_token"])
    assert torch.equal(model.reg_token, sd["storage_tokens"])  # 4 register tokens
    assert torch.equal(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(model.norm.weight, sd["norm.weight"])
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        qkv_bias = sd[p + "attn.qkv.bias"]
        assert torch.equal(block.attn.q_bias, qkv_bias[:d])
        assert torch.equal(block.attn.v_bias, qkv_bias[2 * d :])
        assert torch.equal(block.attn.qkv.weight, sd[p + "attn.qkv.weight"])
        assert torch.equal(block.gamma_1, sd[p + "ls1.gamma"])  # layer scales
        assert torch.equal(block.gamma_2, sd[p + "ls2.gamma"])
        assert torch.equal(block.mlp.fc2.weight, sd[p + "mlp.fc2.weight"])
        assert torch.equal(block.norm2.bias, sd[p + "norm2.bias"])


@pytest.mark.parametrize("edit", ["remove", "reshape"])
def test_official_checkpoint_with_a_bad_tensor_is_refused_by_name(official, tmp_path, edit):
    sd = dict(official[0])
    if edit == "remove":
        del sd["blocks.7.ls2.gamma"]
    else:
        sd["blocks.7.ls2.gamma"] = torch.zeros(700)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match=r"blocks\.7\.ls2\.gamma") as err:
        Teacher(TeacherConfig(weights=str(path)))
    assert str(path) in str(err.value)


def test_model_without_qv_biases_refuses_to_drop_them(official):
    _, path = official
    with pytest.raises(WeightsMismatchError, match="vit_base_patch16_dinov3_qkvb"):
        Teacher(TeacherConfig(name="vit_base_patch16_dinov3", weights=str(path)))


def official_to_hf(sd: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    """Meta -> Hugging Face names, written independently of the loader's reverse mapping."""
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"][None],
        "embeddings.register_tokens": sd["storage_tokens"],
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_blocks):
        b, h = f"blocks.{i}.", f"layer.{i}."
        w, bias = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate("qkv"):
            hf[h + f"attention.{name}_proj.weight"] = w[j * d : (j + 1) * d]
        hf[h + "attention.q_proj.bias"] = bias[:d]
        hf[h + "attention.v_proj.bias"] = bias[2 * d :]
        for src, dst in [
            ("attn.proj", "attention.o_proj"),
            ("mlp.fc1", "mlp.up_proj"),
            ("mlp.fc2", "mlp.down_proj"),
            ("norm1", "norm1"),
            ("norm2", "norm2"),
        ]:
            hf[h + dst + ".weight"] = sd[b + src + ".weight"]
            hf[h + dst + ".bias"] = sd[b + src + ".bias"]
        hf[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        hf[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return hf


def test_huggingface_and_timm_formats_give_the_official_model(tmp_path):
    # A tiny architecture keeps this fast; the full-size official layout is tested above.
    tiny = Teacher(TeacherConfig(random_init=True, model_kwargs=TINY_TEACHER_KWARGS)).model
    sd = {k: torch.randn(shape) for k, shape in official_schema(tiny).items()}
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    reference = Teacher(TeacherConfig(weights=str(path), model_kwargs=TINY_TEACHER_KWARGS))
    hf_path = tmp_path / "model.safetensors"
    save_file(official_to_hf(sd, 48), str(hf_path))
    timm_path = tmp_path / "timm.safetensors"
    save_file(reference.model.state_dict(), str(timm_path))
    x = to_model_input(torch.rand(1, 1, 64, 64))
    expected = reference(x)
    for other in (hf_path, timm_path):
        teacher = Teacher(TeacherConfig(weights=str(other), model_kwargs=TINY_TEACHER_KWARGS))
        ref_sd = reference.model.state_dict()
        for key, value in teacher.model.state_dict().items():
            assert torch.equal(value, ref_sd[key]), (other, key)
        assert torch.equal(teacher(x), expected)


def test_tokens_shape_for_vitb16_at_224():
    teacher = Teacher(TeacherConfig(random_init=True))
    tokens = teacher(to_model_input(torch.rand(2, 1, 224, 224)))
    assert tokens.shape == (2, 1536, 14, 14)
    assert not tokens.requires_grad


def test_tokens_are_last_blocks_through_final_norm_like_get_intermediate_layers():
    teacher = Teacher(TeacherConfig(random_init=True, model_kwargs=TINY_TEACHER_KWARGS))
    model = teacher.model
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in model.blocks]
    x = to_model_input(torch.rand(2, 1, 64, 64))
    tokens = teacher(x)
    for h in hooks:
        h.remove()
    n_prefix = model.num_prefix_tokens
    manual = [
        model.norm(o)[:, n_prefix:].transpose(1, 2).reshape(2, 48, 4, 4) for o in outputs[-2:]
    ]
    torch.testing.assert_close(tokens, torch.cat(manual, dim=1))
    raw = Teacher(TeacherConfig(random_init=True, norm=False, model_kwargs=TINY_TEACHER_KWARGS))
    raw.model.load_state_dict(model.state_dict())
    assert not torch.allclose(raw(x), tokens)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = Teacher(TeacherConfig(random_init=True, model_kwargs=TINY_TEACHER_KWARGS))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_no_weights_stops_with_where_to_get_them(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="dinov3") as err:
        Teacher(TeacherConfig(model_kwargs=TINY_TEACHER_KWARGS))
    assert "random_init" in str(err.value)
