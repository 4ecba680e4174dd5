"""DINOv3 teacher: every weights format lands tensor by tensor, wrong files are refused in one
line naming the file and the fitting architecture, token shapes and the official norm semantics."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TINY, TINY_TEACHER_KWARGS, VITSP, official_shapes, perturbed_official
from safetensors.torch import save_file

from sonodistill.errors import UserError
from sonodistill.models import Teacher, TeacherConfig, WeightsMismatchError, to_model_input
from sonodistill.models.families.dinov3_vit import WEIGHTS_ENV, official_schema

pytestmark = pytest.mark.usefixtures("one_thread")

X = to_model_input(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))


def tiny(**kw) -> Teacher:
    return Teacher(TeacherConfig(model_kwargs=TINY_TEACHER_KWARGS, **kw))


def official_to_hf(sd: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    """Meta -> Hugging Face DINOv3ViTModel names, written independently of the loader."""
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
    mlp = (
        [("mlp.w1", "mlp.gate_proj"), ("mlp.w2", "mlp.up_proj"), ("mlp.w3", "mlp.down_proj")]
        if "blocks.0.mlp.w1.weight" in sd
        else [("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj")]
    )
    for i in range(n_blocks):
        b, h = f"blocks.{i}.", f"layer.{i}."
        w, bias = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]
        for j, name in enumerate("qkv"):
            hf[h + f"attention.{name}_proj.weight"] = w[j * d : (j + 1) * d]
        hf[h + "attention.q_proj.bias"] = bias[:d]
        hf[h + "attention.v_proj.bias"] = bias[2 * d :]
        for src, dst in [
            ("attn.proj", "attention.o_proj"),
            *mlp,
            ("norm1", "norm1"),
            ("norm2", "norm2"),
        ]:
            hf[h + dst + ".weight"] = sd[b + src + ".weight"]
            hf[h + dst + ".bias"] = sd[b + src + ".bias"]
        hf[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        hf[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return hf


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = perturbed_official(TINY, seed=11)
    path = tmp_path_factory.mktemp("w") / "dinov3_tiny_official.pth"
    torch.save(sd, path)
    return sd, path, tiny(weights=str(path))


def test_official_checkpoint_lands_tensor_by_tensor(official):
    sd, _, teacher = official
    model, d = teacher.encoder.backbone, 48
    assert torch.equal(model.cls_token, sd["cls_token"])
    assert torch.equal(model.reg_token, sd["storage_tokens"])  # 4 storage (register) tokens
    assert torch.equal(model.norm.weight, sd["norm.weight"])
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        assert torch.equal(block.attn.q_bias, sd[p + "attn.qkv.bias"][:d])
        assert torch.equal(block.attn.v_bias, sd[p + "attn.qkv.bias"][2 * d :])
        assert torch.equal(block.attn.qkv.weight, sd[p + "attn.qkv.weight"])
        assert torch.equal(block.gamma_1, sd[p + "ls1.gamma"])
        assert torch.equal(block.gamma_2, sd[p + "ls2.gamma"])
        assert torch.equal(block.mlp.fc2.weight, sd[p + "mlp.fc2.weight"])
    assert teacher.weights_info["format"] == "official"


@pytest.mark.parametrize(
    "layout", ["huggingface", "hf snapshot", "hf sharded", "hub cache", "timm"]
)
def test_other_layouts_give_the_official_model(official, tmp_path, layout):
    sd, _, reference = official
    if layout == "timm":
        path = tmp_path / "timm.safetensors"
        save_file(reference.encoder.backbone.state_dict(), str(path))
    else:
        hf = official_to_hf(sd, 48)
        path = tmp_path / (
            "models--facebook--dinov3/snapshots/abc123" if layout == "hub cache" else "snap"
        )
        path.mkdir(parents=True)
        if layout == "hf sharded":
            keys = sorted(hf)
            half = {k: "model-00001-of-00002.safetensors" for k in keys[: len(keys) // 2]}
            rest = {k: "model-00002-of-00002.safetensors" for k in keys[len(keys) // 2 :]}
            for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
                part = {k: hf[k] for k, f in (half | rest).items() if f == shard}
                save_file(part, str(path / shard))
            (path / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": half | rest})
            )
        else:
            save_file(hf, str(path / "model.safetensors"))
            (path / "config.json").write_text("{}")
        if layout == "huggingface":
            path = path / "model.safetensors"
        elif layout == "hub cache":
            path = tmp_path / "models--facebook--dinov3"
    teacher = tiny(weights=str(path))
    own = reference.encoder.backbone.state_dict()
    for key, value in teacher.encoder.backbone.state_dict().items():
        assert torch.equal(value, own[key]), (layout, key)
    assert torch.equal(teacher(X), reference(X))


def test_huggingface_swiglu_file_gives_the_official_s_plus(tmp_path):
    sd = perturbed_official(VITSP, seed=12)
    kw = {"name": "vit_small_plus_patch16_dinov3_qkvb", "model_kwargs": {"depth": 2}}
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}
    torch.save(sd, tmp_path / "official.pth")
    save_file(official_to_hf(sd, 384), str(tmp_path / "model.safetensors"))
    a = Teacher(TeacherConfig(weights=str(tmp_path / "official.pth"), **kw))
    b = Teacher(TeacherConfig(weights=str(tmp_path / "model.safetensors"), **kw))
    assert b.weights_info["format"] == "huggingface"
    assert torch.equal(a(X[:, :, :32, :32]), b(X[:, :, :32, :32]))


def test_training_checkpoint_is_unwrapped_and_its_heads_dropped(official, tmp_path, caplog):
    sd, _, reference = official
    backbone = {f"backbone.{k}": v for k, v in sd.items()}
    heads = {
        "dino_head.mlp.0.weight": torch.zeros(8, 48),
        "dino_head.last_layer.weight": torch.zeros(4, 8),
        "ibot_head.mlp.0.weight": torch.zeros(8, 48),
    }
    student = {k: v + 1 for k, v in backbone.items()}  # the student is not the released model
    path = tmp_path / "training.pth"
    torch.save(
        {"teacher": backbone | heads, "student": student, "iteration": torch.tensor(9)}, path
    )
    with caplog.at_level(logging.INFO, logger="sonodistill"):
        teacher = tiny(weights=str(path))
    info = teacher.weights_info
    assert info["format"] == "official training checkpoint"
    assert info["dropped"] == {"dino_head": 2, "ibot_head": 1}
    assert "dropped dino_head (2 tensors), ibot_head (1 tensors)" in caplog.text
    assert torch.equal(teacher(X), reference(X))


def test_wrong_size_names_the_teacher_that_fits(tmp_path):
    """ViT-L and SwiGLU ViT-S+ files for the default ViT-B/16 (shape-only tensors: tiny files)."""
    vitl = {"dim": 1024, "depth": 24, "heads": 16, "hidden": 4096, "swiglu": False}
    for arch, fits, title in [
        (vitl, "vit_large_patch16_dinov3_qkvb", "ViT-L/16"),
        (VITSP, "vit_small_plus_patch16_dinov3_qkvb", "ViT-S+/16"),
    ]:
        sd = {k: torch.zeros(1).expand(s) for k, s in official_shapes(**arch).items()}
        path = tmp_path / f"{title[:-3]}.pth"
        torch.save(sd, path)
        with pytest.raises(WeightsMismatchError) as err:
            Teacher(TeacherConfig(weights=str(path), model_kwargs={"depth": 1}))  # a 1-block ViT-B
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert f"the file is DINOv3 {title}" in message and "width 768, depth 1" in message
        assert f"--teacher.name {fits}" in message and "Eva" not in message


def test_model_without_qv_biases_refuses_to_drop_them(official):
    with pytest.raises(WeightsMismatchError, match="vit_base_patch16_dinov3_qkvb"):
        Teacher(
            TeacherConfig(
                name="vit_base_patch16_dinov3",
                weights=str(official[1]),
                model_kwargs=TINY_TEACHER_KWARGS,
            )
        )


def test_official_schema_covers_swiglu_models():
    model = Teacher(
        TeacherConfig(
            name="vit_small_plus_patch16_dinov3_qkvb", random_init=True, model_kwargs={"depth": 1}
        )
    ).encoder.backbone
    schema = official_schema(model)
    assert schema["blocks.0.mlp.w1.weight"] == (1536, 384) and schema["blocks.0.mlp.w3.weight"] == (
        384,
        1536,
    )
    assert "blocks.0.mlp.fc1.weight" not in schema


def test_tokens_shape_for_vitb16_at_224():
    teacher = Teacher(TeacherConfig(random_init=True, model_kwargs={"depth": 2}))  # ViT-B width
    tokens = teacher(to_model_input(torch.rand(2, 1, 224, 224)))
    assert tokens.shape == (2, 1536, 14, 14) and teacher.out_channels == 1536
    assert not tokens.requires_grad


def test_tokens_are_last_blocks_through_final_norm_like_get_intermediate_layers():
    teacher = tiny(random_init=True)
    model = teacher.encoder.backbone
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in model.blocks]
    tokens = teacher(X)
    for h in hooks:
        h.remove()
    n_prefix = model.num_prefix_tokens
    manual = [
        model.norm(o)[:, n_prefix:].transpose(1, 2).reshape(2, 48, 4, 4) for o in outputs[-2:]
    ]
    torch.testing.assert_close(tokens, torch.cat(manual, dim=1))
    raw = tiny(random_init=True, norm=False)
    raw.encoder.backbone.load_state_dict(model.state_dict())
    assert not torch.allclose(raw(X), tokens)


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = tiny(random_init=True)
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_no_weights_stops_with_where_to_get_them(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="dinov3") as err:
        tiny()
    assert "random_init" in str(err.value)


def test_families_without_token_maps_cannot_teach():
    with pytest.raises(UserError, match="encoders offer no token maps.*sam2"):
        Teacher(TeacherConfig(family="timm", name="resnet18", random_init=True))


def test_unknown_names_are_user_errors_with_close_matches():
    with pytest.raises(UserError, match="did you mean vit_base_patch16_dinov3_qkvb"):
        Teacher(TeacherConfig(name="vit_base_patch16_dinov3_qkv", random_init=True))
    with pytest.raises(UserError, match="unknown encoder family; did you mean dinov3"):
        Teacher(TeacherConfig(family="dinov", random_init=True))


def test_a_teacher_of_one_input_size_gives_bitwise_equal_targets():
    """Distillation builds the DINOv3 teacher for its one input size (`dynamic_img_size=False`:
    the RoPE grid built once, not rebuilt on the host and copied every forward); the targets
    are those of the teacher of any size, bit for bit."""
    torch.manual_seed(0)
    cfg = TeacherConfig(random_init=True, model_kwargs=dict(TINY_TEACHER_KWARGS))
    any_size, fixed = Teacher(cfg), Teacher(cfg, image_size=64)
    fixed.load_state_dict(any_size.state_dict())
    assert any_size.encoder.backbone.dynamic_img_size
    assert not fixed.encoder.backbone.dynamic_img_size
    assert fixed.encoder.backbone.rope.pos_embed_cached is not None
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(fixed(x), any_size(x))
    with pytest.raises(UserError, match="--image_size size 32x32"):
        fixed.check_input_size(32)
