"""`sonodistill demo`, downsized: every step runs through the real APIs and the report is whole."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sonodistill.demo import DemoConfig, resolve_teacher, run_demo, teacher_kind
from sonodistill.errors import UserError
from sonodistill.models import TeacherConfig
from sonodistill.models.simulated_teacher import SimTeacherConfig

STEPS = ["corpus", "labelled", "teacher", "distill", "evaluate", "samples", "analysis", "bench"]
MODELS = ["R18-Rand", "R18-Distill", "Teacher (simulated DINOv3 ViT)"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, simulated_teacher_file) -> Path:
    cfg = DemoConfig(
        out=str(tmp_path_factory.mktemp("demo") / "run"),
        corpus_frames=32,
        labelled_frames=40,
        image_size=64,  # the teacher's 8x8 token grid at its own 128 px, 4x4 here
        distill_steps=3,
        batch_size=8,
        fractions=[0.5, 1.0],
        linear_epochs=1,
        linear_seeds=[0],
        finetune_epochs=1,
        tsne_frames=32,
        bench_image_size=32,
        bench_runs=1,
        bench_backends=["torch_fp32"],
    )
    return run_demo(cfg)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: the shared 2-core machine can be 5x slower than idle
def test_demo_runs_every_step(demo_run: Path, simulated_teacher_file: Path) -> None:
    summary = json.loads((demo_run / "demo.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert {s["name"]: s["status"] for s in summary["steps"]} == dict.fromkeys(STEPS, "ok")
    teacher = summary["teacher"]
    assert teacher["kind"] == "simulated" and teacher["source"] == str(simulated_teacher_file)
    assert summary["downstream_presets"] == ["breast", "thyroid"]  # never seen by the teacher
    assert "read from the cache" in summary["steps"][2]["detail"]
    assert len(list((demo_run / "corpus").rglob("*.png"))) == 32
    labels = pd.read_csv(demo_run / "labelled" / "labels.csv")
    assert set(labels.preset) == {"breast", "thyroid"} and len(labels) == 40
    assert (demo_run / "distill" / "student_backbone.safetensors").is_file()
    tables = {p: demo_run / "evaluate" / p / "tables" for p in ("linear", "finetune")}
    for path in (
        tables["linear"] / "table2_linear_probe.md",
        tables["linear"] / "table4_label_fractions_linear.md",
        tables["linear"] / "comparisons.md",
        tables["finetune"] / "table3_finetune.md",
        tables["finetune"] / "comparisons.md",
        demo_run / "bench" / "table5.md",
        demo_run / "analysis" / "metrics.md",
        demo_run / "analysis" / "tsne.png",
        demo_run / "samples" / "segmentation_samples.png",
    ):
        assert path.is_file(), path
    # The three encoders in both protocols, with metric values in [0, 1]; the teacher's
    # fine-tuned model kept beside the others for the sample figure.
    finetune = pd.read_csv(tables["finetune"] / "table3_finetune.csv", dtype=str)
    assert [m for m in finetune.Model if not m.endswith("(trivial)")] == MODELS
    cells = finetune[finetune.Model.isin(MODELS)].iloc[:, 1:5].to_numpy().ravel()
    assert all(0 <= float(c.split(" ")[0]) <= 1 and "(n=1)" in c for c in cells)
    assert len(list((demo_run / "evaluate" / "finetune" / "models").iterdir())) == 6
    linear = pd.read_csv(tables["linear"] / "comparisons.csv")
    assert set(linear.encoder) == set(MODELS[1:]) and set(linear.fraction) == {0.5, 1.0}


@pytest.mark.slow
def test_demo_report_is_complete(demo_run: Path) -> None:
    page = (demo_run / "report.html").read_text()
    assert "No output for" not in page
    assert (
        "A simulated world" in page and "never saw" in page and "randomly initialised" not in page
    )
    assert "Transfer at a glance" in page and "R18-Distill" in page
    assert page.count("data:image/png;base64,") == 3  # curves, t-SNE, sample masks


def test_teacher_kinds(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SONODISTILL_TEACHER_WEIGHTS", raising=False)
    cfg = DemoConfig()
    assert teacher_kind(cfg) == "simulated" and resolve_teacher(cfg) == (None, 128)
    cfg = DemoConfig(teacher=TeacherConfig(random_init=True))
    assert teacher_kind(cfg) == "random" and resolve_teacher(cfg)[0].random_init
    monkeypatch.setenv("SONODISTILL_TEACHER_WEIGHTS", str(tmp_path / "w.pth"))
    teacher, size = resolve_teacher(DemoConfig())
    assert teacher_kind(DemoConfig()) == "weights" and not teacher.random_init
    assert teacher.model_kwargs == {} and teacher.weights == str(tmp_path / "w.pth")
    assert size == 224


def test_missing_teacher_weights_fail_fast(tmp_path: Path) -> None:
    cfg = DemoConfig(
        out=str(tmp_path / "run"), teacher=TeacherConfig(weights=str(tmp_path / "missing.pth"))
    )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        run_demo(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"simulated_teacher": SimTeacherConfig(presets=list("ab"))}, "use some of"),
        (
            {
                "simulated_teacher": SimTeacherConfig(
                    presets=["breast", "thyroid", "muscle", "abdomen"]
                )
            },
            "leave at least one preset out",
        ),
        ({"image_size": 100}, "--image_size 100: not a multiple"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, change, message) -> None:
    cfg = DemoConfig(out=str(tmp_path / "run"), **change)
    with pytest.raises(UserError, match=message):
        run_demo(cfg)
    assert not (tmp_path / "run").exists()


def test_old_option_names_are_accepted_with_a_deprecation_line(capsys) -> None:
    from sonodistill.cli import parse_command
    from sonodistill.config import deprecation_lines, reset_deprecations

    reset_deprecations()
    argv = ["--img_size", "64", "--bench_size", "32", "--threads", "0", "--precision", "32-true"]
    cfg = parse_command("demo", argv)
    assert (cfg.image_size, cfg.bench_image_size, cfg.threads, cfg.precision) == (
        64,
        32,
        None,
        "fp32",
    )
    lines = deprecation_lines("sonodistill demo")
    assert any("--img_size is deprecated, use --image_size" in line for line in lines)
    assert any("--bench_size is deprecated, use --bench_image_size" in line for line in lines)
    reset_deprecations()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--skip", "[sampels]"], "--skip"),
        (["--fractions", "[0.0, 1.0]"], "--fractions"),
        (["--bench_backends", "[onnx]"], "--bench_backends"),
        (["--corpus_frames", "0"], "--corpus_frames"),
    ],
)
def test_bad_values_are_refused_by_their_type(argv, option, tmp_path) -> None:
    from sonodistill.cli import parse_command

    with pytest.raises(UserError, match=option):
        parse_command("demo", [*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_stop_signal_stops_the_demo(monkeypatch, tmp_path) -> None:
    import sonodistill.demo as demo
    from sonodistill.errors import Interrupted

    ran = []

    def stopped(cfg, run, state):
        raise Interrupted("stopped by SIGTERM at step 3 of 50", 143)

    monkeypatch.setattr(
        demo,
        "STEPS",
        [
            demo.Step("corpus", stopped, "stopped by a signal"),
            demo.Step("labelled", lambda *a: ran.append("labelled") or "", "never runs"),
        ],
    )
    with pytest.raises(Interrupted):
        run_demo(DemoConfig(out=str(tmp_path / "run")))
    steps = json.loads((tmp_path / "run" / "demo.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("corpus", "stopped")] and not ran
