"""`sonodistill distill`: every DistillConfig field is a flag; --config reads a YAML file or a
packaged config (paper_distill_r50)."""

from __future__ import annotations

from sonodistill.config import parse_config
from sonodistill.distill.config import DistillConfig
from sonodistill.distill.recipe import distill


def distill_main(argv: list[str]) -> int:
    cfg = parse_config(DistillConfig, argv, "sonodistill distill", DistillConfig.__doc__ or "")
    run_dir = distill(cfg)
    print(f"run directory: {run_dir}")
    return 0
