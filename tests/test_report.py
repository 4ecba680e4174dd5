"""The HTML report: self-contained, every section filled from a run folder, honest teacher."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from sonodistill.cli import main
from sonodistill.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run: Path, random_teacher: bool = True) -> Path:
    import cv2

    (run / "distill").mkdir(parents=True)
    weights = None if random_teacher else "/w/dinov3.pth"
    teacher = {"weights": weights, "random_init": random_teacher}
    (run / "distill" / "config.yaml").write_text(yaml.safe_dump({"teacher": teacher}))
    rows = ["step,loss,cosine,lr,images_per_s"]
    rows += [f"{s},{2.0 / (1 + s)},{0.2 + s / 100},0.0001,55.5" for s in range(0, 50, 5)]
    _write_log(run / "distill", 0, rows)
    (run / "evaluate").mkdir()
    (run / "evaluate" / "linear_probe.csv").write_text(
        "encoder,task,dice,iou\nresnet18-random,seg,0.3121,0.2\nresnet18-distilled,seg,0.4567,0.3\n"
    )
    (run / "bench").mkdir()
    (run / "bench" / "table5.md").write_text(
        "# Table 5\n\n| model | latency ms | params M |\n|---|---:|---:|\n"
        "| teacher | 430.0 | 86.6 |\n| student | 33.76 | 11.2 |\n\nCPU, batch 1.\n"
    )
    (run / "analysis").mkdir()
    cv2.imwrite(str(run / "analysis" / "tsne.png"), np.full((20, 30, 3), 128, np.uint8))
    (run / "samples").mkdir()
    cv2.imwrite(str(run / "samples" / "predictions.png"), np.zeros((10, 10), np.uint8))
    summary = {
        "teacher": {"random": random_teacher, "source": teacher["weights"] or "random"},
        "steps": [{"name": "distill", "status": "ok", "seconds": 61.2, "detail": "x"}],
    }
    (run / "demo.json").write_text(json.dumps(summary))
    return run


def _write_log(run: Path, version: int, rows: list[str]) -> None:
    """A metrics.csv where `sonodistill distill` writes one per start or resume."""
    folder = run / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_curves_of_a_run_resumed_ten_times_come_from_the_last_attempt(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "distill").mkdir(parents=True)
    (run / "distill" / "config.yaml").write_text(yaml.safe_dump({"loss": "token_cosine"}))
    for version in range(11):  # each attempt logs step 5 again: version_10 is the newest
        _write_log(run / "distill", version, ["step,loss,cosine", f"5,{version + 1},0.5"])
    page = build_report(run).read_text()
    assert "step 5, loss 11, cosine 0.5" in page  # not version_9's 10 (a string sort's pick)
    assert "objective: token cosine loss (1 - cosine)" in page  # named by the run's config


def test_report_has_every_section_self_contained(tmp_path: Path) -> None:
    page = build_report(_fake_run(tmp_path / "run")).read_text()
    for heading in (
        "Configuration",
        "Distillation curves",
        "Downstream evaluation",
        "t-SNE",
        "Table 5",
        "predicted masks",
    ):
        assert heading in page
    assert "No output for" not in page, "every section has content"
    # Tables carry the values of the files, as HTML tables.
    assert "<td>0.4567</td>" in page and "<td>33.76</td>" in page and "<td>61.2</td>" in page
    # Images are inlined PNGs (curves + t-SNE + samples), no external resources.
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert not re.search(r"(src|href)=['\"](https?:|file:|/)", page)


def test_report_says_when_teacher_was_random(tmp_path: Path) -> None:
    page = build_report(_fake_run(tmp_path / "a", random_teacher=True)).read_text()
    assert "randomly initialised" in page and "mechanics" in page
    page = build_report(_fake_run(tmp_path / "b", random_teacher=False)).read_text()
    assert "randomly initialised" not in page and "/w/dinov3.pth" in page


def test_report_of_partial_run_marks_missing_sections(tmp_path: Path, capsys) -> None:
    run = tmp_path / "partial"
    run.mkdir()
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("No output for") == 7  # an empty folder: nothing in any section
    assert "r.html" in capsys.readouterr().out


def test_report_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")
