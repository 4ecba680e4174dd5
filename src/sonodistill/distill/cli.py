"""`sonodistill distill`: every DistillConfig field is a flag; --config reads a YAML file."""

from __future__ import annotations

import logging

from sonodistill.config import parse_config
from sonodistill.distill.config import DistillConfig
from sonodistill.distill.recipe import distill


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(DistillConfig, argv, "sonodistill distill", DistillConfig.__doc__ or "")
    run_dir = distill(cfg)
    print(f"run directory: {run_dir}")
    return 0
