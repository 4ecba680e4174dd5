"""`sonodistill export`, `bench`, `predict` and `app`: each a typed config (YAML via --config,
flags override) handed to the library function of the same name."""

from __future__ import annotations

import sys
from pathlib import Path

from sonodistill.config import parse_config


def export_main(argv: list[str]) -> int:
    """Exit code 1 when the fp32 graph differs from PyTorch by more than the tolerance."""
    from sonodistill.deploy import export as module

    cfg = parse_config(module.ExportConfig, argv, "sonodistill export", module.__doc__)
    report = module.export(cfg)
    print(module.report_markdown(report))
    print(f"written to {cfg.out}")
    return 0 if report["fp32_ok"] else 1


def bench_main(argv: list[str]) -> int:
    from sonodistill.deploy import bench as module

    cfg = parse_config(module.BenchConfig, argv, "sonodistill bench", module.__doc__)
    module.bench(cfg)
    print((Path(cfg.out) / "table5.md").read_text())
    print(f"written to {cfg.out}")
    return 0


def predict_main(argv: list[str]) -> int:
    """Exit code 1 when a source could not be read to its end (the others are written)."""
    from sonodistill.deploy import predict as module

    cfg = parse_config(module.PredictConfig, argv, "sonodistill predict", module.__doc__)
    summary = module.predict(cfg)
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


def app_main(argv: list[str]) -> int:
    """Serves until Ctrl-C (exit 130) or SIGTERM (exit 0); every session is dropped on the way
    out."""
    from sonodistill.deploy.app import server as module

    cfg = parse_config(module.AppConfig, argv, "sonodistill app", module.__doc__)
    return module.serve(cfg)
