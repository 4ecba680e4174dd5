"""Several teachers at once (`--teachers`): one head per teacher at its own token grid, summed
weighted objectives, per-teacher standardisation, exact resume; and a single teacher given as
`--teachers` repeats the paper's recipe bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    HIERA,
    TINY,
    TINY_TEACHER_KWARGS,
    perturbed_official,
    timm_to_sam2_official,
    tiny_config,
)
from safetensors.torch import load_file

from sonodistill.distill import distill, read_metrics
from sonodistill.distill import recipe as recipe_module
from sonodistill.distill.config import TeacherTerm
from sonodistill.distill.teachers import TeacherSet, estimate
from sonodistill.errors import UserError
from sonodistill.models.encoders import build_encoder
from sonodistill.models.specs import EncoderSpec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DINOV3 = {"family": "dinov3", "weights": "random", "model_kwargs": dict(TINY_TEACHER_KWARGS)}


def test_one_teacher_given_as_teachers_repeats_the_paper_recipe_bit_for_bit(
    three_batches, tmp_path
):
    """The multi-teacher machinery (TeacherSet, a ModuleList of one head, the summed objective)
    with the default teacher and no standardisation: the same losses and weights, bit for bit,
    as the paper's single-teacher path (itself checked against the hand-written loop in
    tests/test_distill_step.py)."""
    paper = distill(tiny_config(three_batches, tmp_path / "paper", max_steps=4))
    cfg = tiny_config(three_batches, tmp_path / "one", max_steps=4)
    cfg.teachers = [{"encoder": TINY_DINOV3, "weight": 1.0}]
    one = distill(cfg)
    a, b = read_metrics(paper), read_metrics(one)
    assert a["loss"].tolist() == b["loss"].tolist() and a["cosine"].tolist() == b["cosine"].tolist()
    assert b["dinov3_loss"].tolist() == b["loss"].tolist()  # the per-teacher column
    wa = load_file(str(paper / "student_backbone.safetensors"))
    wb = load_file(str(one / "student_backbone.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "teacher_standardization" not in json.loads((paper / "run_info.json").read_text())


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """A tiny DINOv3 ViT in Meta's official .pth layout and a tiny SAM2 Hiera in Meta's SAM2
    checkpoint layout (random weights, trained-like scales)."""
    tmp = tmp_path_factory.mktemp("teachers")
    torch.save(perturbed_official(TINY, seed=31), tmp / "dinov3_official.pth")
    torch.manual_seed(32)
    hiera = build_encoder(EncoderSpec("sam2", "sam2_hiera_tiny", "random", "SAM2", HIERA))
    torch.save(timm_to_sam2_official(hiera.backbone.state_dict()), tmp / "sam2.1_hiera_tiny.pt")
    return tmp


def two_teachers(data, out, files, **overrides):
    cfg = tiny_config(data, out, max_steps=8, checkpoint_every=4, **overrides)
    cfg.standardize, cfg.standardize_images = "phi_s", 16
    cfg.teachers = [
        {
            "encoder": {
                "family": "dinov3",
                "weights": str(files / "dinov3_official.pth"),
                "model_kwargs": dict(TINY_TEACHER_KWARGS),
            },
        },
        {
            "encoder": {
                "family": "sam2",
                "name": "sam2_hiera_tiny",
                "weights": str(files / "sam2.1_hiera_tiny.pt"),
                "model_kwargs": dict(HIERA),
            },
            "n_blocks": 1,
            "weight": 0.5,
            "loss": "token_cosine",
        },
    ]
    return cfg


@pytest.mark.slow
def test_dinov3_and_sam2_in_official_layouts_distil_together_and_resume_exactly(
    three_batches, official_files, tmp_path, monkeypatch
):
    straight = distill(two_teachers(three_batches, tmp_path / "straight", official_files))
    info = json.loads((straight / "run_info.json").read_text())
    teachers = info["teacher_weights"]
    assert [t["label"] for t in teachers] == ["dinov3", "sam2"]
    assert [t["format"] for t in teachers] == ["official", "official SAM2"]
    record = info["teacher_standardization"]
    assert record["mode"] == "phi_s" and record["images"] == 16
    assert record["teachers"]["sam2"]["channels"] == HIERA["embed_dim"] * 8  # the last stage
    rows = read_metrics(straight).set_index("step")
    for column in ("dinov3_loss", "dinov3_cosine", "sam2_loss", "sam2_cosine"):
        assert rows[column].notna().all()
    # The sum is weighted: loss = 1.0 * dinov3_loss + 0.5 * sam2_loss (1 - cosine).
    torch.testing.assert_close(
        torch.tensor(rows["loss"].to_numpy()),
        torch.tensor((rows["dinov3_loss"] + 0.5 * rows["sam2_loss"]).to_numpy()),
    )
    torch.testing.assert_close(
        torch.tensor(rows["sam2_loss"].to_numpy()), torch.tensor(1 - rows["sam2_cosine"].to_numpy())
    )
    from sonodistill.report import build_report

    page = build_report(straight, tmp_path / "report.html").read_text()
    assert f"sam2_cosine {rows['sam2_cosine'].iloc[-1]:.4g}" in page  # per teacher, in the report

    real_step, calls = recipe_module.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the last checkpoint is step 4
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", crashing_step)
    crashed = two_teachers(three_batches, tmp_path / "crashed", official_files)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(crashed)
    monkeypatch.setattr(recipe_module, "train_step", real_step)
    crashed.resume = True
    resumed = distill(crashed)
    got = read_metrics(resumed).set_index("step")
    assert got.loc[6, "attempt"] == 1
    for column in ("loss", "dinov3_loss", "sam2_loss"):
        assert got[column].tolist() == rows[column].tolist(), column
    a = torch.load(straight / "checkpoints/last.pt", weights_only=False)
    b = torch.load(resumed / "checkpoints/last.pt", weights_only=False)
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    stats = a["teacher_stats"]
    assert all(torch.equal(stats[k], b["teacher_stats"][k]) for k in stats)
    assert json.loads((resumed / "run_info.json").read_text())["teacher_standardization"] == record


def test_standardisation_brings_teachers_of_different_scales_to_one(three_batches):
    """Two random teachers whose tokens differ 30x in scale: after mean_std every channel of
    each target has mean 0 and std 1 on the estimation images; after phi_s each teacher's
    channels have mean 0 and their variances average 1 (one scale per teacher)."""
    from sonodistill.data.images import open_training_images
    from sonodistill.models import to_model_input

    images = open_training_images(str(three_batches), 64)
    x = to_model_input(torch.stack([images[i] for i in range(12)]).float() / 255)
    terms = [TeacherTerm(encoder=TINY_DINOV3), TeacherTerm(encoder=TINY_DINOV3, n_blocks=1)]
    for mode in ("mean_std", "phi_s"):
        torch.manual_seed(0)
        teachers = TeacherSet(terms, ["a", "b"])
        with torch.no_grad():
            teachers.teachers[1].encoder.backbone.norm.weight.mul_(30.0)
        raw = [t(x) for t in teachers.teachers]
        assert raw[1].std() > 10 * raw[0].std()
        record = estimate(teachers, [x[:6], x[6:]], mode)
        assert record["images"] == 12 and set(record["teachers"]) == {"a", "b"}
        for target in teachers(x):
            per_channel = target.transpose(0, 1).reshape(target.shape[1], -1)
            assert per_channel.mean(1).abs().max() < 1e-4
            var = per_channel.var(1, unbiased=False)
            if mode == "mean_std":
                torch.testing.assert_close(var, torch.ones_like(var), rtol=1e-3, atol=1e-3)
            else:
                assert abs(var.mean().item() - 1) < 1e-3 and var.std() > 0.01  # one scale


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"encoder": "dinov3:random", "wieght": 2},
            r"--teachers\[1\]: wieght: unknown key; did you mean weight",
        ),
        ({"encoder": "dinov3:random", "weight": 0}, r"--teachers\[1\] weight"),
        ("dinov3:missing.pth", r"--teachers\[1\] missing.pth: no such file"),
        ({"encoder": "dinov3:random", "loss": "nope"}, r"--teachers\[1\] loss.*token_mse"),
    ],
)
def test_a_bad_teachers_entry_is_one_line_naming_it(three_batches, tmp_path, entry, message):
    cfg = tiny_config(three_batches, tmp_path / "run")
    cfg.teachers = [{"encoder": TINY_DINOV3}, entry]
    with pytest.raises(UserError, match=message):
        distill(cfg)
    assert not (tmp_path / "run").exists()
