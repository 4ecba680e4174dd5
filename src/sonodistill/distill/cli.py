"""`sonodistill distill`: every DistillConfig field is a flag; --config reads a YAML file or a
packaged config (paper_distill_r50). The config lives in the light `distill.config`; the
recipe (torch, Fabric, kornia) is imported only to run."""

from __future__ import annotations

from sonodistill.distill.config import DistillConfig


def distill(cfg: DistillConfig) -> int:
    from sonodistill.distill.recipe import distill as run

    print(f"run directory: {run(cfg)}")
    return 0
