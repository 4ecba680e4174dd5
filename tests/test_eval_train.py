"""One downstream run selects the epoch with the best validation score and tests that epoch's
weights (validation scores are scripted, so the rule itself is under test); a suite's results
are keyed by the encoder's weights file, not only its spec."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import fake_student_run
from PIL import Image

from sonodistill.evaluate import train as train_module
from sonodistill.evaluate.config import TrainSettings
from sonodistill.evaluate.datasets import load_seg_folder
from sonodistill.evaluate.suite import SuiteConfig, run_suite
from sonodistill.evaluate.train import run_one

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_seg_root(tmp_path):
    """12 random 32 px images with rectangular masks, as images/ + masks/."""
    root = tmp_path / "tiny_seg"
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
        mask = np.zeros((32, 32), np.uint8)
        mask[8 : 16 + i, 8:20] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


@pytest.fixture
def tiny_seg(tiny_seg_root):
    index = load_seg_folder(tiny_seg_root)
    ids = [r.id for r in index.records]
    splits = {"ids": {"train": ids[:8], "val": ids[8:10], "test": ids[10:]}, "fractions": {}}
    return index, splits


@pytest.mark.parametrize(
    ("scores", "best"),
    [([0.2, 0.5, 0.5], 2), ([0.9, 0.2, 0.4], 1)],
)
def test_the_best_validation_epoch_is_the_one_tested(tiny_seg, monkeypatch, scores, best):
    index, splits = tiny_seg
    weights_seen = []  # the head's weights at each validation, then at the test

    def scripted(model, loader, task_type, num_classes, device, *forward_autocast_settings):
        weights_seen.append(model.head.weight.detach().clone())
        per_image = {"id": [], "dice": [], "iou": []}
        if len(weights_seen) <= len(scores):  # validation after each epoch
            return {"dice": scores[len(weights_seen) - 1], "iou": 0.0, "per_image": per_image}
        return {"dice": -1.0, "iou": -1.0, "per_image": per_image}  # the test

    monkeypatch.setattr(train_module, "evaluate", scripted)
    settings = TrainSettings(
        seg_image_size=32, epochs=len(scores), seg_batch=4, lr=1e-2, device="cpu"
    )
    result = run_one(index, splits, "random:resnet18", "linear", 1.0, 0, settings)

    assert result["best_epoch"] == best and result["val_best"] == max(scores)  # ties: earliest
    assert [row["dice"] for row in result["history"]] == scores
    *per_epoch, tested = weights_seen
    assert torch.equal(tested, per_epoch[best - 1])  # the selected epoch's weights were tested
    assert not torch.equal(per_epoch[0], per_epoch[-1])  # training did change them


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_redistilling_into_the_same_run_folder_reruns_its_evaluations(tiny_seg_root, tmp_path):
    student = fake_student_run(tmp_path / "distill", seed=1)
    cfg = SuiteConfig(
        out=str(tmp_path / "suite"),
        datasets={"tiny": {"format": "seg_folder", "root": str(tiny_seg_root)}},
        tasks=["tiny"],
        encoders=[f"student:{student}@R18-Distill", "random:resnet18@R18-Rand"],
        protocols=["linear"],
        seeds=[0],
        train=TrainSettings(seg_image_size=32, epochs=1, seg_batch=4, device="cpu"),
    )
    run_suite(cfg)
    distilled = tmp_path / "suite" / "runs" / "tiny__linear__R18-Distill__f1__s0.json"
    rand = distilled.with_name("tiny__linear__R18-Rand__f1__s0.json")
    first = json.loads(distilled.read_text())
    weights = student / "student_backbone.safetensors"
    assert first["encoder_weights"] == {"file": str(weights), "sha256": sha256(weights)}
    assert json.loads(rand.read_text())["encoder_weights"]["sha256"] is None  # random init
    stamps = {p: p.stat().st_mtime_ns for p in (distilled, rand)}
    cfg.resume = True  # the same suite, continued
    run_suite(cfg)
    assert {p: p.stat().st_mtime_ns for p in (distilled, rand)} == stamps  # nothing changed

    fake_student_run(tmp_path / "distill", seed=2)  # a new distillation into the same folder
    run_suite(cfg)
    second = json.loads(distilled.read_text())
    assert distilled.stat().st_mtime_ns != stamps[distilled]  # evaluated again, not reused
    assert second["encoder_weights"]["sha256"] == sha256(weights)
    assert second["encoder_weights"]["sha256"] != first["encoder_weights"]["sha256"]
    assert second["run_key"] != first["run_key"]
    assert rand.stat().st_mtime_ns == stamps[rand]  # the other encoder's results still stand


# The suite.yaml and the run key that sonodistill 0.1 (main before issue 20) wrote for
# `sonodistill evaluate --out OUT --encoders [random:resnet18] --tasks [mini] --seeds [0]
# --protocols [linear] --train.seg_size 32 --train.cls_size 48 --train.epochs 1
# --train.seg_batch 4 --train.precision 32 --audit_loose 0.85 --datasets {mini: {format:
# seg_folder, root: MINI}}`: old option names, precision `32`, the key under `fingerprint`.
SUITE_0_1 = """\
out: OUT
data_root: ../shared/data
encoders:
- random:resnet18
tasks:
- mini
datasets:
  mini:
    format: seg_folder
    root: MINI
protocols:
- linear
fractions:
- 1.0
fraction_protocols:
- finetune
seeds:
- 0
folds: 0
reference: null
ablation: []
split:
  seed: 0
  near_duplicate: 0.92
  label_conflicts: drop
  seg_counts: null
  proportions: null
train:
  seg_size: 32
  cls_size: 48
  epochs: 1
  seg_batch: 4
  cls_batch: 16
  lr: 0.0001
  weight_decay: 0.01
  restart_epochs: 10
  subset: null
  hflip: false
  seg_decoder: auto
  metric_resolution: original
  empty_mask: one
  feature_cache: true
  precision: '32'
  device: auto
  num_workers: null
accept_leaks: false
audit_loose: 0.85
tables_only: false
save_models: false
dry_run: false
resume: false
overwrite: false
"""
RUN_0_1 = {"id": "mini__linear__resnet18-rand__f1__s0", "fingerprint": "eb8f40820516b5a2"}


@pytest.mark.parametrize("names", ["new", "old"])
def test_a_suite_of_0_1_resumes_without_redoing_its_runs(tmp_path, names, capsys):
    from sonodistill.cli import parse_command
    from sonodistill.config import to_dict
    from sonodistill.evaluate.config import SUITE
    from sonodistill.evaluate.suite import dataset_changes, finished_result, plan
    from sonodistill.utils.rundir import RunDir

    out, mini = tmp_path / "suite", tmp_path / "mini"
    (out / "runs").mkdir(parents=True)
    (out / "suite.yaml").write_text(SUITE_0_1.replace("OUT", str(out)).replace("MINI", str(mini)))
    (out / "runs" / f"{RUN_0_1['id']}.json").write_text(json.dumps(RUN_0_1))
    flags = (
        f"--out {out} --encoders [random:resnet18] --tasks [mini] --seeds [0] --protocols [linear] "
        "--train.seg_size 32 --train.cls_size 48 --train.epochs 1 --train.seg_batch 4 "
        "--train.precision 32 --audit_loose 0.85 --resume true"
    )
    if names == "new":  # today's names for the same options
        for old, new in (("seg_size", "seg_image_size"), ("cls_size", "cls_image_size")):
            flags = flags.replace(f"--train.{old} ", f"--train.{new} ")
        flags = flags.replace("precision 32", "precision fp32").replace(
            "audit_loose", "audit_near_duplicate"
        )
    datasets = f"{{mini: {{format: seg_folder, root: {mini}}}}}"
    cfg = parse_command("evaluate", [*flags.split(), "--datasets", datasets])
    run_dir = RunDir(out, SUITE, resume=True)
    options = to_dict(cfg)
    assert run_dir.resume_changes(options, dataset_changes(run_dir, cfg), type(cfg)) == {}
    [run] = plan(cfg)
    assert run.id == RUN_0_1["id"] and finished_result(out, run, cfg) == RUN_0_1
    cfg.train.lr = 1e-3  # another setting: another run
    assert finished_result(out, run, cfg) is None
    cfg.train.lr, cfg.datasets["mini"]["root"] = 1e-4, str(tmp_path / "other")
    changes = run_dir.resume_changes(options, dataset_changes(run_dir, cfg), type(cfg))
    assert list(changes) == ["datasets.mini.root"]
