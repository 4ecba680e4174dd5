"""A distillation run folder: the one place that knows its layout.

    OUT/config.yaml                    the resolved DistillConfig
    OUT/run_info.json                  teacher weights, world size, precision, device, torch
    OUT/checkpoints/last.pt            student, optimiser, scheduler and step (for --resume)
    OUT/checkpoints/previous.pt        the checkpoint before it (read when last.pt is not)
    OUT/logs/version_N/metrics.csv     one CSV (and TensorBoard) log per start or resume
    OUT/student_backbone.safetensors   the distilled backbone: a timm state dict, no classifier

Whatever reads a run (evaluate, embed, export, bench, report) goes through this module, and so
does the `student:RUN_DIR` encoder spec: `models` builds encoders from a weights file and an
architecture and knows nothing of run folders, so `resolve_encoder` turns a run folder into
those two, and `load_encoder` is `models.build_encoder` with that step first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import yaml

from sonodistill.errors import UserError
from sonodistill.models.encoders import Encoder, EncoderSpec, build_encoder, parse_spec

CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
LAST_CHECKPOINT = "checkpoints/last.pt"
LOGS = "logs"
STUDENT_WEIGHTS = "student_backbone.safetensors"
OWNED = (CONFIG, RUN_INFO, "checkpoints", LOGS, STUDENT_WEIGHTS)
"""What a run folder's run consists of: `--overwrite` removes these and nothing else."""


def read_config(run_dir: str | Path) -> dict:
    """A run's config.yaml as written (a mapping; {} when absent), without validating it
    against today's DistillConfig, so that older runs stay readable."""
    config = Path(run_dir) / CONFIG
    if not config.is_file():
        return {}
    values = yaml.safe_load(config.read_text())
    return values if isinstance(values, dict) else {}


def student_architecture(run_dir: str | Path) -> str:
    """The timm name of a run's student, from its config.yaml."""
    try:
        return str(read_config(run_dir)["student"]["name"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{Path(run_dir) / CONFIG}: no student.name ({err})") from err


def loss_title(run_dir: str | Path) -> str:
    """How to name a run's objective in plots: its registered title (token MSE by default,
    the objective of runs older than the `loss` option)."""
    from sonodistill.distill.loss import LOSSES

    name = read_config(run_dir).get("loss", "token_mse")
    return LOSSES[name].title if name in LOSSES else f"{name} loss"


AUGMENT_NAMES = {"us": "US-aware", "default": "Default", "none": "None"}


def student_recipe(run_dir: str | Path) -> dict:
    """What a distill run did, from its config.yaml (the ablation tables' columns):
    augmentation, mixup, projection head, student and teacher architectures ({} for a bare
    backbone weights file, whose recipe is not on record)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such distill run folder or backbone weights file")
    if run_dir.is_file():
        return {}
    config = run_dir / CONFIG
    try:
        cfg = yaml.safe_load(config.read_text())
        return {
            "augmentation": AUGMENT_NAMES.get(cfg["augment"], str(cfg["augment"])),
            "mixup": bool(cfg["mixup"]),
            "head": str(cfg["student"].get("head", "linear")),
            "student": str(cfg["student"]["name"]),
            "teacher": str(cfg["teacher"].get("name") or cfg["teacher"].get("family", "")),
        }
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise UserError(f"{config}: not a distill run config ({err})") from err


def student_backbone(path: str | Path, name: str | None = None) -> tuple[str, Path]:
    """(architecture, backbone weights file) of a distill run folder or a bare weights file
    (whose architecture must then be given)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such distill run folder or backbone weights file")
    if path.is_dir():
        if not (path / CONFIG).is_file() or not (path / STUDENT_WEIGHTS).is_file():
            raise UserError(
                f"{path}: not a finished distill run ({CONFIG} or {STUDENT_WEIGHTS} missing)"
            )
        return name or student_architecture(path), path / STUDENT_WEIGHTS
    if not name:
        raise UserError(f"{path}: a bare weights file needs its architecture (EncoderSpec.name)")
    return name, path


def resolve_encoder(spec: EncoderSpec | str) -> EncoderSpec:
    """The spec with `student:RUN_DIR` replaced by the run's architecture and backbone file;
    other specs unchanged."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.family != "student":
        return spec
    if not spec.weights:
        raise UserError("a student encoder needs the distill run dir (student:RUN_DIR)")
    name, weights = student_backbone(spec.weights, spec.name or None)
    return dataclasses.replace(spec, family="timm", name=name, weights=str(weights))


def load_encoder(spec: EncoderSpec | str) -> Encoder:
    """`models.encoders.build_encoder` for any spec, `student:RUN_DIR` included."""
    return build_encoder(resolve_encoder(spec))


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
