"""`sonodistill demo`, downsized: every step runs through the real APIs and the report is whole."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_TEACHER_KWARGS

from sonodistill.demo import DemoConfig, resolve_teacher, run_demo
from sonodistill.models import TeacherConfig

STEPS = ["corpus", "labelled", "distill", "evaluate", "analysis", "bench"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    cfg = DemoConfig(
        out=str(tmp_path_factory.mktemp("demo") / "run"),
        corpus_frames=32,
        labelled_frames=32,
        img_size=32,
        teacher=TeacherConfig(random_init=True, model_kwargs=dict(TINY_TEACHER_KWARGS)),
        distill_steps=3,
        batch_size=8,
        eval_epochs=1,
        tsne_frames=32,
        bench_size=32,
        bench_runs=1,
        bench_backends=["torch_fp32"],
    )
    return run_demo(cfg)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_runs_every_step(demo_run: Path) -> None:
    summary = json.loads((demo_run / "demo.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert {s["name"]: s["status"] for s in summary["steps"]} == dict.fromkeys(STEPS, "ok")
    assert summary["teacher"]["random"] is True
    assert len(list((demo_run / "corpus").rglob("*.png"))) == 32
    assert (demo_run / "distill" / "student_backbone.safetensors").is_file()
    for table in (
        "evaluate/table2_linear_probe.md",
        "evaluate/table3_finetune.md",
        "bench/table5.md",
        "analysis/metrics.md",
        "analysis/tsne.png",
        "samples/segmentation_samples.png",
    ):
        assert (demo_run / table).is_file(), table
    # Both encoders in both protocols, with metric values in [0, 1].
    finetune = pd.read_csv(demo_run / "evaluate" / "table3_finetune.csv", dtype=str)
    models = [m for m in finetune.Model if not m.endswith("(trivial)")]
    assert models == ["R18-Rand", "R18-Distill"]
    assert {"All background (trivial)", "Majority class (trivial)"} <= set(finetune.Model)
    cells = finetune[finetune.Model.isin(models)].iloc[:, 1:5].to_numpy().ravel()
    assert all(0 <= float(c.split(" ")[0]) <= 1 and "(n=1)" in c for c in cells)


@pytest.mark.slow
def test_demo_report_is_complete(demo_run: Path) -> None:
    page = (demo_run / "report.html").read_text()
    assert "No output for" not in page
    assert "randomly initialised" in page
    assert page.count("data:image/png;base64,") == 3  # curves, t-SNE, sample masks


def test_teacher_weights_switch_to_real_vit(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SONODISTILL_TEACHER_WEIGHTS", raising=False)
    teacher, size, random = resolve_teacher(DemoConfig())
    assert random and teacher.random_init and teacher.model_kwargs and size == 64
    monkeypatch.setenv("SONODISTILL_TEACHER_WEIGHTS", str(tmp_path / "w.pth"))
    teacher, size, random = resolve_teacher(DemoConfig())
    assert not random and not teacher.random_init and teacher.model_kwargs == {}
    assert teacher.weights == str(tmp_path / "w.pth") and size == 224


def test_missing_teacher_weights_fail_fast(tmp_path: Path) -> None:
    cfg = DemoConfig(
        out=str(tmp_path / "run"), teacher=TeacherConfig(weights=str(tmp_path / "missing.pth"))
    )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        run_demo(cfg)
    assert not (tmp_path / "run" / "corpus").exists()
