"""DDP proven on CPU with two gloo processes: both ranks hold the same weights, their shards are
disjoint and cover each epoch, two processes of 4 images train like one of 8, and a DDP run
resumed after a crash repeats the straight one.

The processes are forked (`ddp_fork`), so the recorders patched in below run inside them: each
rank dumps its student and the indices its sampler gave to RUN/rank{R}.pt at the end.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from sonodistill.data.images import ResumableSampler
from sonodistill.distill import distill, read_metrics
from sonodistill.distill import recipe as recipe_module
from sonodistill.models import StudentConfig

TWO_CPU_PROCESSES = {
    "accelerator": "cpu",
    "devices": 2,
    "strategy": "ddp_fork",
    "precision": "fp32",
}


class RecordingSampler(ResumableSampler):
    def __iter__(self):
        indices = list(super().__iter__())
        self.seen = [*getattr(self, "seen", []), (self.epoch, self.start_batch, indices)]
        return iter(indices)


@pytest.fixture
def rank_dumps(monkeypatch):
    """Every rank of every run writes RUN/rank{R}.pt: its student state and sampler history."""
    real_finish = recipe_module._finish

    def finish(fabric, cfg, objective, data, m, step):
        dump = {
            "student": {k: v.clone() for k, v in m.student.module.state_dict().items()},
            "seen": data.sampler.seen,
            "step": step,
        }
        torch.save(dump, f"{cfg.out}/rank{fabric.global_rank}.pt")
        real_finish(fabric, cfg, objective, data, m, step)

    monkeypatch.setattr(recipe_module, "ResumableSampler", RecordingSampler)
    monkeypatch.setattr(recipe_module, "_finish", finish)
    return lambda run, rank: torch.load(run / f"rank{rank}.pt", weights_only=False)


def params(state: dict) -> dict:
    """Parameters only: BatchNorm running statistics are updated by each rank from its own
    images after the last broadcast (DDP copies rank 0's buffers at every forward)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def test_two_processes_train_like_one_process_with_the_same_global_batch(
    three_batches, tmp_path, rank_dumps
):
    """2 ranks x 4 images vs 1 process x 8, six steps (two epochs of 24 real frames).

    The comparison needs per-image maths on both sides: a BatchNorm student would normalise
    over 4 images per rank here and over 8 in one process (different statistics, by design;
    --student.sync_bn makes them global on GPUs, and torch has no CPU SyncBatchNorm), and each
    rank draws its own crops and mixup partners. So this test uses ConvNeXt-Atto (LayerNorm:
    per image), no augmentation and no mixup; the resume test below keeps all three."""
    common = {
        "max_steps": 6,
        "image_size": 32,
        "augment": "none",
        "mixup": False,
        "student": StudentConfig(name="convnext_atto"),
    }
    ddp = distill(tiny_config(three_batches, tmp_path / "ddp", **common, **TWO_CPU_PROCESSES))
    one = distill(tiny_config(three_batches, tmp_path / "one", accelerator="cpu", **common))
    rank0, rank1, single = rank_dumps(ddp, 0), rank_dumps(ddp, 1), rank_dumps(one, 0)

    # Identical weights on both ranks, bit for bit.
    assert json.loads((ddp / "run_info.json").read_text())["world_size"] == 2
    assert rank0["step"] == rank1["step"] == 6
    for key, value in rank0["student"].items():
        assert torch.equal(value, rank1["student"][key]), key

    # Disjoint shards that together cover every epoch, the same global batch as one process.
    assert [e for e, _, _ in rank0["seen"]] == [e for e, _, _ in rank1["seen"]] == [0, 1]
    for (epoch, _, mine), (_, _, theirs), (_, _, whole) in zip(
        rank0["seen"], rank1["seen"], single["seen"], strict=True
    ):
        assert len(mine) == len(theirs) == 12 and not set(mine) & set(theirs), epoch
        assert set(mine) | set(theirs) == set(range(24))
        for step in range(3):  # step by step: the 8 images of the one process
            batch = set(mine[4 * step : 4 * step + 4]) | set(theirs[4 * step : 4 * step + 4])
            assert batch == set(whole[8 * step : 8 * step + 8])

    # The same trajectory and the same student as one process.
    got, expected = read_metrics(ddp), read_metrics(one)
    assert list(got.step) == list(expected.step) == [1, 2, 3, 4, 5, 6]
    for column in ("loss", "cosine"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()),
            torch.tensor(expected[column].to_numpy()),
            rtol=1e-5,
            atol=1e-6,
        )
    assert got["loss"].iloc[-1] < 0.9 * got["loss"].iloc[0]
    for key, value in single["student"].items():
        torch.testing.assert_close(rank0["student"][key], value, rtol=1e-4, atol=1e-5)


def test_a_run_resumes_with_another_world_size_and_the_same_global_batch(three_batches, tmp_path):
    """Three steps in one process, three more in two (each its half of the same global batch of
    8): allowed, recorded per attempt, and with per-image maths (ConvNeXt's LayerNorm, no
    augmentation, no mixup) the trajectory of six steps in one process. With BatchNorm, mixup
    or augmentation the per-device share changes statistics, partners and draws (documented)."""
    common = {
        "image_size": 32,
        "augment": "none",
        "mixup": False,
        "checkpoint_every": 3,
        "student": StudentConfig(name="convnext_atto"),
    }
    one = distill(tiny_config(three_batches, tmp_path / "one", max_steps=6, **common))
    run = tmp_path / "mixed"
    distill(tiny_config(three_batches, run, max_steps=3, accelerator="cpu", **common))
    distill(
        tiny_config(three_batches, run, max_steps=6, resume=True, **common, **TWO_CPU_PROCESSES)
    )
    info = json.loads((run / "run_info.json").read_text())
    assert [a["world_size"] for a in info["attempts"]] == [1, 2]
    assert [a["from_step"] for a in info["attempts"]] == [0, 3]
    got, expected = read_metrics(run), read_metrics(one)
    assert list(got.step) == list(expected.step) == [1, 2, 3, 4, 5, 6]
    for column in ("loss", "cosine"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()),
            torch.tensor(expected[column].to_numpy()),
            rtol=1e-5,
            atol=1e-6,
        )


def test_a_ddp_run_resumed_after_a_crash_repeats_the_straight_run(
    three_batches, tmp_path, rank_dumps, monkeypatch
):
    """ResNet-18 (BatchNorm), `us` augmentation and mixup, drawn per (seed, step, rank): both
    ranks crash at step 6, in the second epoch, after the step-4 checkpoint; the resumed run
    restarts both samplers mid-epoch and repeats steps 5-6 of the straight run."""

    def config(out):
        return tiny_config(
            three_batches, out, max_steps=6, checkpoint_every=4, image_size=32, **TWO_CPU_PROCESSES
        )

    straight = distill(config(tmp_path / "straight"))

    real_step, calls = recipe_module.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1  # counted in each forked rank
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", crashing_step)
    crashed = config(tmp_path / "crashed")
    with pytest.raises(Exception, match="simulated crash"):
        distill(crashed)
    monkeypatch.setattr(recipe_module, "train_step", real_step)
    crashed.resume = True
    resumed = distill(crashed)

    # Resumed at step 4 = epoch 1, batch 1 on both ranks, disjoint halves of that epoch's rest.
    r0, r1 = rank_dumps(resumed, 0), rank_dumps(resumed, 1)
    assert [s[:2] for s in r0["seen"]] == [s[:2] for s in r1["seen"]] == [(1, 1)]
    assert len(r0["seen"][0][2]) == 8 and not set(r0["seen"][0][2]) & set(r1["seen"][0][2])

    expected, got = read_metrics(straight), read_metrics(resumed)
    assert list(got.step) == list(range(1, 7)) and set(got[got.step > 4].attempt) == {1}
    for column in ("loss", "cosine", "lr"):
        torch.testing.assert_close(
            torch.tensor(got[column].to_numpy()), torch.tensor(expected[column].to_numpy())
        )
    s0, s1 = rank_dumps(straight, 0), rank_dumps(straight, 1)
    for key, value in params(s0["student"]).items():
        assert torch.equal(value, s1["student"][key]), key  # different images, same weights
        assert torch.equal(r0["student"][key], r1["student"][key]), key
        torch.testing.assert_close(r0["student"][key], value, rtol=1e-5, atol=1e-6)
