"""A distillation run folder: the one place that knows its layout.

    OUT/config.yaml                    the resolved DistillConfig
    OUT/run_info.json                  teacher weights, world size, precision, device, torch
    OUT/checkpoints/last.pt            student, optimiser, scheduler and step (for --resume)
    OUT/checkpoints/previous.pt        the checkpoint before it (read when last.pt is not)
    OUT/logs/version_N/metrics.csv     one CSV (and TensorBoard) log per start or resume
    OUT/student_backbone.safetensors   the distilled backbone: a timm state dict, no classifier

The file names live in `sonodistill.models.specs` (the `student:RUN_DIR` encoder family reads
them: `models.build_encoder("student:RUN")`); this module keeps what only distillation and its
reports read (logs, metrics, the objective's title).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sonodistill.models.encoders import (
    Encoder,
    EncoderSpec,
    build_encoder,
    encoder_recipe,
    resolve_spec,
)
from sonodistill.models.specs import AUGMENT_TITLES as AUGMENT_NAMES  # noqa: F401 (bridge)
from sonodistill.models.specs import LAST_CHECKPOINT, LOGS, RUN_INFO, STUDENT_WEIGHTS  # noqa: F401
from sonodistill.models.specs import RUN_CONFIG as CONFIG
from sonodistill.models.specs import read_run_config as read_config

OWNED = (CONFIG, RUN_INFO, "checkpoints", LOGS, STUDENT_WEIGHTS)
"""What a run folder's run consists of: `--overwrite` removes these and nothing else."""


def loss_title(run_dir: str | Path) -> str:
    """How to name a run's objective in plots: its registered title (token MSE by default,
    the objective of runs older than the `loss` option)."""
    from sonodistill.distill.loss import LOSSES

    name = read_config(run_dir).get("loss", "token_mse")
    return LOSSES[name].title if name in LOSSES else f"{name} loss"


def load_encoder(spec: EncoderSpec | str) -> Encoder:
    """Bridge to `models.build_encoder` (which builds `student:RUN` itself)."""
    return build_encoder(spec)


def resolve_encoder(spec: EncoderSpec | str) -> EncoderSpec:
    """Bridge to `models.encoders.resolve_spec`."""
    return resolve_spec(spec)


def student_recipe(run_dir: str | Path) -> dict:
    """Bridge to `models.encoder_recipe` of `student:RUN_DIR` (without its `init`)."""
    recipe = encoder_recipe(EncoderSpec(family="student", weights=str(run_dir)))
    return {k: v for k, v in recipe.items() if k != "init"}


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
