"""Batch augmentation on the training device (workers only decode) and mixup (Eq. 7).

Two policies (Sec. 3.4, Table 6), registered in `AUGMENTATIONS` (a plugin adds one with the same
decorator): `us` keeps to what a probe can do (zoom/field of view, left-right flip, mild defocus
blur); `default` is the ImageNet-style baseline (strong crop, flip, colour jitter, blur); `none`
only resizes. Randomness comes from torch's global generator, which the recipe seeds per step.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from sonodistill.distill.config import AUGMENTATIONS
from sonodistill.models.specs import AUGMENT_TITLES


def build_augmentation(policy: str, size: int) -> nn.Module:
    """The registered policy `policy` for `size` x `size` outputs: (B, 1, H, W) floats in
    [0, 1] -> augmented (B, C, size, size)."""
    return AUGMENTATIONS.get(policy, "--augment")(size)


@AUGMENTATIONS.register("us", title=AUGMENT_TITLES["us"])
def ultrasound(size: int) -> nn.Module:
    """What a probe can do: zoom/field of view, left-right flip, mild defocus blur."""
    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(0.8, 1.25)),
        K.RandomHorizontalFlip(),
        K.RandomGaussianBlur(_odd(size // 16), sigma=(0.1, 1.0), p=0.3),
    )


@AUGMENTATIONS.register("default", title=AUGMENT_TITLES["default"])
def imagenet(size: int) -> nn.Module:
    """The ImageNet-style baseline: strong crop, flip, colour jitter, blur (three channels)."""
    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        _ToRGB(),  # colour jitter needs three channels
        K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGaussianBlur(_odd(size // 10), sigma=(0.1, 2.0), p=0.5),
    )


@AUGMENTATIONS.register("none", title=AUGMENT_TITLES["none"])
def resize_only(size: int) -> nn.Module:
    """No augmentation: a resize to the training size."""
    return K.Resize((size, size))


def _odd(n: int) -> int:
    return max(3, n | 1)


class _ToRGB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def mixup(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 7: each image mixed with another of the batch, lambda ~ U(0, 1) per pair.

    Returns the mixed batch, lambda (B,) and the partner indices; the caller feeds the same mixed
    batch to teacher and student.
    """
    perm = torch.randperm(x.shape[0], device=x.device)
    lam = torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
    lam_ = lam.view(-1, 1, 1, 1)
    return lam_ * x + (1 - lam_) * x[perm], lam, perm
