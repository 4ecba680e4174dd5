"""End-to-end distillation on real ultrasound frames: learning, exact resume, objectives.
Two-process DDP: tests/test_ddp.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from conftest import TINY_TEACHER_KWARGS, tiny_config
from safetensors.torch import load_file

from sonodistill.config import checked
from sonodistill.distill import LOSSES, DistillConfig, OptimConfig, distill, read_metrics
from sonodistill.distill import recipe as recipe_module
from sonodistill.errors import UserError


def test_tiny_run_on_real_frames_learns_the_teacher_on_held_out_frames(real_frames, tmp_path):
    assert len(list(real_frames.glob("*.png"))) >= 70
    cfg = tiny_config(real_frames, tmp_path / "run", max_steps=30, val_fraction=0.2)
    cfg.optim.lr = 1e-3
    run = distill(cfg)
    val = read_metrics(run).dropna(subset=["val_loss"]).sort_values("step")
    first, last = val.iloc[0], val.iloc[-1]
    assert first.step == 0 and last.step == 30
    assert last.val_loss < 0.8 * first.val_loss
    assert last.val_cosine > first.val_cosine + 0.1
    # The run directory holds everything a user needs.
    saved = checked(DistillConfig, yaml.safe_load((run / "config.yaml").read_text()), "config")
    assert saved.teacher.random_init and saved.student.name == "resnet18"
    assert json.loads((run / "run_info.json").read_text())["teacher_weights"]["file"] == "random"
    backbone = load_file(str(run / "student_backbone.safetensors"))
    assert "layer4.1.bn2.running_var" in backbone and not any(k.startswith("fc.") for k in backbone)
    assert any((run / "logs").glob("version_0/events.out.tfevents.*"))


def test_resume_across_an_epoch_boundary_repeats_the_straight_run(
    three_batches, tmp_path, monkeypatch
):
    def config(out):
        cfg = tiny_config(three_batches, out, max_steps=8, checkpoint_every=4)
        cfg.optim = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=3, min_lr=1e-5)
        cfg.optim.grad_clip = 0.01  # small enough to clip every step
        return cfg

    straight = distill(config(tmp_path / "straight"))

    real_step, calls = recipe_module.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # step 7, in the third epoch; the last checkpoint is step 4
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", crashing_step)
    crashed_cfg = config(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(crashed_cfg)
    monkeypatch.setattr(recipe_module, "train_step", real_step)
    crashed_cfg.resume = True
    resumed = distill(crashed_cfg)

    expected = read_metrics(straight).set_index("step")
    got = read_metrics(resumed).set_index("step")
    assert len(list((resumed / "logs").glob("version_*"))) == 2  # the crashed attempt's logs kept
    assert list(got.index) == list(range(1, 9)) and list(got.epoch) == [s / 3 for s in range(1, 9)]
    assert got.loc[6, "attempt"] == 1  # steps 5-8 come from the resumed attempt
    lr = expected["lr"].to_numpy()
    assert lr[0] < lr[2] and lr[2] > lr[3] > lr[7] > 0  # warm-up, then cosine decay
    for column in ("loss", "cosine", "lr"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()), torch.tensor(expected[column].to_numpy())
        )
    a = load_file(str(straight / "student_backbone.safetensors"))
    b = load_file(str(resumed / "student_backbone.safetensors"))
    torch.testing.assert_close(a["conv1.weight"], b["conv1.weight"], rtol=1e-4, atol=1e-5)


def test_a_loss_registered_in_one_function_drives_a_three_step_run(three_batches, tmp_path):
    calls = []

    @LOSSES.register("test_token_l1", title="token L1 loss (test)")
    def token_l1(student, teacher):
        calls.append(tuple(student.shape))
        diff = (student.float() - teacher.float()).abs()
        return diff.sum(dim=1).mean(), {"max_abs": diff.max().detach()}

    try:
        cfg = tiny_config(three_batches, tmp_path / "run", max_steps=3, loss="test_token_l1")
        cfg.val_fraction = 0.25  # 6 held-out frames: one validation batch
        run = distill(cfg)
    finally:
        LOSSES.unregister("test_token_l1")
    rows = read_metrics(run)
    train, val = rows[rows["loss"].notna()], rows[rows["val_loss"].notna()]
    assert list(train.step) == [1, 2, 3] and train["max_abs"].notna().all()
    assert "cosine" not in rows  # the default objective's metric is not logged: it did not run
    assert list(val.step) == [0, 3] and val["val_max_abs"].notna().all()
    assert len(calls) == 3 + 2 and calls[0][1] == 2 * TINY_TEACHER_KWARGS["embed_dim"]
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"] == "test_token_l1"


def test_an_unknown_loss_is_refused_before_anything_is_written(three_batches, tmp_path):
    with pytest.raises(UserError, match="--loss nope: unknown objective.*token_mse"):
        distill(tiny_config(three_batches, tmp_path / "run", loss="nope"))
    assert not (tmp_path / "run").exists()


def test_old_option_names_still_parse_with_a_deprecation_line_each(three_batches):
    from sonodistill import config
    from sonodistill.cli import parse_command

    config.reset_deprecations()
    old = "--img_size 64 --precision 32-true --student.head mlp --augment none"
    cfg = parse_command("distill", [*old.split(), "--data", str(three_batches)])
    assert (cfg.image_size, cfg.precision, cfg.student.projection) == (64, "fp32", "mlp")
    lines = config.deprecation_lines("sonodistill distill")
    assert [line.split(": ", 1)[1].split(" is deprecated")[0] for line in lines] == [
        "--img_size",
        "--precision 32-true",
        "--student.head",
    ]
    config.reset_deprecations()


def test_a_run_folder_written_before_the_renames_resumes_without_changes(tmp_path):
    """config.yaml of 0.1 (img_size, 32-true, student.head): a resume with today's names and
    the same values changes nothing; fp32 is still Fabric's 32-true in run_info.json."""
    from sonodistill.config import to_dict
    from sonodistill.distill.config import DistillConfig
    from sonodistill.distill.recipe import resolve_precision, run_dir

    cfg = tiny_config(tmp_path / "data", tmp_path / "run", precision="fp32", resume=True)
    old = to_dict(cfg)
    old["img_size"] = old.pop("image_size")
    old["precision"] = "32-true"
    old["student"]["head"] = old["student"].pop("projection")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(old))
    run = run_dir(cfg)
    assert run.resume_changes(to_dict(cfg), cls=DistillConfig) == {}
    cfg.image_size = 32
    assert run.resume_changes(to_dict(cfg), cls=DistillConfig) == {"image_size": (64, 32)}
    assert [resolve_precision(p, "cpu") for p in ("auto", "fp32", "bf16", "fp16")] == [
        "32-true",
        "32-true",
        "bf16-mixed",
        "16-mixed",
    ]


def test_the_student_checks_its_input_size_before_anything_is_written(tmp_path):
    """A fixed-size ViT student (224 px) at --image_size 64: one line naming the option, not
    a traceback from inside timm during the first step."""
    from sonodistill.distill.recipe import build_student
    from sonodistill.models import StudentConfig

    vit = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    student = StudentConfig(family="vit", name="vit_tiny_patch16_224", model_kwargs=vit)
    cfg = tiny_config(tmp_path, tmp_path / "run", student=student)
    with pytest.raises(UserError, match="--image_size size 64x64 .* exactly 224x224"):
        build_student(cfg, 96)
    cfg.image_size = 224
    assert build_student(cfg, 96).encoder.family == "vit"


def test_a_gpu_torch_cannot_use_is_an_error_under_accelerator_auto(
    three_batches, tmp_path, monkeypatch
):
    """A GPU node whose driver is too old for torch's CUDA build: torch.cuda says no GPU (with a
    warning); --accelerator auto names the GPU, torch's reason and the fixes instead of training
    in fp32 on the CPU. --accelerator cpu, or GPUs hidden on purpose, train on the CPU."""

    def too_old() -> bool:
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found "
            "version 12040).\nPlease update your GPU driver.",
            UserWarning,
            stacklevel=2,
        )
        return False

    monkeypatch.setattr(recipe_module, "_nvidia_devices", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", too_old)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = tiny_config(three_batches, tmp_path / "run", accelerator="auto")
    with pytest.raises(UserError) as refused:
        distill(cfg)
    message = str(refused.value)
    assert message.startswith("--accelerator auto: this machine has an NVIDIA GPU (/dev/nvidia0)")
    assert "driver on your system is too old (found version 12040)" in message
    assert "--accelerator cpu" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
    for accelerator, hidden in (("cpu", None), ("auto", "")):
        cfg.accelerator = accelerator
        if hidden is not None:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        recipe_module._check_gpu_usable(cfg)  # no error: the CPU on purpose
