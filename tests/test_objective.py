"""Eq. 6 by hand, mixup (Eq. 7) and the augmentation policies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sonodistill.distill import (
    LOSSES,
    OptimConfig,
    build_augmentation,
    mixup,
    token_cosine,
    token_mse,
)
from sonodistill.distill.recipe import lr_factor, train_step
from sonodistill.models import to_model_input


def test_token_mse_matches_a_hand_computation_of_eq6():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 2, 2, generator=gen)
    teacher = torch.randn(2, 3, 2, 2, generator=gen)
    per_image = []
    for b in range(2):
        tokens = []
        for r in range(2):
            for c in range(2):
                d = [float(teacher[b, k, r, c] - student[b, k, r, c]) for k in range(3)]
                tokens.append(sum(v * v for v in d))
        per_image.append(sum(tokens) / 4)
    expected = sum(per_image) / 2
    assert abs(token_mse(student, teacher).item() - expected) < 1e-5
    # No feature normalisation: scaling both scales the loss quadratically.
    assert abs(token_mse(3 * student, 3 * teacher).item() - 9 * expected) < 1e-4


def test_token_cosine_is_one_for_identical_tokens():
    z = torch.randn(2, 8, 3, 3)
    assert abs(token_cosine(z, z).item() - 1) < 1e-6
    assert abs(token_cosine(z, -z).item() + 1) < 1e-6


def test_mixup_mixes_each_image_with_one_partner_and_one_lambda():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    mixed, lam, perm = mixup(x)
    assert lam.shape == (6,) and bool(((lam >= 0) & (lam <= 1)).all())
    assert len(set(lam.tolist())) == 6  # a lambda per pair, not one per batch
    for i in range(6):
        torch.testing.assert_close(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]])


def test_training_step_feeds_the_same_mixed_images_to_teacher_and_student():
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, grid=None):
            seen[self.name] = x.clone()
            return x[:, :2] * self.w

    class NoFabric:
        def autocast(self):
            return torch.autocast("cpu", enabled=False)

        def backward(self, loss):
            loss.backward()

    images = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    raw = images.float() / 255
    objective = LOSSES.get("token_mse")
    for use_mixup in (True, False):
        torch.manual_seed(1)
        train_step(
            NoFabric(), Spy("teacher"), Spy("student"), nn.Identity(), objective, images, use_mixup
        )
        assert torch.equal(seen["teacher"], seen["student"])
        torch.manual_seed(1)  # the same draws: the images mixup makes from this batch
        expected = to_model_input(mixup(raw)[0] if use_mixup else raw)
        torch.testing.assert_close(seen["student"], expected)
    assert not torch.allclose(to_model_input(mixup(raw)[0]), to_model_input(raw))


def _top_bright(n=32, size=48):
    x = torch.zeros(n, 1, size, size)
    x[:, :, : size // 2] = 1.0
    x[:, :, :, : size // 4] *= 0.5  # a left-right asymmetry to detect horizontal flips
    return x


def test_us_policy_flips_left_right_but_never_upside_down_and_keeps_grey():
    torch.manual_seed(0)
    out = build_augmentation("us", 32)(_top_bright())
    assert out.shape == (32, 1, 32, 32)
    top, bottom = out[:, :, :8].mean(dim=(1, 2, 3)), out[:, :, -8:].mean(dim=(1, 2, 3))
    assert bool((top > bottom).all())  # no vertical flip or rotation
    left, right = out[:, :, :16, :4].mean(dim=(1, 2, 3)), out[:, :, :16, -4:].mean(dim=(1, 2, 3))
    assert bool((left < right).any()) and bool((left > right).any())  # flipped sometimes


def test_default_policy_jitters_intensity_and_is_reproducible_from_the_seed():
    images = _top_bright()
    torch.manual_seed(3)
    a = build_augmentation("default", 32)(images)
    torch.manual_seed(3)
    b = build_augmentation("default", 32)(images)
    assert a.shape == (32, 3, 32, 32)
    torch.testing.assert_close(a, b)
    brightest = a.amax(dim=(1, 2, 3))
    assert brightest.std() > 0.01  # colour jitter changes intensities between images


def test_builtin_objectives_by_hand():
    student = torch.tensor([[[[0.5]], [[3.0]]]])  # (1, 2, 1, 1): one token, two channels
    teacher = torch.tensor([[[[0.0]], [[1.0]]]])
    mse, metrics = LOSSES.get("token_mse")(student, teacher)
    assert mse.item() == pytest.approx(0.25 + 4.0)  # Eq. 6: summed over channels
    cosine = (0.5 * 0 + 3.0 * 1) / (9.25**0.5 * 1.0)
    assert metrics["cosine"].item() == pytest.approx(cosine)
    # Huber per channel: 0.5 d^2 below beta = 1, |d| - 0.5 above, then summed like Eq. 6
    huber, metrics = LOSSES.get("token_smooth_l1")(student, teacher)
    assert huber.item() == pytest.approx(0.5 * 0.25 + (2.0 - 0.5))
    assert metrics["cosine"].item() == pytest.approx(cosine)
    one_minus, metrics = LOSSES.get("token_cosine")(student, teacher)
    assert one_minus.item() == pytest.approx(1 - cosine, abs=1e-6)
    # every objective trains: its value carries gradients to the student
    for name in ("token_mse", "token_cosine", "token_smooth_l1"):
        s = student.clone().requires_grad_(True)
        LOSSES.get(name)(s, teacher)[0].backward()
        assert s.grad is not None and s.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="'token_mse' is registered twice"):
        LOSSES.register("token_mse")(lambda s, t: (token_mse(s, t), {}))


def test_lr_factor_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, schedule="cosine")
    factor = lr_factor(optim, total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)  # the cosine starts at the base lr
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: half way to the floor
    assert factor(14) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)  # min_lr / lr
    constant = lr_factor(OptimConfig(lr=1e-3, warmup_steps=2), total_steps=14)
    assert [constant(s) for s in (0, 1, 2, 13)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(OptimConfig(schedule="cosine"), total_steps=10)(0) == 1.0  # no warm-up
