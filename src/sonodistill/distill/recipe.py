"""The distillation recipe (Sec. 3.2-3.5), in the order it runs:

    data     image folder, corpus or pack -> resumable shards -> uint8 batches on the device
    models   frozen DINOv3 teacher; CNN student with its projection head; AdamW + lr schedule
    resume   OUT/checkpoints/last.pt, with --resume, when it exists
    loop     augment -> mixup -> teacher tokens vs projected student map -> objective -> AdamW;
             logs every log_every steps, validation every val_every steps, checkpoints
    finish   a last validation, the exported student backbone, closed logs

The objective is the one `DistillConfig.loss` names (`sonodistill.distill.loss`, token MSE of
Eq. 6 by default); the run folder's layout is `sonodistill.distill.run`'s.

Shaped for GPUs without changing the maths: uint8 batches cross the wire (pinned, copied
non-blocking, from persistent workers that prefetch), are normalised on the device, the student
and its input are channels_last, bf16 autocast runs the models while objectives sum in fp32,
AdamW is fused on CUDA, and the host waits for the device only at log steps (the progress bar
shows the last logged loss). `--compile` and `--student.sync_bn` are opt-in.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from sonodistill.config import save_config, to_dict
from sonodistill.data.images import ResumableSampler, open_training_images
from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.checkpoint import atomic_save, load_checkpoint
from sonodistill.distill.config import DistillConfig, OptimConfig
from sonodistill.distill.loss import Objective, get_loss
from sonodistill.distill.run import (
    CONFIG,
    LAST_CHECKPOINT,
    LOGS,
    RUN_INFO,
    STUDENT_WEIGHTS,
    next_log_version,
)
from sonodistill.errors import check, check_positive
from sonodistill.models import Student, Teacher, to_model_input
from sonodistill.progress import progress_bar

log = logging.getLogger(__name__)


def distill(cfg: DistillConfig) -> Path:
    """Run (or resume) a distillation; returns the run directory."""
    if not cfg.data:
        raise ValueError("no training data: pass --data FOLDER|CORPUS|MANIFEST|PACK")
    get_loss(cfg.loss)  # an unknown objective is refused before anything is written
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        loggers=_loggers(cfg.out),
    )
    _check_devices(fabric, cfg)
    fabric.launch(_run, cfg)
    return Path(cfg.out)


def _loggers(out: str) -> list:
    version = next_log_version(out)
    return [
        CSVLogger(out, name=LOGS, version=version, flush_logs_every_n_steps=1),
        TensorBoardLogger(out, name=LOGS, version=version, default_hp_metric=False),
    ]


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """auto: bf16-mixed on a GPU; fp32 on a CPU, where bf16 autocast measured slower here
    (benchmarks/distill_step.py compares both on your machine)."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


@dataclass
class Data:
    loader: DataLoader
    val_loader: DataLoader | None
    sampler: ResumableSampler


@dataclass
class Models:
    teacher: Teacher
    student: nn.Module  # Fabric-wrapped Student: `.module` is the Student itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    augment: nn.Module
    memory_format: torch.memory_format
    """The student's: channels_last (default) or contiguous; its inputs follow it."""


def _run(fabric: Fabric, cfg: DistillConfig) -> None:
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank and every attempt
    teacher = Teacher(cfg.teacher)  # models first: a bad file or size stops before any write
    teacher.check_input_size(cfg.img_size)
    student = build_student(cfg, teacher.out_channels, fabric.world_size)
    if fabric.is_global_zero:
        _write_run_files(fabric, cfg, teacher)
    data = build_data(fabric, cfg)
    total_steps = cfg.max_steps or cfg.epochs * data.sampler.batches_per_epoch
    models = build_models(fabric, cfg, teacher, student, total_steps)
    step = _resume(fabric, cfg, models, total_steps)
    objective = get_loss(cfg.loss).fn
    step = _loop(fabric, cfg, objective, data, models, step, total_steps)
    _finish(fabric, cfg, objective, data, models, step)


def _check_devices(fabric: Fabric, cfg: DistillConfig) -> None:
    """Options that depend on the devices, checked before anything is written."""
    check_positive({"--prefetch_factor": cfg.prefetch_factor})
    cpu_processes = fabric.world_size > 1 and fabric.device.type == "cpu"
    why = "needs GPUs: torch's SyncBatchNorm has no CPU implementation (use false on CPU)"
    check(not (cfg.student.sync_bn and cpu_processes), "--student.sync_bn", "true", why)


def _write_run_files(fabric: Fabric, cfg: DistillConfig, teacher: Teacher) -> None:
    out = Path(cfg.out)
    save_config(cfg, out / CONFIG)
    info = {
        "teacher_weights": teacher.weights_info,
        "world_size": fabric.world_size,
        "precision": resolve_precision(cfg.precision, cfg.accelerator),
        "device": str(fabric.device),
        "fused_adamw": _fused_adamw(fabric),
        "torch": torch.__version__,
    }
    (out / RUN_INFO).write_text(json.dumps(info, indent=2))


def build_data(fabric: Fabric, cfg: DistillConfig) -> Data:
    """Training images sharded by a resumable sampler; held-out images without augmentation."""
    train_set, val_set = _split(open_training_images(cfg.data, cfg.img_size), cfg)
    if cfg.batch_size % fabric.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {fabric.world_size}")
    per_device = cfg.batch_size // fabric.world_size
    sampler = ResumableSampler(
        len(train_set), per_device, cfg.seed, fabric.global_rank, fabric.world_size
    )
    # uint8 batches in pinned memory; Fabric copies them to the GPU with non_blocking=True.
    wire = {"num_workers": cfg.num_workers, "pin_memory": fabric.device.type == "cuda"}
    loader = DataLoader(
        train_set,
        batch_size=per_device,
        sampler=sampler,
        drop_last=True,
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        **wire,
    )
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    val_loader = None
    if val_set is not None:
        val_loader = fabric.setup_dataloaders(DataLoader(val_set, batch_size=per_device, **wire))
    return Data(loader, val_loader, sampler)


def build_models(
    fabric: Fabric, cfg: DistillConfig, teacher: Teacher, student: Student, total_steps: int
) -> Models:
    """Teacher on the device, the student (backbone + projection head to the teacher's width),
    AdamW with its lr schedule, and the batch augmentation."""
    teacher = fabric.to_device(teacher)
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
        fused=_fused_adamw(fabric),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, total_steps))
    if cfg.compile:  # Fabric re-applies the compilation around its DDP wrapper
        teacher, student = torch.compile(teacher), torch.compile(student)
    student, optimizer = fabric.setup(student, optimizer)
    augment = build_augmentation(cfg.augment, cfg.img_size).to(fabric.device)
    return Models(teacher, student, optimizer, scheduler, augment, _memory_format(cfg))


def build_student(cfg: DistillConfig, out_channels: int, world_size: int = 1) -> nn.Module:
    """The student as the loop trains it: BatchNorm synchronised across processes with
    --student.sync_bn (on more than one), in channels_last unless --channels_last false."""
    student = Student(cfg.student, out_channels)
    _freeze_unreached(student)
    if cfg.student.sync_bn and world_size > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    return student.to(memory_format=_memory_format(cfg))


def _freeze_unreached(student: Student) -> None:
    """Freeze the parameters distillation never reaches (timm ConvNeXt's head norm acts after
    pooling, outside the feature map): DDP would wait for their gradients and fail. Found by
    one backward in eval mode (no BatchNorm update); they stay in the exported backbone."""
    training = student.training
    student.eval()
    student(torch.zeros(1, 3, 64, 64), (1, 1)).sum().backward()
    for param in student.parameters():
        if param.grad is None:
            param.requires_grad_(False)
        param.grad = None
    student.train(training)


def _fused_adamw(fabric: Fabric) -> bool:
    """AdamW's single fused kernel on CUDA; torch's default (foreach) elsewhere."""
    return fabric.device.type == "cuda"


def _memory_format(cfg: DistillConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def _resume(fabric: Fabric, cfg: DistillConfig, m: Models, total_steps: int) -> int:
    """The step to start from: that of OUT/checkpoints/last.pt with --resume, else 0."""
    checkpoint = Path(cfg.out) / LAST_CHECKPOINT
    if not (cfg.resume and checkpoint.is_file()):
        return 0
    state = load_checkpoint(checkpoint)
    m.student.module.load_state_dict(state["student"])
    m.optimizer.load_state_dict(state["optimizer"])
    m.scheduler.load_state_dict(state["scheduler"])
    fabric.print(f"resumed {checkpoint} at step {state['step']}/{total_steps}")
    return state["step"]


def _loop(
    fabric, cfg: DistillConfig, objective, data: Data, m: Models, step: int, total_steps: int
):
    """Train from `step` to `total_steps`; returns the last step."""
    if data.val_loader is not None and step == 0:
        fabric.log_dict(_validate(fabric, m, objective, data.val_loader), step=0)
    batches_per_epoch = data.sampler.batches_per_epoch
    with progress_bar(disable=not fabric.is_global_zero) as bar:
        task = bar.add_task("distill", total=total_steps, completed=step, info="")
        tick, images_seen = time.perf_counter(), 0
        while step < total_steps:
            data.sampler.set_position(*divmod(step, batches_per_epoch))
            for images in data.loader:
                # Every random draw of a step is a function of (seed, step, rank): a resumed run
                # repeats the interrupted one exactly without storing generator states.
                torch.manual_seed(hash((cfg.seed, step, fabric.global_rank)) % 2**63)
                loss, metrics = train_step(
                    fabric,
                    m.teacher,
                    m.student,
                    m.augment,
                    objective,
                    images,
                    cfg.mixup,
                    m.memory_format,
                )
                if cfg.optim.grad_clip:
                    fabric.clip_gradients(m.student, m.optimizer, max_norm=cfg.optim.grad_clip)
                m.optimizer.step()
                m.optimizer.zero_grad(set_to_none=True)
                m.scheduler.step()
                step += 1
                images_seen += images.shape[0] * fabric.world_size
                if step % cfg.log_every == 0 or step == total_steps:
                    # The only point where the host waits for the device.
                    row = _mean_over_ranks(fabric, {"loss": loss, **metrics})
                    elapsed = time.perf_counter() - tick
                    row["lr"] = m.scheduler.get_last_lr()[0]
                    row["images_per_s"] = images_seen / max(elapsed, 1e-9)
                    row["epoch"] = step / batches_per_epoch
                    fabric.log_dict(row, step=step)
                    bar.update(task, info=f"loss {row['loss']:.4f}")
                    tick, images_seen = time.perf_counter(), 0
                bar.update(task, completed=step)
                if data.val_loader is not None and cfg.val_every and step % cfg.val_every == 0:
                    fabric.log_dict(_validate(fabric, m, objective, data.val_loader), step=step)
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    _save_checkpoint(fabric, cfg, m, step)
                if step >= total_steps:
                    break
    return step


def _finish(fabric, cfg: DistillConfig, objective, data: Data, m: Models, step: int) -> None:
    """A last validation (unless the loop just ran one), the student backbone, closed logs."""
    if data.val_loader is not None and not (cfg.val_every and step % cfg.val_every == 0):
        fabric.log_dict(_validate(fabric, m, objective, data.val_loader), step=step)
    if fabric.is_global_zero:
        atomic_save(m.student.module.backbone_state_dict(), Path(cfg.out) / STUDENT_WEIGHTS)
    for logger in fabric.loggers:
        logger.finalize("success")
    fabric.barrier()


def _save_checkpoint(fabric: Fabric, cfg: DistillConfig, m: Models, step: int) -> None:
    if fabric.is_global_zero:
        state = {
            "student": m.student.module.state_dict(),
            "optimizer": m.optimizer.state_dict(),
            "scheduler": m.scheduler.state_dict(),
            "step": step,
            "config": to_dict(cfg),
        }
        atomic_save(state, Path(cfg.out) / LAST_CHECKPOINT)
    fabric.barrier()


def _mean_over_ranks(fabric: Fabric, values: dict[str, torch.Tensor]) -> dict[str, float]:
    stacked = torch.stack([v.detach().float() for v in values.values()])
    stacked = fabric.all_reduce(stacked, reduce_op="mean")
    return dict(zip(values, stacked.tolist(), strict=True))


def train_step(
    fabric,
    teacher,
    student,
    augment,
    objective: Objective,
    images,
    use_mixup: bool,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    """One forward/backward on a uint8 batch already on the device; returns the loss and the
    objective's metrics, as device tensors (reading them waits for the device)."""
    x = augment(images.float().div_(255))
    if use_mixup:
        x, _, _ = mixup(x)
    x = to_model_input(x)  # the same mixed view goes to teacher and student (Sec. 3.3)
    with fabric.autocast():
        target = teacher(x)
        pred = student(x.contiguous(memory_format=memory_format), target.shape[-2:])
    loss, metrics = objective(pred, target)
    fabric.backward(loss)
    return loss, metrics


@torch.no_grad()
def _validate(fabric, m: Models, objective: Objective, loader) -> dict[str, float]:
    """The objective and its metrics on held-out images (no augmentation or mixup), averaged
    over images and ranks, as val_loss, val_NAME."""
    m.student.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for images in loader:
        x = to_model_input(images.float().div_(255))
        with fabric.autocast():
            target = m.teacher(x)
            pred = m.student(x.contiguous(memory_format=m.memory_format), target.shape[-2:])
        loss, metrics = objective(pred, target)
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0) + value.float() * x.shape[0]
        count += x.shape[0]
    m.student.train()
    count_t = torch.tensor(float(count), device=fabric.device)
    totals = fabric.all_reduce(torch.stack([*sums.values(), count_t]), reduce_op="sum")
    return {f"val_{name}": (totals[i] / totals[-1]).item() for i, name in enumerate(sums)}


def _split(dataset, cfg: DistillConfig):
    if cfg.val_fraction <= 0:
        return dataset, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, round(len(dataset) * cfg.val_fraction))
    return Subset(dataset, order[n_val:].tolist()), Subset(dataset, order[:n_val].tolist())


def lr_factor(optim: OptimConfig, total_steps: int):
    """Linear warm-up, then constant or cosine decay to min_lr (a factor of the base lr)."""
    floor = optim.min_lr / optim.lr if optim.lr else 0.0

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
