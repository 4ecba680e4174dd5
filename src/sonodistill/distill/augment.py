"""Batch augmentation on the training device (workers only decode) and mixup (Eq. 7).

Two policies (Sec. 3.4, Table 6): `us` keeps to what a probe can do (zoom/field of view, left-right
flip, mild defocus blur); `default` is the ImageNet-style baseline (strong crop, flip, colour
jitter, blur). Randomness comes from torch's global generator, which the recipe seeds per step.
"""

from __future__ import annotations

from typing import Literal

import kornia.augmentation as K
import torch
from torch import nn

Policy = Literal["us", "default", "none"]


def build_augmentation(policy: Policy, size: int) -> nn.Module:
    """(B, 1, H, W) floats in [0, 1] -> augmented (B, C, size, size); C=3 for `default`."""
    if policy == "us":
        return nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(0.8, 1.25)),
            K.RandomHorizontalFlip(),
            K.RandomGaussianBlur(_odd(size // 16), sigma=(0.1, 1.0), p=0.3),
        )
    if policy == "default":
        return nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
            K.RandomHorizontalFlip(),
            _ToRGB(),  # colour jitter needs three channels
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGaussianBlur(_odd(size // 10), sigma=(0.1, 2.0), p=0.5),
        )
    if policy == "none":
        return K.Resize((size, size))
    raise ValueError(f"unknown augmentation policy {policy!r}: use 'us', 'default' or 'none'")


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
