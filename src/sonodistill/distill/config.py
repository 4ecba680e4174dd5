"""The distillation recipe's typed configuration (defaults: the paper, Sec. 3.5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sonodistill.models import StudentConfig, TeacherConfig


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"
    """The paper states a fixed AdamW lr; cosine decays to min_lr after warm-up."""
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
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
    img_size: int = 224
    augment: Literal["us", "default", "none"] = "us"
    mixup: bool = True
    batch_size: int = 512
    """Global batch, split evenly across devices and nodes."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides epochs when set)."""
    val_fraction: float = 0.0
    """Images held out (deterministically) to track loss and cosine without augmentation."""
    val_every: int = 0
    """Evaluate the held-out images every N steps (0: only at the start and the end)."""
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    """Fabric strategy: auto, ddp, ddp_spawn (CPU tests), ..."""
    precision: str = "auto"
    """auto: bf16-mixed on GPU, 32-true on CPU; or set 32-true, bf16-mixed, 16-mixed."""
    num_workers: int = 4
    """Decoding processes per device; they stay alive across epochs (persistent workers)."""
    prefetch_factor: int = 4
    """Batches each worker decodes ahead of the step (with num_workers > 0)."""
    channels_last: bool = True
    """The CNN student and its input in channels_last memory format (faster convolutions on
    tensor-core GPUs and oneDNN CPUs; the same maths)."""
    compile: bool = False
    """torch.compile the teacher and the student (off until measured on your GPU:
    benchmarks/distill_throughput.py --compile compares both)."""
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = False
    """Continue from OUT/checkpoints/last.pt if it exists."""
