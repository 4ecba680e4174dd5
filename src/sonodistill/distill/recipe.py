"""The distillation recipe, end to end in one readable loop (Sec. 3.2-3.5).

data -> batched augmentation on the device -> mixup -> frozen teacher tokens vs projected student
map -> token-wise MSE -> AdamW; checkpoints, logs and the exported student in one run directory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from sonodistill.config import save_config, to_dict
from sonodistill.data.images import ResumableSampler, open_training_images
from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.checkpoint import atomic_save, load_checkpoint
from sonodistill.distill.config import DistillConfig, OptimConfig
from sonodistill.distill.loss import token_cosine, token_mse
from sonodistill.distill.run import (
    CONFIG,
    LAST_CHECKPOINT,
    LOGS,
    RUN_INFO,
    STUDENT_WEIGHTS,
    next_log_version,
)
from sonodistill.models import Student, Teacher, to_model_input
from sonodistill.progress import progress_bar

log = logging.getLogger(__name__)


def distill(cfg: DistillConfig) -> Path:
    """Run (or resume) a distillation; returns the run directory."""
    if not cfg.data:
        raise ValueError("no training data: pass --data FOLDER|CORPUS|MANIFEST|PACK")
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        loggers=_loggers(cfg.out),
    )
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


def _run(fabric: Fabric, cfg: DistillConfig) -> None:
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank and every attempt
    teacher = Teacher(cfg.teacher)
    if fabric.is_global_zero:
        save_config(cfg, out / CONFIG)
        info = {
            "teacher_weights": teacher.weights_source,
            "world_size": fabric.world_size,
            "precision": resolve_precision(cfg.precision, cfg.accelerator),
            "device": str(fabric.device),
            "torch": torch.__version__,
        }
        (out / RUN_INFO).write_text(json.dumps(info, indent=2))

    train_set, val_set = _split(open_training_images(cfg.data, cfg.img_size), cfg)
    if cfg.batch_size % fabric.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {fabric.world_size}")
    per_device = cfg.batch_size // fabric.world_size
    sampler = ResumableSampler(
        len(train_set), per_device, cfg.seed, fabric.global_rank, fabric.world_size
    )
    loader = DataLoader(
        train_set,
        batch_size=per_device,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=fabric.device.type == "cuda",
        drop_last=True,
    )
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    val_loader = None
    if val_set is not None:
        val_loader = fabric.setup_dataloaders(
            DataLoader(val_set, batch_size=per_device, num_workers=cfg.num_workers)
        )
    total_steps = cfg.max_steps or cfg.epochs * sampler.batches_per_epoch

    teacher = fabric.to_device(teacher)
    student = Student(cfg.student, teacher.out_channels)
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, total_steps))
    student, optimizer = fabric.setup(student, optimizer)
    augment = build_augmentation(cfg.augment, cfg.img_size).to(fabric.device)

    step = 0
    checkpoint = out / LAST_CHECKPOINT
    if cfg.resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        student.module.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        fabric.print(f"resumed {checkpoint} at step {step}/{total_steps}")

    if val_loader is not None and step == 0:
        fabric.log_dict(_validate(fabric, teacher, student, val_loader), step=0)

    def save() -> None:
        if fabric.is_global_zero:
            state = {
                "student": student.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "config": to_dict(cfg),
            }
            atomic_save(state, checkpoint)
        fabric.barrier()

    with progress_bar(disable=not fabric.is_global_zero) as bar:
        task = bar.add_task("distill", total=total_steps, completed=step, info="")
        tick, images_seen = time.perf_counter(), 0
        while step < total_steps:
            sampler.set_position(*divmod(step, sampler.batches_per_epoch))
            for images in loader:
                # Every random draw of a step is a function of (seed, step, rank): a resumed run
                # repeats the interrupted one exactly without storing generator states.
                torch.manual_seed(hash((cfg.seed, step, fabric.global_rank)) % 2**63)
                loss, cosine = train_step(fabric, teacher, student, augment, images, cfg.mixup)
                if cfg.optim.grad_clip:
                    fabric.clip_gradients(student, optimizer, max_norm=cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                images_seen += images.shape[0] * fabric.world_size
                bar.update(task, completed=step, info=f"loss {loss.item():.4f}")
                if step % cfg.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - tick
                    metrics = {
                        "loss": fabric.all_reduce(loss.detach(), reduce_op="mean").item(),
                        "cosine": fabric.all_reduce(cosine, reduce_op="mean").item(),
                        "lr": scheduler.get_last_lr()[0],
                        "images_per_s": images_seen / max(elapsed, 1e-9),
                        "epoch": step / sampler.batches_per_epoch,
                    }
                    fabric.log_dict(metrics, step=step)
                    tick, images_seen = time.perf_counter(), 0
                if val_loader is not None and cfg.val_every and step % cfg.val_every == 0:
                    fabric.log_dict(_validate(fabric, teacher, student, val_loader), step=step)
                if step % cfg.checkpoint_every == 0 or step == total_steps:
                    save()
                if step >= total_steps:
                    break

    if val_loader is not None and not (cfg.val_every and step % cfg.val_every == 0):
        fabric.log_dict(_validate(fabric, teacher, student, val_loader), step=step)
    if fabric.is_global_zero:
        atomic_save(student.module.backbone_state_dict(), out / STUDENT_WEIGHTS)
    for logger in fabric.loggers:
        logger.finalize("success")
    fabric.barrier()


def train_step(fabric, teacher, student, augment, images, use_mixup: bool):
    """One forward/backward on a uint8 batch; returns (loss, mean token cosine)."""
    x = augment(images.float().div_(255))
    if use_mixup:
        x, _, _ = mixup(x)
    x = to_model_input(x)  # the same mixed view goes to teacher and student (Sec. 3.3)
    with fabric.autocast():
        target = teacher(x)
        pred = student(x, target.shape[-2:])
    loss = token_mse(pred, target)
    fabric.backward(loss)
    return loss, token_cosine(pred.detach(), target)


@torch.no_grad()
def _validate(fabric, teacher, student, loader) -> dict[str, float]:
    """Loss and cosine on held-out images, no augmentation or mixup."""
    student.eval()
    totals = torch.zeros(3, device=fabric.device)
    for images in loader:
        x = to_model_input(images.float().div_(255))
        with fabric.autocast():
            target = teacher(x)
            pred = student(x, target.shape[-2:])
        n = x.shape[0]
        totals += torch.stack(
            [
                token_mse(pred, target) * n,
                token_cosine(pred, target) * n,
                torch.tensor(n, device=fabric.device, dtype=torch.float),
            ]
        )
    student.train()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    return {
        "val_loss": (totals[0] / totals[2]).item(),
        "val_cosine": (totals[1] / totals[2]).item(),
    }


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
