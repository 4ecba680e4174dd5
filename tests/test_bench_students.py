"""`sonodistill bench --students`: candidates timed side by side, the latency budget, distilled
runs' validation quality, downstream scores from an evaluate suite, the Pareto front and its
plot. Speed is never asserted: only that the table agrees with its own measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
from conftest import fake_student_run
from PIL import Image

from sonodistill.cli import main
from sonodistill.deploy.students import pareto_front
from sonodistill.models.flops import count_params


def test_pareto_front_keeps_the_points_no_other_beats_on_both_axes():
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (2.0, 0.7), (0.5, 0.4), (4.0, 0.9)]
    # (3, 0.6) is beaten by (2, 0.7); the tied (2, 0.7) pair beat nothing of each other.
    assert pareto_front(points) == [4, 0, 1, 3, 5]
    assert pareto_front([(1.0, 1.0), (1.0, 0.5)]) == [0]


@pytest.fixture
def distilled_run(tmp_path):
    """A distill run folder with a validation log (the numbers a real run writes there)."""
    run = fake_student_run(tmp_path / "r18run", seed=3)
    logs = run / "logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "step,loss,cosine,val_loss,val_cosine\n0,,,9.5,0.10\n10,4.0,0.6,,\n10,,,3.25,0.71\n"
    )
    return run


def scores_folder(tmp_path, values: dict[str, list[float]]):
    """What an evaluate suite leaves in runs/: one JSON per run, its test metrics."""
    runs = tmp_path / "suite" / "runs"
    runs.mkdir(parents=True)
    for label, dices in values.items():
        for seed, dice in enumerate(dices):
            result = {"encoder": label, "task": "busi_seg", "test": {"dice": dice, "iou": 0.1}}
            (runs / f"{label}-{seed}.json").write_text(json.dumps(result))
    return runs.parent


@pytest.mark.slow
def test_bench_students_table_budget_quality_and_pareto(tmp_path, distilled_run, capsys):
    scores = scores_folder(
        tmp_path,
        {"R18-distilled": [0.6, 0.7], "mobilenetv3_large_100": [0.5], "convnext_tiny": [0.62]},
    )
    students = [
        "resnet18",
        "mobilenetv3_large_100",
        "efficientnet_b0",
        "convnext_tiny",
        f"student:{distilled_run}@R18-distilled",
    ]
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--students",
        json.dumps(students),
        "--backends",
        "[torch, ort_int8]",
        "--budget_ms",
        "4",
        "--scores",
        str(scores),
        "--image_size",
        "32",
        "--runs",
        "2",
        "--warmup",
        "0",
        "--block",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "| R18-distilled |" in capsys.readouterr().out
    result = json.loads((out / "students.json").read_text())
    rows = {r["student"]: r for r in result["rows"]}
    assert list(rows) == ["resnet18", *students[1:4], "R18-distilled"]
    model = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=0)
    assert rows["mobilenetv3_large_100"]["params_m"] == pytest.approx(count_params(model) / 1e6)
    for row in rows.values():
        timed = {b: row[f"{b}_ms"] for b in ("torch", "ort_int8")}
        assert all(v is not None and v > 0 for v in timed.values())
        assert row["best_ms"] == min(timed.values())
        fits = [b for b, v in timed.items() if v <= 4]
        assert row["fits_budget"] == (", ".join(fits) if fits else "no")
    # Quality: the distilled run's last validation, the suite's mean dice per label.
    assert rows["R18-distilled"]["distill_val_loss"] == 3.25
    assert rows["R18-distilled"]["distill_val_cosine"] == 0.71
    assert rows["R18-distilled"]["downstream"] == pytest.approx(0.65)
    assert "downstream" not in rows["resnet18"] and result["quality"] == "downstream"
    scored = [r for r in result["rows"] if "downstream" in r]
    front = {
        scored[i]["student"]
        for i in pareto_front([(r["best_ms"], r["downstream"]) for r in scored])
    }
    assert {name for name, r in rows.items() if r["pareto"]} == front
    table = (out / "students.md").read_text()
    assert "fits 4 ms" in table and "downstream dice" in table and "Pareto" in table
    assert (out / "students.csv").is_file()
    image = np.asarray(Image.open(out / "pareto.png"))
    assert image.shape[0] > 200 and image.std() > 0  # a drawn figure, not an empty canvas


def test_bad_students_options_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "bench"
    for argv, message in (
        (["--students", "[resnet18, resnet18]"], "share a label"),
        (["--students", "[resnet18]", "--scores", str(tmp_path)], "no evaluate results"),
        (["--students", "[nosuchnet]"], "nosuchnet"),
    ):
        code = main(["bench", *argv, "--out", str(out), "--device", "cpu"])
        assert code == 2, (argv, message)
        assert not out.exists()


def test_the_report_shows_the_students_plot_and_table_in_their_own_section(tmp_path):
    from sonodistill.deploy.students import plot
    from sonodistill.report import build_report

    bench = tmp_path / "run" / "bench"
    bench.mkdir(parents=True)
    (bench / "students.md").write_text(
        "| student | ONNX Runtime int8 (ms, median) | Pareto |\n|---|---|---|\n"
        "| mobilenetv3_large_100 | 0.91 | yes |\n"
    )
    row = {"student": "mobilenetv3_large_100", "best_ms": 0.91, "pareto": True, "downstream": 0.5}
    plot({"rows": [row], "quality": "downstream"}, 2.0, bench / "pareto.png")
    page = build_report(tmp_path / "run").read_text()
    assert "Student for the device (latency vs quality)" in page
    assert "alt='latency vs quality, Pareto front'" in page and "<td>0.91</td>" in page
    section = page.split("Deployment (Table 5)")[-1].split("Student for the device")[0]
    assert "mobilenetv3_large_100" not in section  # not shown twice
