"""Evaluation at speed: linear probes on cached features give the results of the uncached path
(the old behaviour, `feature_cache=False`) on real DDTI and BUSI images, while the frozen encoder
sees each image once instead of once per epoch, and seeds of a fixed encoder share them;
`sonodistill evaluate --dry_run true` counts a suite's runs and estimates their time."""

from __future__ import annotations

import pytest
import torch

from sonodistill.cli import main
from sonodistill.config import parse_config
from sonodistill.evaluate import estimate
from sonodistill.evaluate.config import TrainSettings
from sonodistill.evaluate.datasets import load_busi, load_ddti
from sonodistill.evaluate.heads import Classifier, LinearSegProbe
from sonodistill.evaluate.probe_cache import FeatureCache
from sonodistill.evaluate.suite import SuiteConfig, plan
from sonodistill.evaluate.train import run_one
from sonodistill.models.encoders import EncoderSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def small_split(index, n_train: int, n_val: int, n_test: int) -> dict:
    """Evenly spaced ids (every class keeps a share), without hashing the whole set."""
    step = len(index.records) // (n_train + n_val + n_test)
    ids = [r.id for r in index.records[::step]]
    a, b = n_train, n_train + n_val
    return {"ids": {"train": ids[:a], "val": ids[a:b], "test": ids[b : b + n_test]}}


@pytest.fixture(scope="module")
def tasks(shared_data):
    ddti, busi = load_ddti(shared_data / "ddti"), load_busi(shared_data / "busi", "cls")
    return {
        "ddti": (ddti, small_split(ddti, 16, 4, 4)),
        "busi": (busi, small_split(busi, 16, 8, 8)),
    }


@pytest.fixture
def encoded(monkeypatch):
    """Images through the frozen encoder, counted by the probes' `encode`."""
    count = {"images": 0}
    for cls in (LinearSegProbe, Classifier):
        real = cls.encode

        def encode(self, x, _real=real):
            count["images"] += len(x)
            return _real(self, x)

        monkeypatch.setattr(cls, "encode", encode)
    return count


def compare(cached: dict, plain: dict) -> None:
    assert cached["best_epoch"] == plain["best_epoch"]
    for a, b in zip(cached["history"], plain["history"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for key, value in plain["test"].items():
        assert cached["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    ("task", "hflip"), [("ddti", False), ("ddti", True), ("busi", False)], ids=str
)
def test_cached_probe_repeats_the_uncached_run(tasks, encoded, task, hflip):
    index, splits = tasks[task]
    settings = TrainSettings(
        seg_image_size=64,
        cls_image_size=64,
        epochs=3,
        seg_batch=8,
        cls_batch=8,
        lr=1e-2,
        hflip=hflip,
        device="cpu",
        num_workers=0,
    )
    plain = run_one(
        index,
        splits,
        "random:resnet18",
        "linear",
        1.0,
        0,
        TrainSettings(**{**settings.__dict__, "feature_cache": False}),
    )
    per_run = encoded["images"]
    n = {"ddti": (16, 4, 4), "busi": (16, 8, 8)}[task]
    assert per_run == 3 * (n[0] + n[1]) + n[2]  # every epoch re-encodes train and val
    encoded["images"] = 0
    cache = FeatureCache()
    cached = run_one(index, splits, "random:resnet18", "linear", 1.0, 0, settings, cache=cache)
    # Once per image, and training images mirrored too when flips are on.
    assert encoded["images"] == cache.images_encoded == sum(n) + (n[0] if hflip else 0)
    compare(cached, plain)
    assert cached["history"][0]["train_loss"] != cached["history"][-1]["train_loss"]


def test_seeds_of_a_fixed_encoder_share_features_random_ones_do_not(tasks, fake_student):
    index, splits = tasks["ddti"]
    student = f"student:{fake_student}"
    settings = TrainSettings(seg_image_size=64, epochs=1, seg_batch=8, device="cpu", num_workers=0)
    cache = FeatureCache()
    for seed in (0, 1):
        run_one(index, splits, student, "linear", 1.0, seed, settings, cache=cache)
    assert cache.images_encoded == 24  # the distilled student's features, once for both seeds
    for seed in (0, 1):
        run_one(index, splits, "random:resnet18", "linear", 1.0, seed, settings, cache=cache)
    assert cache.images_encoded == 24 + 2 * 24  # a random encoder has new weights per seed
    run_one(index, splits, student, "linear", 1.0, 2, settings, cache=cache)
    assert cache.images_encoded == 72  # the student's features were kept beside the others
    finetuned = run_one(index, splits, "random:resnet18", "finetune", 1.0, 0, settings)
    assert finetuned["trainable_params"] > 11_000_000 and cache.images_encoded == 72
    assert torch.get_num_threads() == 1  # the one_thread fixture is active


def test_dry_run_counts_the_paper_suite_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """`sonodistill evaluate --config suites/paper --dry_run true`: the packaged suite holds the
    paper's four encoders (216 runs: 4 x 3 tasks x (linear + fine-tuning at 5 label fractions)
    x 3 seeds) and Meta's DINOv3 ConvNeXt-T beside them (270); no weights file is opened (the
    students' run folders do not exist) and nothing is written."""
    monkeypatch.setattr(estimate, "measured_rate", lambda device, precision: 1e12)
    out = tmp_path / "suite"
    argv = ["evaluate", "--config", "suites/paper", "--dry_run", "true", "--out", str(out)]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert report.startswith("270 runs in") and "(0 done, 270 to run)" in report
    assert "| ddti_seg | finetune | 1, 0.5, 0.2, 0.1, 0.05 | 75 |" in report
    assert "R50-Distill-US: run folder runs/distill_r50_us not found: assumed resnet50" in report
    assert "at 1 TFLOP/s" in report and not out.exists()
    cfg = parse_config(SuiteConfig, ["--config", "suites/paper"], "test")
    cfg.encoders = cfg.encoders[:4]  # R50-Rand, R50-Distill-Default, R50-Distill-US, ViT-B/16
    assert len(plan(cfg)) == 216


def test_dry_run_estimate_counts_cached_probe_features_once_per_weights(tmp_path, monkeypatch):
    """FLOPs of a tiny DDTI suite by hand from the per-image model costs: fine-tuning sees the
    training images every epoch; a linear probe encodes the dataset once per set of weights
    (a random encoder: once per seed), then trains only its head."""
    monkeypatch.setattr(estimate, "measured_rate", lambda device, precision: 1e12)
    totals = []
    monkeypatch.setattr(estimate, "_report", lambda _c, _r, _t, flops, *a: totals.append(flops))
    cfg = SuiteConfig(
        out=str(tmp_path),
        encoders=["random:resnet18"],
        tasks=["ddti_seg"],
        seeds=[0, 1],
        train=TrainSettings(seg_image_size=64, epochs=2),
    )
    estimate.dry_run(cfg)
    flops = totals[0]
    (ft0, lin0), (ft1, lin1) = (
        (
            flops[f"ddti_seg__finetune__resnet18-rand__f1__s{s}"],
            flops[f"ddti_seg__linear__resnet18-rand__f1__s{s}"],
        )
        for s in (0, 1)
    )
    encoder = estimate.meta_encoder(estimate.architecture(EncoderSpec.parse("random:resnet18"))[0])
    finetune = estimate.model_cost(encoder, "seg", "finetune", 2, 64, "auto")
    probe = estimate.model_cost(encoder, "seg", "linear", 2, 64, "auto")
    assert ft0 == ft1 == 2 * (445 * finetune.train + 127 * finetune.forward) + 65 * finetune.forward
    head = 2 * (445 * (probe.train - probe.encode) + 127 * (probe.forward - probe.encode))
    head += 65 * (probe.forward - probe.encode)
    assert lin0 == lin1 == pytest.approx(head + 637 * probe.encode)
    assert finetune.train > 2.5 * finetune.forward and probe.encode > 0.9 * probe.forward
