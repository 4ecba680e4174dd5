"""The GPU-shaped distillation step keeps the maths: its loss trajectory equals the one of the
previous step, the host reads the device only at log steps, and the student is built as asked
(channels_last, SyncBatchNorm)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from sonodistill.data.images import ResumableSampler, open_training_images
from sonodistill.distill import OptimConfig, distill, read_metrics
from sonodistill.distill import recipe as recipe_module
from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.config import LOSSES
from sonodistill.distill.recipe import build_student, lr_factor
from sonodistill.errors import UserError
from sonodistill.models import Student, Teacher, to_model_input


def previous_step_trajectory(cfg, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The training loop of distill/recipe.py as it was at commit 44c4db8 (before issue 13),
    written out without Fabric: contiguous (NCHW) student and input, foreach-free AdamW,
    `loss.item()` after every step, a loader without persistent workers; the same seeding
    (model init after `manual_seed(seed)`, every step's draws from (seed, step, rank)).
    Returns the per-step losses and the final backbone weights."""
    torch.manual_seed(cfg.seed)
    teacher = Teacher(cfg.teacher)
    student = Student(cfg.student, teacher.out_channels)
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, steps))
    dataset = open_training_images(cfg.data, cfg.image_size)
    sampler = ResumableSampler(len(dataset), cfg.batch_size, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    augment = build_augmentation(cfg.augment, cfg.image_size)
    objective = LOSSES.get(cfg.loss)
    losses, step = [], 0
    while step < steps:
        sampler.set_position(*divmod(step, sampler.batches_per_epoch))
        for images in loader:
            torch.manual_seed(hash((cfg.seed, step, 0)) % 2**63)
            x = augment(images.float().div_(255))
            if cfg.mixup:
                x, _, _ = mixup(x)
            x = to_model_input(x)
            target = teacher(x)
            loss, _ = objective(student(x, target.shape[-2:]), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
    return losses, student.backbone_state_dict()


def test_new_step_repeats_the_previous_loss_trajectory(three_batches, tmp_path):
    """Seven steps across two epoch boundaries with the `us` augmentation, mixup and a warm-up
    + cosine schedule at the paper's lr: channels_last, two persistent prefetching workers and
    no per-step host read change nothing beyond fp32 rounding (about 1e-7 here; without
    channels_last the two trajectories are bitwise equal). At a 10x higher lr this tiny
    student is chaotic: the same 1e-7 grows to 1e-3 within six steps."""
    cfg = tiny_config(three_batches, tmp_path / "run", max_steps=7, num_workers=2)
    cfg.optim = OptimConfig(lr=1e-4, schedule="cosine", warmup_steps=2, min_lr=1e-5)
    assert cfg.channels_last and cfg.augment == "us" and cfg.mixup
    run = distill(cfg)
    expected, weights = previous_step_trajectory(cfg, 7)
    got = read_metrics(run)
    assert list(got.step) == list(range(1, 8))
    torch.testing.assert_close(
        torch.tensor(got["loss"].to_numpy()),
        torch.tensor(expected, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    assert expected[-1] < 0.9 * expected[0]  # the student did learn
    trained = load_file(str(run / "student_backbone.safetensors"))
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(trained[key], weights[key], rtol=1e-4, atol=1e-5)


def test_the_host_reads_the_loss_only_at_log_steps(three_batches, tmp_path, monkeypatch):
    """Reading a device tensor (`item`, `tolist`, `float`, ...) blocks the host on a GPU; the
    loop may do it only when it logs (every 3rd step here, and the last)."""
    reads: list[int] = []
    step = {"n": 0}
    real_step = recipe_module.train_step

    def counting_step(*args, **kwargs):
        step["n"] += 1
        loss, metrics = real_step(*args, **kwargs)
        watched = {k: _Watched(v, reads, step) for k, v in metrics.items()}
        return _Watched(loss, reads, step), watched

    monkeypatch.setattr(recipe_module, "train_step", counting_step)
    distill(tiny_config(three_batches, tmp_path / "run", max_steps=7, log_every=3, augment="none"))
    assert step["n"] == 7 and sorted(set(reads)) == [3, 6, 7]


class _Watched(torch.Tensor):
    """A tensor that records the step at which the host reads it."""

    @staticmethod
    def __new__(cls, tensor, reads, step):
        out = tensor.as_subclass(cls)
        out._reads, out._step = reads, step
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        host_reads = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
        if getattr(func, "__name__", "") in host_reads:
            watched = next(a for a in args if isinstance(a, cls))
            watched._reads.append(watched._step["n"])
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        # Keep the watch on tensors derived from the loss (stacking, all-reduce, casts).
        if isinstance(out, torch.Tensor) and not isinstance(out, cls):
            watched = next(a for a in _flat(args) if isinstance(a, cls))
            out = _Watched(out, watched._reads, watched._step)
        return out


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def test_student_is_channels_last_and_sync_bn_spans_processes():
    cfg = tiny_config("unused", "unused")
    single = build_student(cfg, 96, world_size=1)
    assert single.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())
    cfg.student.sync_bn = True
    assert not any(
        isinstance(m, nn.SyncBatchNorm) for m in build_student(cfg, 96, world_size=1).modules()
    )  # one process: plain BatchNorm, nothing to synchronise
    synced = build_student(cfg, 96, world_size=2)
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 20 and all(isinstance(m, nn.SyncBatchNorm) for m in bns)  # ResNet-18
    cfg.channels_last = False
    assert build_student(cfg, 96).backbone.conv1.weight.is_contiguous()


def test_sync_bn_on_cpu_processes_is_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", accelerator="cpu", devices=2)
    cfg.strategy, cfg.student.sync_bn = "ddp_fork", True
    with pytest.raises(UserError, match="sync_bn true: needs GPUs"):
        distill(cfg)
    assert not (tmp_path / "run").exists()
