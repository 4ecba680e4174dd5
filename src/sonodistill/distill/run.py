"""A distillation run's logs: the attempts' metrics merged, and how plots name its objective.

    OUT/config.yaml                    the resolved DistillConfig
    OUT/run_info.json                  teacher weights, world size, precision, device, torch
    OUT/checkpoints/last.pt            student, optimiser, scheduler and step (for --resume)
    OUT/checkpoints/previous.pt        the checkpoint before it (read when last.pt is not)
    OUT/logs/version_N/metrics.csv     one CSV (and TensorBoard) log per start or resume
    OUT/student_backbone.safetensors   the distilled backbone: a timm state dict, no classifier

The file names live in `sonodistill.models.specs` (the `student:RUN_DIR` encoder family reads
them: `models.build_encoder("student:RUN")`), the folder's rules in `distill.config.DISTILL`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sonodistill.models.specs import LOGS, read_run_config


def loss_title(run_dir: str | Path) -> str:
    """How to name a run's objective in plots: its registered title (token MSE by default,
    the objective of runs older than the `loss` option)."""
    from sonodistill.distill.config import LOSSES

    name = read_run_config(run_dir).get("loss", "token_mse")
    return LOSSES.entry(name).title if name in LOSSES else f"{name} loss"


def next_log_version(run_dir: str | Path) -> int:
    """Each start or resume logs into its own logs/version_N (Fabric's CSVLogger would
    otherwise delete the metrics of the interrupted attempt); `read_metrics` merges them."""
    return len(list((Path(run_dir) / LOGS).glob("version_*")))


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """All logged rows of a run, attempts merged in version order (version_10 after version_9);
    a later attempt's rows replace the ones it repeats."""
    files = sorted(
        (Path(run_dir) / LOGS).glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )
    if not files:
        raise FileNotFoundError(f"{run_dir}: no {LOGS}/version_*/metrics.csv")
    frames = [pd.read_csv(f).assign(attempt=i) for i, f in enumerate(files)]
    rows = pd.concat(frames, ignore_index=True)
    # Train and validation rows share step numbers: dedupe within each of the two.
    is_val = rows["val_loss"].notna() if "val_loss" in rows else False
    rows["_val"] = is_val
    rows = rows.drop_duplicates(["_val", "step"], keep="last").drop(columns=["_val"])
    return rows.sort_values(["step", "attempt"]).reset_index(drop=True)
