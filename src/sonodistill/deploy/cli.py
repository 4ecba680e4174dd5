"""The runners of `sonodistill export`, `bench`, `predict` and `app`: each takes its parsed
config (`deploy.config`, light) and imports the library function of the same name only now,
so that `--help` and the parsing load no torch. Each returns the exit code."""

from __future__ import annotations

import sys
from pathlib import Path

from sonodistill.deploy.config import AppConfig, BenchConfig, ExportConfig, PredictConfig


def export(cfg: ExportConfig) -> int:
    """Exit code 1 when an fp32 backend differs from PyTorch by more than the tolerance."""
    from sonodistill.deploy.export import export as run
    from sonodistill.deploy.export import report_markdown

    report = run(cfg)
    print(report_markdown(report))
    print(f"written to {cfg.out}")
    return 0 if report["fp32_ok"] else 1


def bench(cfg: BenchConfig) -> int:
    from sonodistill.deploy.bench import bench as teacher_vs_student
    from sonodistill.deploy.students import bench_students

    (bench_students if cfg.students else teacher_vs_student)(cfg)
    print((Path(cfg.out) / ("students.md" if cfg.students else "table5.md")).read_text())
    print(f"written to {cfg.out}")
    return 0


def predict(cfg: PredictConfig) -> int:
    """Exit code 1 when a source could not be read to its end (the others are written)."""
    from sonodistill.deploy.predict import predict as run

    summary = run(cfg)
    print((Path(cfg.out) / "summary.md").read_text())
    print(f"written to {cfg.out}")
    failed = [e for e in summary["sources"] if e["status"] != "ok"]
    if failed:
        why = "; ".join(f"{e['name']}: {e['status'].removeprefix('failed: ')}" for e in failed)
        total = len(summary["sources"])
        print(
            f"sonodistill predict: {len(failed)} of {total} sources failed: {why}", file=sys.stderr
        )
        return 1
    return 0


def app(cfg: AppConfig) -> int:
    """Serves until Ctrl-C (exit 130) or SIGTERM (exit 0); every session is dropped on the way
    out."""
    from sonodistill.deploy.app.server import serve

    return serve(cfg)
