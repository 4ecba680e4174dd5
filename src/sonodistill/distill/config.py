"""The distillation recipe's typed configuration (defaults: the paper, Sec. 3.5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sonodistill.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    RightOpenUnitInterval,
    check_fields,
)
from sonodistill.errors import UserError, unknown_name
from sonodistill.models import StudentConfig, TeacherConfig


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[RightOpenUnitInterval, RightOpenUnitInterval] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"
    """The paper states a fixed AdamW lr; cosine decays to min_lr after warm-up."""
    warmup_steps: NonNegativeInt = 0
    min_lr: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat | None = None
    """Clip the global gradient norm to this value (off by default)."""


@dataclass
class DistillConfig:
    """Distil a frozen DINOv3 teacher into a CNN student (token-wise MSE, Eq. 6)."""

    data: str = ""
    """Image folder (any depth), corpus folder, corpus manifest (.parquet) or corpus pack."""
    out: str = "runs/distill"
    """Run directory: config, logs, checkpoints and the exported student backbone."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = "token_mse"
    """Objective, by its name in sonodistill.distill.loss: token_mse (Eq. 6), token_cosine,
    token_smooth_l1, or one you register with `register_loss`."""
    img_size: PositiveInt = 224
    augment: Literal["us", "default", "none"] = "us"
    mixup: bool = True
    batch_size: PositiveInt = 512
    """Global batch, split evenly across devices and nodes."""
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    """Stop after this many optimiser steps (replaces epochs when set)."""
    val_fraction: RightOpenUnitInterval = 0.0
    """Images held out (deterministically) to track loss and cosine without augmentation."""
    val_every: NonNegativeInt = 0
    """Evaluate the held-out images every N steps (0: only at the start and the end)."""
    seed: NonNegativeInt = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    """Fabric strategy: auto, ddp, ddp_spawn (CPU tests), ..."""
    precision: str = "auto"
    """auto: bf16-mixed on GPU, 32-true on CPU; or set 32-true, bf16-mixed, 16-mixed."""
    num_workers: NonNegativeInt = 4
    """Decoding processes per device; they stay alive across epochs (persistent workers)."""
    prefetch_factor: PositiveInt = 4
    """Batches each worker decodes ahead of the step (with num_workers > 0)."""
    channels_last: bool = True
    """The CNN student and its input in channels_last memory format (faster convolutions on
    tensor-core GPUs and oneDNN CPUs; the same maths)."""
    compile: bool = False
    """torch.compile the teacher and the student (off until measured on your GPU:
    benchmarks/distill_throughput.py --compile compares both)."""
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 500
    resume: bool = False
    """Continue the run in OUT (from checkpoints/last.pt, else previous.pt); a new run when OUT
    holds none. Options that change the run's trajectory must stay as they were; longer
    schedules (epochs, max_steps), logging, checkpoint and worker settings may change."""
    overwrite: bool = False
    """Replace the run in OUT (its config, logs, checkpoints and student) by a new one."""


# Options a resumed run may change (recorded in run_info.json); any other change is refused.
# Device options may change as long as the world size and the resolved precision do not; data
# may move as long as it holds the same images; schedules may only get longer.
FREE_ON_RESUME = (
    "out",
    "resume",
    "overwrite",
    "log_every",
    "val_every",
    "checkpoint_every",
    "num_workers",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "data",
    "epochs",
    "max_steps",
)


def check_config(cfg: DistillConfig) -> None:
    """Every option that can be checked without reading the data or building a model: a
    UserError naming the first bad one, before anything is written."""
    from sonodistill.distill.loss import LOSSES
    from sonodistill.models.specs import FAMILIES

    if not cfg.data:
        raise UserError("--data: no training data; pass an image folder, corpus, manifest or pack")
    if not Path(cfg.data).exists():
        raise UserError(f"--data {cfg.data}: no such file or folder")
    check_fields(cfg)
    if cfg.loss not in LOSSES:
        raise unknown_name("objective", cfg.loss, LOSSES, "--loss")
    family = FAMILIES.get(cfg.student.family, "--student.family")  # the teacher's checks itself
    family.check_name(cfg.student.name, "--student.name")
    for option, path in (
        ("--student.weights", cfg.student.weights),
        ("--teacher.weights", cfg.teacher.weights),
    ):
        if path and not Path(path).exists():
            raise UserError(f"{option} {path}: no such file")
