"""The GPU-shaped distillation step keeps the maths: its loss trajectory equals the one of the
previous step, the host reads the device once per log step and never between, and the student
is built as asked (channels_last, SyncBatchNorm)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters, guard_failures
from torch.utils.data import DataLoader

from sonodistill.data.images import ResumableSampler, open_training_images
from sonodistill.distill import OptimConfig, distill, read_metrics
from sonodistill.distill import recipe as recipe_module
from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.config import LOSSES
from sonodistill.distill.host_sync import HostReads
from sonodistill.distill.recipe import build_student, lr_factor
from sonodistill.errors import UserError
from sonodistill.models import Student, Teacher, to_model_input


def previous_step_trajectory(cfg, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The training loop of distill/recipe.py as it was at commit 44c4db8 (before issue 13),
    written out without Fabric: contiguous (NCHW) student and input, foreach-free AdamW,
    `loss.item()` after every step, a loader without persistent workers, kornia's per-image
    augmentation (`batched=False`) and a teacher of any input size (its RoPE grid rebuilt every
    forward); the same seeding (model init after `manual_seed(seed)`, every step's draws from
    (seed, step, rank)).
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
    augment = build_augmentation(cfg.augment, cfg.image_size, batched=False)
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
    + cosine schedule at the paper's lr: channels_last, two persistent prefetching workers, no
    per-step host read, the batched crop (1e-5 from kornia's per-image one, the same draws) and
    the fixed-size teacher change nothing beyond rounding (about 1e-6 here). At a 10x higher lr
    this tiny student is chaotic: the same 1e-7 grows to 1e-3 within six steps."""
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
    # The batched crop's 1e-5 pixel differences reach single weights: up to 4e-4 in 0.3 % of
    # the elements after 7 steps (seen in a full suite run), the losses staying within 1e-5.
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(trained[key], weights[key], rtol=1e-3, atol=1e-3)


def test_the_host_waits_for_the_device_once_per_log_step_and_never_between(
    three_batches, tmp_path, monkeypatch
):
    """Every read of a tensor's values in the loop (`HostReads`: what would make the host wait
    for a GPU), step by step, with the `us` augmentation, mixup and gradient clipping: one per
    log step (every 3rd and the last), where loss, metrics and the non-finite check are read
    in one copy, and none between."""
    marks: list[int] = []  # the reads counted before each step's train_step, and at the end
    box: dict[str, HostReads] = {}
    real_loop, real_step = recipe_module._loop, recipe_module.train_step

    def counting_step(*args, **kwargs):
        marks.append(box["reads"].count)  # reads before step n's train_step: of step n - 1
        return real_step(*args, **kwargs)

    def counting_loop(fabric, cfg, objective, data, m, *args, **kwargs):
        with HostReads([m.optimizer]) as box["reads"]:
            out = real_loop(fabric, cfg, objective, data, m, *args, **kwargs)
        marks.append(box["reads"].count)
        return out

    monkeypatch.setattr(recipe_module, "train_step", counting_step)
    monkeypatch.setattr(recipe_module, "_loop", counting_loop)
    cfg = tiny_config(three_batches, tmp_path / "run", max_steps=7, log_every=3)
    cfg.optim.grad_clip = 1.0
    distill(cfg)
    per_step = {
        step: box["reads"].where[marks[step - 1] : marks[step]] for step in range(1, len(marks))
    }
    one = ["tolist in sonodistill.distill.recipe.read_back"]
    assert marks[0] == 0 and per_step == {1: [], 2: [], 3: one, 4: [], 5: [], 6: one, 7: one}


def test_ranks_vote_on_a_stop_signal_every_n_steps(three_batches, tmp_path, monkeypatch):
    """The stop vote crosses the network: every --stop_check_every steps (and the last), not
    every step. A stand-in group makes one process vote as a rank of several would."""
    votes: list[int] = []
    real_step, steps = recipe_module.train_step, {"n": 0}

    def step(*args, **kwargs):
        steps["n"] += 1
        return real_step(*args, **kwargs)

    def agree(control, stopping):
        assert control == "group"
        votes.append(steps["n"])
        return stopping

    monkeypatch.setattr(recipe_module, "train_step", step)
    monkeypatch.setattr(recipe_module, "_control_group", lambda fabric: "group")
    monkeypatch.setattr(recipe_module, "_agree", agree)
    cfg = tiny_config(three_batches, tmp_path / "run", max_steps=7, augment="none")
    cfg.stop_check_every, cfg.log_every = 3, 10
    distill(cfg)
    assert votes == [3, 6, 7]


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


@pytest.mark.slow
def test_compile_compiles_each_model_once(three_batches, tmp_path, monkeypatch):
    """--compile asks for CUDA graphs (`reduce-overhead`) and static shapes; nothing compiles
    twice, and nothing after the first step: not the validations (the step-0 one, a short last
    batch padded to the training shape, the student uncompiled in eval mode), not the later
    steps. Compiled with
    dynamo's `aot_eager` backend here: the guards that decide a recompilation are dynamo's
    whatever the backend, and inductor takes about 3 minutes on 2 cores for this run."""
    real_compile, asked, after_step = torch.compile, [], []

    def compile_(model, **kwargs):
        if "backend" not in kwargs:  # ours; Fabric re-applies it with the backend below
            asked.append(kwargs)
            kwargs = {"backend": "aot_eager", "dynamic": kwargs["dynamic"]}
        return real_compile(model, **kwargs)

    real_step = recipe_module.train_step

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        after_step.append(counters["frames"]["total"])
        return out

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(recipe_module, "train_step", step)
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    cfg = tiny_config(three_batches, tmp_path / "run", max_steps=4, image_size=32, compile=True)
    cfg.val_fraction, cfg.val_every = 0.45, 2  # 11 held-out images: batches of 8 and 3
    distill(cfg)
    assert asked == [{"mode": "reduce-overhead", "dynamic": False}] * 2
    assert not guard_failures, [reasons for reasons in guard_failures.values()]  # no recompile
    assert len(after_step) == 4 and after_step[0] == after_step[-1] == counters["frames"]["ok"]
    assert set(read_metrics(tmp_path / "run").dropna(subset=["val_loss"]).step) == {0, 2, 4}
