"""The distillation recipe (Sec. 3.2-3.5), in the order it runs:

    check    every option, the data and the device setting, before anything is written; then
             the run folder is locked and claimed (a run there needs --resume or --overwrite,
             and a resumed run keeps the options that decide its trajectory)
    data     image folder, corpus or pack -> resumable shards -> uint8 batches on the device
    models   frozen DINOv3 teacher (or several, `--teachers`: `distill.teachers`, their targets
             standardised from a pass over the first images); CNN student with its projection
             head (one per teacher); AdamW + lr schedule
    resume   OUT/checkpoints/last.pt (else previous.pt), with --resume, when it exists
    loop     augment -> mixup -> teacher tokens vs projected student map -> objective -> AdamW;
             logs every log_every steps, validation every val_every steps, checkpoints; stops
             at the step boundary after SIGUSR1/SIGTERM/SIGINT (checkpoint saved), and at the
             next log or checkpoint step after a non-finite loss (nothing saved: the last
             checkpoint stays the last good one)
    finish   a last validation, the exported student backbone, closed logs

The objective is the one `DistillConfig.loss` names (`distill.config.LOSSES`, token MSE of
Eq. 6 by default); the run folder's rules are `distill.config.DISTILL`'s.

Shaped for GPUs without changing the maths: uint8 batches cross the wire (pinned, copied
non-blocking, from persistent workers that prefetch), are normalised on the device, the student
and its input are channels_last, bf16 autocast runs the models while objectives sum in fp32,
AdamW is fused on CUDA, the augmentation and the gradient clip read nothing back, and the host
waits for the device only at log and checkpoint steps, once (`read_back`: the progress bar shows
the last logged loss; a non-finite loss is noted on the device and read there). Ranks agree on a
stop signal every --stop_check_every steps over a small CPU (gloo) group, which never waits for
the GPU. `--compile` (CUDA graphs, static shapes) and `--student.sync_bn` are opt-in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lightning_fabric import Fabric
from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sonodistill.config import config_changes, describe_changes, to_dict
from sonodistill.data.images import ResumableSampler, dataset_identity, open_training_images
from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.checkpoint import load_latest, save_checkpoint, save_weights
from sonodistill.distill.config import (
    DISTILL,
    LOSSES,
    DistillConfig,
    OptimConfig,
    check_config,
)
from sonodistill.distill.loss import Objective
from sonodistill.distill.run import next_log_version, record_ending
from sonodistill.distill.signals import StopRequest, ignore_stop_signals
from sonodistill.distill.teachers import TeacherSet, build_teachers, combined, estimate
from sonodistill.errors import Interrupted, UserError, check
from sonodistill.io import read_json, write_json
from sonodistill.models import Student, Teacher, to_model_input
from sonodistill.models.specs import LAST_CHECKPOINT, LOGS, RUN_INFO, STUDENT_WEIGHTS
from sonodistill.progress import progress_bar
from sonodistill.utils.rundir import RunDir

log = logging.getLogger(__name__)


def distill(cfg: DistillConfig) -> Path:
    """Run (or resume) a distillation; returns the run directory.

    Raises UserError for a bad option, input or run folder (nothing written), Interrupted when
    a signal stopped the run (its checkpoint saved), UserError when the loss stopped being finite.
    """
    check_config(cfg)
    _check_gpu_usable(cfg)
    fabric = _fabric(cfg)
    _check_devices(fabric, cfg)
    dataset = _check_data(cfg, fabric.world_size)
    claim = contextlib.nullcontext()
    if _launcher_is_rank_zero():  # the other ranks follow rank 0's claim
        # The claim checks the folder under its lock (a run in use is named as such) and
        # leaves nothing behind when it refuses.
        claim = _claim(run_dir(cfg), cfg, fabric, dataset)
    with claim:
        outcome = fabric.launch(_run, cfg, dataset)
    if outcome["stopped"]:
        raise Interrupted(
            f"stopped by {outcome['stopped']} at step {outcome['step']} of {outcome['total']}: "
            f"checkpoint saved in {Path(cfg.out) / LAST_CHECKPOINT}; continue with --resume true",
            outcome["exit_code"],
        )
    return Path(cfg.out)


def run_dir(cfg: DistillConfig) -> RunDir:
    """The run folder OUT under the rules of `distill.config.DISTILL`."""
    return RunDir(cfg.out, DISTILL, resume=cfg.resume, overwrite=cfg.overwrite)


def _fabric(cfg: DistillConfig) -> Fabric:
    try:
        return Fabric(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=cfg.strategy,
            precision=resolve_precision(cfg.precision, cfg.accelerator),
        )
    except (ValueError, TypeError, RuntimeError) as err:  # Fabric's word on the device options
        options = "--accelerator/--devices/--num_nodes/--strategy/--precision"
        raise UserError(f"{options}: {str(err).splitlines()[0]}") from err


def _check_gpu_usable(cfg: DistillConfig) -> None:
    """With --accelerator auto, a GPU that the machine shows but torch cannot use (a driver too
    old for torch's CUDA build, a CPU-only torch) is an error naming the fix, not a silent fp32
    run on the CPU of a GPU node. --accelerator cpu, or GPUs hidden on purpose
    (CUDA_VISIBLE_DEVICES empty or -1), train on the CPU."""
    if cfg.accelerator != "auto" or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return
    devices = _nvidia_devices()
    if not devices:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return
    said = "; ".join(str(w.message).strip().splitlines()[0] for w in caught)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise UserError(
        f"--accelerator auto: this machine has an NVIDIA GPU ({devices[0]}) that torch "
        f"{torch.__version__} ({build}) cannot use ({said or 'torch.cuda.is_available() is false'}"
        "); update the NVIDIA driver (CUDA 13 builds need driver 580 or newer) or install the "
        "torch build for your driver, or pass --accelerator cpu to train on the CPU"
    )


def _nvidia_devices() -> list[str]:
    """The NVIDIA GPUs the kernel driver shows (/dev/nvidia0, ...)."""
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def _check_data(cfg: DistillConfig, world_size: int) -> Dataset:
    """The training images (listed once per run: the loop trains on this dataset), checked
    against the batch size and read until one decodes (the loader skips unreadable ones; a
    folder of only unreadable images fails here, before the run folder is claimed, not after the
    run wrote its config and logs)."""
    check(
        cfg.batch_size % world_size == 0,
        "--batch_size",
        cfg.batch_size,
        f"must be divisible by the world size {world_size} (devices x nodes)",
    )
    dataset = open_training_images(cfg.data, cfg.image_size)
    n_train = len(dataset) - _n_val(len(dataset), cfg)
    check(
        n_train >= cfg.batch_size,
        "--batch_size",
        cfg.batch_size,
        f"{cfg.data} has {n_train} training images, fewer than one batch",
    )
    try:
        dataset[0]
    except UserError as err:
        raise UserError(f"--data {cfg.data}: {err}") from None
    return dataset


def _launcher_is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the one that launches it), from the variables
    torchrun, SLURM and Fabric's own launcher set in every rank's environment."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def _claim(run: RunDir, cfg: DistillConfig, fabric: Fabric, dataset: Dataset):
    """Lock OUT for the run; refuse a run there without --resume/--overwrite, and a resume
    that changes the run's trajectory (with the list of changes)."""
    with run.claim():
        if run.resuming:
            _check_resume(run, cfg, fabric, dataset)
        yield


def _check_resume(run: RunDir, cfg: DistillConfig, fabric: Fabric, dataset: Dataset) -> None:
    """The options DISTILL does not free must stay; of the free device and data options, what
    they lead to must stay too (resolved precision, the images), and the schedule may only get
    longer.

    The world size may change: the global batch (--batch_size, fixed) holds the same images
    at every step whatever the number of processes (`ResumableSampler`). What changes is what
    each process does with its share: BatchNorm statistics over fewer or more images (unless
    --student.sync_bn), mixup partners within the share, and the random draws (seeded per step
    and rank). run_info.json records each attempt's world size."""
    old = run.stored_options(DistillConfig)
    if not old:
        return  # stopped before its config was written: nothing to compare
    info = read_json(run / RUN_INFO, "run info") or {}
    if info.get("world_size", fabric.world_size) != fabric.world_size:
        log.warning(
            "resuming with world size %d (was %d): the same global batch of %d; BatchNorm "
            "groups, mixup partners and random draws follow the new per-device share",
            fabric.world_size,
            info["world_size"],
            cfg.batch_size,
        )
    now = {  # run_info.json key: (how the message names it, its value now)
        "precision": ("precision (resolved)", resolve_precision(cfg.precision, cfg.accelerator)),
        "data": ("training images (--data)", dataset_identity(dataset)),
    }
    derived = {name: (info[key], value) for key, (name, value) in now.items() if key in info}
    batches = (len(dataset) - _n_val(len(dataset), cfg)) // cfg.batch_size
    before = _total_steps(old.get("max_steps"), old.get("epochs", 1), batches)
    after = _total_steps(cfg.max_steps, cfg.epochs, batches)
    if after < before:  # longer schedules are fine, shorter ones are another run
        derived["total steps (--epochs/--max_steps)"] = (before, after)
    # As YAML reads them back: tuples nested in --teachers entries are lists there.
    run.check_resume(json.loads(json.dumps(to_dict(cfg))), derived, cls=DistillConfig)


def _total_steps(max_steps: int | None, epochs: int, batches_per_epoch: int) -> int:
    return max_steps if max_steps is not None else epochs * batches_per_epoch


def _loggers(out: str) -> list:
    version = next_log_version(out)
    return [
        CSVLogger(out, name=LOGS, version=version, flush_logs_every_n_steps=1),
        TensorBoardLogger(out, name=LOGS, version=version, default_hp_metric=False),
    ]


FABRIC_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
"""`--precision` -> Lightning Fabric's name (what run_info.json records)."""


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Fabric's precision for `--precision`. auto: bf16 mixed precision on a GPU; fp32 on a
    CPU, where bf16 autocast measured slower here (benchmarks/distill_step.py compares both on
    your machine)."""
    if precision == "auto":
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        precision = "bf16" if on_gpu else "fp32"
    return FABRIC_PRECISION[precision]


@dataclass
class Data:
    loader: DataLoader
    val_loader: DataLoader | None
    sampler: ResumableSampler
    dataset: Dataset  # all images, held-out ones included


@dataclass
class Models:
    teacher: Teacher | TeacherSet
    student: nn.Module  # Fabric-wrapped Student: `.module` is the Student itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    augment: nn.Module
    memory_format: torch.memory_format
    """The student's: channels_last (default) or contiguous; its inputs follow it."""
    compiled: bool = False
    """Whether teacher and student are compiled (`--compile`)."""


def _run(fabric: Fabric, cfg: DistillConfig, dataset: Dataset) -> dict:
    """Every rank's work; returns how it ended: {"stopped": signal name or "", "step", ...}."""
    if fabric.world_size > 1 and fabric.device.type == "cpu":
        _cpu_rank_threads()
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank and every attempt
    # Models first: a bad file or size stops before any write. A teacher sees one input size.
    teacher = build_teachers(cfg)
    teacher.check_input_size(cfg.image_size, "--image_size")
    student = build_student(cfg, teacher.out_channels, fabric.world_size)
    data = build_data(fabric, cfg, dataset)
    total_steps = _total_steps(cfg.max_steps, cfg.epochs, data.sampler.batches_per_epoch)
    models = build_models(fabric, cfg, teacher, student, total_steps)
    step = _resume(fabric, cfg, models, total_steps)
    standardization = _standardize(fabric, cfg, teacher, data)
    # Models built and the checkpoint read: from here on the run writes.
    if fabric.is_global_zero:
        _write_run_files(fabric, cfg, teacher, data, step, standardization)
    fabric.barrier()
    fabric.loggers.extend(_loggers(cfg.out))
    objective = (
        combined(cfg, teacher)
        if isinstance(teacher, TeacherSet)
        else LOSSES.get(cfg.loss, "--loss")
    )
    control = _control_group(fabric)
    status, ending = "failed", "crashed"
    try:
        with StopRequest() as stop:
            step, stopped = _loop(
                fabric, cfg, objective, data, models, step, total_steps, stop, control
            )
        if not stopped:
            _finish(fabric, cfg, objective, data, models, step)
        status = "interrupted" if stopped else "success"
        ending = "stopped" if stopped else "finished"
    except UserError:
        ending = "user error"
        raise
    finally:
        for logger in fabric.loggers:
            logger.finalize(status)
        if fabric.is_global_zero:
            record_ending(cfg.out, ending)
    return {
        "stopped": (stop.name or "a signal to another rank") if stopped else "",
        "exit_code": stop.exit_code,
        "step": step,
        "total": total_steps,
    }


def _cpu_rank_threads() -> None:
    """A CPU rank takes the intra-op threads OMP_NUM_THREADS gives it. Lightning sets them only
    when the variable is unset; a forked rank (ddp_fork) otherwise keeps its parent's count, and
    GNU OpenMP's thread team, copied by the fork without its threads, hangs the rank's first
    parallel op (seen with OMP_NUM_THREADS=1 exported after torch.set_num_threads(2))."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _check_devices(fabric: Fabric, cfg: DistillConfig) -> None:
    """Options that depend on the devices, checked before anything is written."""
    cpu_processes = fabric.world_size > 1 and fabric.device.type == "cpu"
    why = "needs GPUs: torch's SyncBatchNorm has no CPU implementation (use false on CPU)"
    check(not (cfg.student.sync_bn and cpu_processes), "--student.sync_bn", "true", why)


def _write_run_files(
    fabric: Fabric, cfg: DistillConfig, teacher, data: Data, step: int, standardization=None
):
    """config.yaml, and run_info.json with one entry per start (what changed since the last);
    with several teachers or standardised targets, the statistics too."""
    run = run_dir(cfg)
    run.clear()  # --overwrite: the old run's own files (the claim checked and kept the folder)
    previous = run.stored_options(DistillConfig) if cfg.resume else {}
    info = (read_json(run / RUN_INFO, "run info") or {}) if cfg.resume else {}
    previous_info = info
    changes = config_changes(previous, to_dict(cfg)) if previous else {}
    changes = {k: v for k, v in changes.items() if k not in ("resume", "overwrite")}
    attempts = info.get("attempts", []) + [
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": socket.gethostname(),
            "from_step": step,
            "world_size": fabric.world_size,
            "changes": describe_changes(changes),
        }
    ]
    info = {
        "teacher_weights": teacher.weights_info,
        "world_size": fabric.world_size,
        "precision": resolve_precision(cfg.precision, cfg.accelerator),
        "device": str(fabric.device),
        "fused_adamw": _fused_adamw(fabric),
        "torch": torch.__version__,
        "data": dataset_identity(data.dataset),
        "attempts": attempts,
    }
    standardization = standardization or previous_info.get("teacher_standardization")
    if standardization is not None:
        info["teacher_standardization"] = standardization
    run.save_options(cfg)
    write_json(run / RUN_INFO, info)


def build_data(fabric: Fabric, cfg: DistillConfig, dataset: Dataset) -> Data:
    """The training images (`_check_data`'s dataset) sharded by a resumable sampler; held-out
    images without augmentation."""
    train_set, val_set = _split(dataset, cfg)
    per_device = cfg.batch_size // fabric.world_size
    sampler = ResumableSampler(
        len(train_set), per_device, cfg.seed, fabric.global_rank, fabric.world_size
    )
    # uint8 batches in pinned memory; Fabric copies them to the GPU with non_blocking=True.
    # Workers ignore stop signals: the main process saves and stops (distill.signals).
    wire = {
        "num_workers": cfg.num_workers,
        "pin_memory": fabric.device.type == "cuda",
        "worker_init_fn": ignore_stop_signals,
    }
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
    return Data(loader, val_loader, sampler, dataset)


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
        teacher, student = compile_model(teacher), compile_model(student)
    student, optimizer = fabric.setup(student, optimizer)
    augment = build_augmentation(cfg.augment, cfg.image_size, cfg.augment_batched)
    augment = augment.to(fabric.device)
    return Models(teacher, student, optimizer, scheduler, augment, _memory_format(cfg), cfg.compile)


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile for small per-GPU batches: CUDA graphs (`reduce-overhead`) replay the whole
    forward with one launch, and static shapes (`dynamic=False`: every batch, validation ones
    padded, has the training shape) keep it to one compilation per model."""
    return torch.compile(model, mode="reduce-overhead", dynamic=False)


def build_student(
    cfg: DistillConfig, out_channels: int | list[int], world_size: int = 1
) -> nn.Module:
    """The student as the loop trains it: BatchNorm synchronised across processes with
    --student.sync_bn (on more than one), in channels_last unless --channels_last false. Its
    encoder checks the input size (a ViT or Hiera student has a fixed grid). One projection
    head per teacher when `out_channels` is a list (a TeacherSet's)."""
    student = Student(cfg.student, out_channels)
    student.encoder.check_input_size(cfg.image_size, cfg.image_size, "--image_size")
    _freeze_unreached(student, cfg.image_size)
    if cfg.student.sync_bn and world_size > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    return student.to(memory_format=_memory_format(cfg))


def _freeze_unreached(student: Student, size: int) -> None:
    """Freeze the parameters distillation never reaches (timm ConvNeXt's head norm acts after
    pooling, outside the feature map): DDP would wait for their gradients and fail. Found by
    one backward in eval mode (no BatchNorm update, no random draw) at the run's input size;
    they stay in the exported backbone."""
    training = student.training
    student.eval()
    heads = getattr(student, "projections", None)
    grid = [(1, 1)] * len(heads) if heads is not None else (1, 1)
    out = student(torch.zeros(1, 3, size, size), grid)
    total = torch.stack([o.sum() for o in out]).sum() if heads is not None else out.sum()
    total.backward()
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
    """The step to start from: that of the newest readable checkpoint with --resume, else 0."""
    if not cfg.resume or cfg.overwrite:
        return 0
    found = load_latest(Path(cfg.out) / LAST_CHECKPOINT)
    if found is None:
        fabric.print(f"nothing to resume in {cfg.out}: starting at step 0")
        return 0
    state, path = found
    step = int(state["step"])
    if step > total_steps:
        raise UserError(
            f"{path} is at step {step}, past the {total_steps} steps asked for; "
            "ask for at least as many (--epochs/--max_steps)"
        )
    m.student.module.load_state_dict(state["student"])
    m.optimizer.load_state_dict(state["optimizer"])
    m.scheduler.load_state_dict(state["scheduler"])
    if "teacher_stats" in state:  # standardisation: the statistics the run started with
        teacher_set(m.teacher).load_stats(state["teacher_stats"], state["teacher_stats_mode"])
    left = "nothing left to train" if step == total_steps else f"{total_steps - step} to go"
    fabric.print(f"resumed {path} at step {step} of {total_steps}: {step} steps skipped, {left}")
    return step


def _loop(
    fabric,
    cfg: DistillConfig,
    objective,
    data: Data,
    m: Models,
    step: int,
    total_steps: int,
    stop: StopRequest,
    control=None,
):
    """Train from `step` to `total_steps`, or to the step boundary after a stop signal;
    returns the last step done and whether a signal stopped the run."""
    if data.val_loader is not None and step == 0:
        fabric.log_dict(_validate(fabric, m, objective, data.val_loader), step=0)
    batches_per_epoch = data.sampler.batches_per_epoch
    # The first step whose loss was not finite, noted on the device (-1: none yet).
    first_bad = torch.tensor(-1, device=fabric.device)
    saved, stopping = step, False
    with progress_bar(disable=not fabric.is_global_zero) as bar:
        task = bar.add_task("distill", total=total_steps, completed=step, info="")
        tick, images_seen = time.perf_counter(), 0
        while step < total_steps and not stopping:
            data.sampler.set_position(*divmod(step, batches_per_epoch))
            for images in data.loader:
                # Every random draw of a step is a function of (seed, step, rank): a resumed run
                # repeats the interrupted one exactly without storing generator states.
                torch.manual_seed(hash((cfg.seed, step, fabric.global_rank)) % 2**63)
                if cfg.compile:  # the CUDA graphs' outputs of the last step may be reused
                    torch.compiler.cudagraph_mark_step_begin()
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
                bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad, step + 1, first_bad)
                update(fabric, m, cfg.optim.grad_clip)
                step += 1
                images_seen += images.shape[0] * fabric.world_size
                if control is None or step % cfg.stop_check_every == 0 or step == total_steps:
                    stopping = _agree(control, stop.signum is not None)
                checkpoint = step % cfg.checkpoint_every == 0 or step == total_steps or stopping
                logging_step = step % cfg.log_every == 0 or step == total_steps
                if checkpoint or logging_step:
                    # Where the host waits for the device, once: a diverged run stops before it
                    # logs or saves anything (the checkpoint before is its last good one).
                    values = {"loss": loss, **metrics} if logging_step else {}
                    row = read_back(fabric, first_bad, step, saved, cfg, values)
                if logging_step:
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
                if checkpoint:
                    _save_checkpoint(fabric, cfg, m, step)
                    saved = step
                if step >= total_steps or stopping:
                    break
    return step, stopping


def _control_group(fabric: Fabric):
    """The CPU (gloo) group the ranks vote over (`_agree`); None for one process."""
    return dist.new_group(backend="gloo") if fabric.world_size > 1 else None


def update(fabric: Fabric, m: Models, grad_clip: float | None) -> None:
    """AdamW and the lr schedule after a backward, clipping the global gradient norm first when
    `grad_clip` is set. Nothing here reads the device: the clip does not check the norm on the
    host (a non-finite loss is noted on the device and reported at the next log step, with the
    tool's message). fp16 adds one read per step, the loss scaler's inf check."""
    if grad_clip:
        fabric.clip_gradients(m.student, m.optimizer, max_norm=grad_clip, error_if_nonfinite=False)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    m.scheduler.step()


def _agree(control, stopping: bool) -> bool:
    """Whether any rank got a stop signal: all ranks stop after the same step. The flag goes
    over a CPU (gloo) group, so this never waits for the GPU; it runs every
    `--stop_check_every` steps, not every step, as it crosses the network."""
    if control is None:
        return stopping
    flag = torch.tensor([int(stopping)])
    dist.all_reduce(flag, group=control)
    return bool(flag.item())


def read_back(
    fabric: Fabric,
    first_bad: torch.Tensor,
    step: int,
    saved: int,
    cfg,
    values: dict[str, torch.Tensor],
) -> dict[str, float]:
    """The step's one host sync: `values` averaged over ranks, and a UserError naming the first
    step whose loss was not finite on any rank, if any (both reduced on the device first, then
    read in one copy)."""
    bad = fabric.all_reduce(first_bad.where(first_bad >= 0, step + 1).float(), reduce_op="min")
    stacked = [bad.view(1)]
    if values:
        mean = torch.stack([v.detach().float() for v in values.values()])
        stacked.append(fabric.all_reduce(mean, reduce_op="mean"))
    first, *rest = torch.cat(stacked).tolist()
    if int(first) <= step:
        kept = (
            f"its last good checkpoint (step {saved}) is kept in {Path(cfg.out) / LAST_CHECKPOINT}"
            if saved
            else "no checkpoint was saved before"
        )
        raise UserError(
            f"the loss was not finite (nan or inf) at step {int(first)}: run stopped; {kept}; "
            "lower --optim.lr or set --optim.grad_clip and start over (--overwrite true)"
        )
    return dict(zip(values, rest, strict=True))


def _finish(fabric, cfg: DistillConfig, objective, data: Data, m: Models, step: int) -> None:
    """A last validation (unless the loop just ran one) and the student backbone."""
    if data.val_loader is not None and not (cfg.val_every and step % cfg.val_every == 0):
        fabric.log_dict(_validate(fabric, m, objective, data.val_loader), step=step)
    if fabric.is_global_zero:
        save_weights(m.student.module.backbone_state_dict(), Path(cfg.out) / STUDENT_WEIGHTS)
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
        if (teachers := teacher_set(m.teacher)) is not None:
            state["teacher_stats"] = teachers.stats()
            state["teacher_stats_mode"] = teachers.mode
        save_checkpoint(state, Path(cfg.out) / LAST_CHECKPOINT)
    fabric.barrier()


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
        with torch.no_grad():  # as in validation: a compiled teacher sees one grad mode
            target = teacher(x)  # a list with several teachers (distill.teachers), one per head
        pred = student(x.contiguous(memory_format=memory_format), grid_of(target))
    loss, metrics = objective(pred, target)
    fabric.backward(loss)
    return loss, metrics


def teacher_set(teacher) -> TeacherSet | None:
    """The run's TeacherSet (under torch.compile's wrapper too), None for the paper's Teacher."""
    teacher = getattr(teacher, "_orig_mod", teacher)
    return teacher if isinstance(teacher, TeacherSet) else None


def first(maps, n: int):
    """The first n rows of a map (or of each of a list of them: one per teacher)."""
    return maps[:n] if isinstance(maps, torch.Tensor) else [t[:n] for t in maps]


def grid_of(target):
    """The token grid a target map (or each of a list of them) sits on: the student's too."""
    return target.shape[-2:] if isinstance(target, torch.Tensor) else [t.shape[-2:] for t in target]


def _standardize(fabric, cfg: DistillConfig, teacher, data: Data) -> dict | None:
    """Per-teacher statistics for --standardize, from the first --standardize_images training
    images without augmentation (every rank reads the same ones: no exchange). A resumed run
    keeps those its checkpoint holds. None for the single-teacher recipe."""
    if not isinstance(teacher, TeacherSet) or teacher.mode != "none":
        return None  # the paper's recipe, or statistics read back from the checkpoint
    if cfg.standardize == "none":
        return {"mode": "none"}
    train_set, _ = _split(data.dataset, cfg)
    first = Subset(train_set, range(min(cfg.standardize_images, len(train_set))))
    per_device = cfg.batch_size // fabric.world_size
    batches = (
        to_model_input(fabric.to_device(images).float().div_(255))
        for images in DataLoader(first, batch_size=per_device)
    )
    with fabric.autocast():
        return estimate(teacher, batches, cfg.standardize)


@torch.no_grad()
def _validate(fabric, m: Models, objective: Objective, loader) -> dict[str, float]:
    """The objective and its metrics on held-out images (no augmentation or mixup), averaged
    over images and ranks, as val_loss, val_NAME.

    Every batch has the loader's batch size: the last one is padded with copies of its first
    image, whose rows the objective skips (models in eval mode treat images one by one), so that
    a compiled teacher sees one shape. A compiled student validates uncompiled: eval mode and no
    gradients would be one more compilation of it."""
    student = m.student.module if m.compiled else m.student
    m.student.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for images in loader:
        n, short = images.shape[0], loader.batch_size - images.shape[0]
        if short > 0:
            images = torch.cat([images, images[:1].expand(short, *images.shape[1:])])
        x = to_model_input(images.float().div_(255))
        with fabric.autocast():
            target = m.teacher(x)
            pred = student(x.contiguous(memory_format=m.memory_format), grid_of(target))
        loss, metrics = objective(first(pred, n), first(target, n))
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0) + value.float() * n
        count += n
    m.student.train()
    count_t = torch.tensor(float(count), device=fabric.device)
    totals = fabric.all_reduce(torch.stack([*sums.values(), count_t]), reduce_op="sum")
    *totals, count = totals.tolist()
    return {f"val_{name}": total / count for name, total in zip(sums, totals, strict=True)}


def _n_val(n_images: int, cfg: DistillConfig) -> int:
    return max(1, round(n_images * cfg.val_fraction)) if cfg.val_fraction > 0 else 0


def _split(dataset, cfg: DistillConfig):
    if cfg.val_fraction <= 0:
        return dataset, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = _n_val(len(dataset), cfg)
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
