"""The distillation recipe's typed configuration (defaults: the paper, Sec. 3.5), its
registries and its run folder. Light (no torch): `sonodistill distill --help` reads it alone.

    LOSSES          objectives by name (`--loss`), filled by `sonodistill.distill.loss`
    AUGMENTATIONS   augmentation policies by name (`--augment`), filled by `.augment`
    DISTILL         the run folder's layout: what --overwrite removes, what --resume may change

A plugin adds an objective or a policy with the decorator at its definition
(`@LOSSES.register("token_l1", title="token L1 loss")`), in a module named by an entry point of
`sonodistill.plugins` or by `--import MODULE` (see `sonodistill.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from sonodistill.config import (
    ImageSize,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Renamed,
    RightOpenUnitInterval,
    TrainingPrecision,
    check_fields,
    checked,
    registered,
)
from sonodistill.errors import UserError
from sonodistill.models.specs import (
    CHECKPOINTS,
    FAMILIES,
    LOGS,
    RANDOM,
    RUN_CONFIG,
    RUN_INFO,
    STUDENT_WEIGHTS,
    EncoderSpec,
    StudentConfig,
    TeacherConfig,
)
from sonodistill.registry import Registry
from sonodistill.utils.rundir import Layout

LOSSES: Registry = Registry(
    "objective",
    key="losses",
    modules=("sonodistill.distill.loss",),
    validate=lambda name, fn: callable(fn),
)
"""Objectives: name -> fn(student map, teacher tokens) -> (loss, {metric: value}); the entry's
title names the loss in plots ("token MSE loss (Eq. 6)")."""
LossName = registered(LOSSES, name="LossName")

AUGMENTATIONS: Registry = Registry(
    "augmentation policy",
    key="augmentations",
    modules=("sonodistill.distill.augment",),
    validate=lambda name, fn: callable(fn),
)
"""Augmentation policies: name -> builder(size) -> module mapping (B, 1, H, W) floats in [0, 1]
to (B, C, size, size); the entry's title names the policy in tables ("US-aware"). The built-in
builders also take `batched=False` (`--augment_batched false`: kornia's per-image path)."""
AugmentationName = registered(AUGMENTATIONS, name="AugmentationName")

DISTILL = Layout(
    "distill",
    owned=(RUN_CONFIG, RUN_INFO, CHECKPOINTS, LOGS, STUDENT_WEIGHTS),
    config=RUN_CONFIG,
    # Device options may change as long as the resolved precision does not (a derived check;
    # the world size may change: the global batch is fixed); data may move as long as it holds
    # the same images; schedules may only get longer; logging, checkpoints and data-loading
    # speed are free.
    free_on_resume=(
        "log_every",
        "stop_check_every",
        "augment_batched",  # the same draws either way; runs started before it resume batched
        "val_every",
        "checkpoint_every",
        "num_workers",
        "prefetch_factor",
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
        "precision",
        "data",
        "epochs",
        "max_steps",
    ),
    resumable=True,
)
"""A distill run folder (file names: `sonodistill.models.specs`, which the `student:` family
reads)."""

Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]

Standardization = Literal["none", "mean_std", "phi_s"]
"""How each teacher's targets are scaled before the objective (`DistillConfig.standardize`)."""


@dataclass
class TeacherTerm:
    """One teacher of a multi-teacher run (`--teachers`): which encoder, and its term of the
    summed objective. The student gets one projection head per teacher, matched at that
    teacher's own token grid (AM-RADIO-style agglomerative distillation)."""

    encoder: str | dict = ""
    """Encoder spec with its weights: `dinov3:FILE`, `sam2:sam2_hiera_base_plus=FILE`,
    `dinov3-convnext:convnext_base=FILE`, `dinov3:random` (smoke runs), or the mapping form
    {family, name, weights, model_kwargs, options} (`sonodistill.models.specs`)."""
    weight: PositiveFloat = 1.0
    """This teacher's weight in the summed objective."""
    n_blocks: PositiveInt = 2
    """Token maps of this many last blocks (stages for ConvNeXt and Hiera), concatenated."""
    norm: bool = True
    """Through the final norm (DINOv3 ViT and ConvNeXt; a SAM2 trunk has none)."""
    loss: LossName | None = None
    """This teacher's objective; empty: the run's --loss."""
    label: str | None = None
    """Name in the logs (LABEL_loss, LABEL_cosine); default: the family, numbered if repeated."""

    def spec(self, option: str = "--teachers") -> EncoderSpec:
        return EncoderSpec.parse(self.encoder, option)

    def teacher_config(self, option: str = "--teachers") -> TeacherConfig:
        """The TeacherConfig that builds this teacher through the normal teacher loader."""
        spec = self.spec(option)
        random = spec.weights == RANDOM
        return TeacherConfig(
            family=spec.family,
            name=spec.name,
            weights=None if random else spec.weights,
            random_init=random,
            n_blocks=self.n_blocks,
            norm=self.norm,
            model_kwargs=dict(spec.model_kwargs),
            options=dict(spec.options),
        )


def teacher_terms(cfg: DistillConfig) -> list[TeacherTerm]:
    """The run's teachers, checked (one UserError line naming the entry): `--teachers`, else
    the single `--teacher` as one term of weight 1 and the run's loss."""
    if not cfg.teachers:
        t = cfg.teacher
        return [TeacherTerm(n_blocks=t.n_blocks, norm=t.norm, label="teacher")]
    return [
        checked(TeacherTerm, _as_mapping(entry), f"--teachers[{i}]")
        for i, entry in enumerate(cfg.teachers)
    ]


def _as_mapping(entry) -> dict:
    return {"encoder": entry} if isinstance(entry, str) else entry


def teacher_labels(terms: list[TeacherTerm]) -> list[str]:
    """Each teacher's name in the logs: its label, else its family (numbered when repeated)."""
    names = [t.label or t.spec().family.replace("-", "_") for t in terms]
    return [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: PositiveFloat = 1e-4
    """AdamW learning rate (the paper's 1e-4)."""
    weight_decay: NonNegativeFloat = 0.05
    """AdamW weight decay."""
    betas: tuple[RightOpenUnitInterval, RightOpenUnitInterval] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """The paper states a fixed AdamW lr; cosine decays to min_lr after warm-up."""
    warmup_steps: NonNegativeInt = 0
    """Steps of linear warm-up from 0 to lr (0: none)."""
    min_lr: NonNegativeFloat = 0.0
    """Where the cosine schedule ends."""
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
    teachers: list[Any] = field(default_factory=list)
    """Several frozen teachers at once (replaces --teacher): a list of encoder specs or of
    mappings {encoder, weight, n_blocks, norm, loss, label} (`TeacherTerm`), e.g.
    '[dinov3:A.pth, {encoder: sam2:sam2_hiera_base_plus=B.pt, n_blocks: 1, weight: 0.5}]'.
    One projection head per teacher, each matched at its teacher's token grid; the weighted
    objectives are summed. Empty: the single --teacher (the paper's recipe)."""
    standardize: Standardization = "none"
    """Per-teacher target scaling from a pass over the first standardize_images training
    images (recorded in run_info.json): none (the paper), mean_std (per channel), phi_s (mean
    per channel, one scale per teacher: PHI-S balancing, see docs/distill.md)."""
    standardize_images: PositiveInt = 256
    """Training images (un-augmented, in order) that the standardisation statistics come from."""
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossName = "token_mse"
    """Objective: token_mse (Eq. 6), token_cosine, token_smooth_l1, or a registered one
    (`sonodistill registry losses`)."""
    image_size: ImageSize = 224
    """Side of the square training input in pixels (a multiple of the teacher's patch, 16)."""
    augment: AugmentationName = "us"
    """Augmentation policy (Sec. 3.4): us (zoom, flip, mild blur: what a probe can do),
    default (ImageNet-style crop, colour jitter, blur), none, or a registered one."""
    augment_batched: bool = True
    """Crop the batch in one op, blur with per-image kernels and colour-jitter in a fixed order:
    no host sync (the same draws; `us` equals the per-image path within 1e-5). false: kornia's
    per-image path of earlier runs, which reads the device back every step."""
    mixup: bool = True
    """Mix each image with another of the batch, lambda ~ U(0, 1) (Eq. 7)."""
    batch_size: PositiveInt = 512
    """Global batch, split evenly across devices and nodes."""
    epochs: PositiveInt = 1
    """Passes over the training images (unless max_steps is set)."""
    max_steps: PositiveInt | None = None
    """Stop after this many optimiser steps (replaces epochs when set)."""
    val_fraction: RightOpenUnitInterval = 0.0
    """Images held out (deterministically) to track loss and cosine without augmentation."""
    val_every: NonNegativeInt = 0
    """Evaluate the held-out images every N steps (0: only at the start and the end)."""
    seed: NonNegativeInt = 0
    """Seeds the student's initialisation, the data order and every augmentation draw."""
    accelerator: Accelerator = "auto"
    """Fabric accelerator: auto (a GPU when there is one), cpu, gpu, cuda or mps."""
    devices: int | str = 1
    """Fabric devices per node: a count, a list such as "0,1", or auto."""
    num_nodes: PositiveInt = 1
    """Machines taking part (the world size is devices x num_nodes)."""
    strategy: str = "auto"
    """Fabric strategy: auto, ddp, ddp_spawn (CPU tests), ..."""
    precision: TrainingPrecision = "auto"
    """auto: bf16 on a GPU, fp32 on a CPU; or fp32, bf16, fp16 (mixed precision: the weights
    stay fp32, the objectives sum in fp32)."""
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
    """Log loss, cosine, lr and images/s every N steps (the host waits for the device only
    then and at checkpoints)."""
    stop_check_every: PositiveInt = 10
    """Ranks agree on a stop signal (SIGUSR1/SIGTERM/SIGINT) every N steps, over a CPU (gloo)
    group across the network: a run of several processes stops at most N steps after the signal
    (one process stops at the next step)."""
    checkpoint_every: PositiveInt = 500
    """Save checkpoints/last.pt every N steps (and at the end and on a stop signal)."""
    resume: bool = False
    """Continue the run in OUT (from checkpoints/last.pt, else previous.pt); a new run when OUT
    holds none. Options that change the run's trajectory must stay as they were; longer
    schedules (epochs, max_steps), logging, checkpoint and worker settings may change."""
    overwrite: bool = False
    """Replace the run in OUT (its config, logs, checkpoints and student) by a new one."""

    deprecated: ClassVar = (
        Renamed("img_size", "image_size"),
        Renamed("precision", values={"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}),
    )


def check_config(cfg: DistillConfig) -> None:
    """Every option that can be checked without reading the data or building a model: a
    UserError naming the first bad one, before anything is written. Ranges and registered names
    are the fields' types (`check_fields`: the same checks as the command line); what is left
    is what crosses fields or reaches files."""
    if not cfg.data:
        raise UserError("--data: no training data; pass an image folder, corpus, manifest or pack")
    if not Path(cfg.data).exists():
        raise UserError(f"--data {cfg.data}: no such file or folder")
    check_fields(cfg)
    family = FAMILIES.get(cfg.student.family, "--student.family")  # the teacher's checks itself
    family.check_name(cfg.student.name, "--student.name")
    files = [("--student.weights", cfg.student.weights), ("--teacher.weights", cfg.teacher.weights)]
    for i, term in enumerate(teacher_terms(cfg) if cfg.teachers else []):
        spec = term.spec(f"--teachers[{i}]")  # the family's own checks: when it is built
        if spec.weights != RANDOM:
            files.append((f"--teachers[{i}]", spec.weights))
    for option, path in files:
        if path and not Path(path).exists():
            raise UserError(f"{option} {path}: no such file")
