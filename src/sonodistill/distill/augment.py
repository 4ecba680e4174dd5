"""Batch augmentation on the training device (workers only decode) and mixup (Eq. 7).

Two policies (Sec. 3.4, Table 6), registered in `AUGMENTATIONS` (a plugin adds one with the same
decorator): `us` keeps to what a probe can do (zoom/field of view, left-right flip, mild defocus
blur); `default` is the ImageNet-style baseline (strong crop, flip, colour jitter, blur); `none`
only resizes. Randomness comes from torch's global generator, which the recipe seeds per step.

Every policy runs without reading the device back (no host sync): the crop is one batched warp
(kornia's `cropping_mode="resample"`, equal to its per-image slicing within 1e-5), the blur builds
one kernel per image on the device, and colour jitter applies its four steps in a fixed order
(brightness, contrast, saturation, hue: kornia iterates a random order on the host otherwise).
The draws are kornia's, in the same order as before. `batched=False` (`--augment_batched false`)
builds kornia's per-image path of earlier runs, which reads the crop boxes, the blur sigmas and
the jitter order back every step.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import nn

from sonodistill.distill.config import AUGMENTATIONS
from sonodistill.models.specs import AUGMENT_TITLES


def build_augmentation(policy: str, size: int, batched: bool = True) -> nn.Module:
    """The registered policy `policy` for `size` x `size` outputs: (B, 1, H, W) floats in
    [0, 1] -> augmented (B, C, size, size); `batched=False`: the per-image path (module doc),
    which the built-in policies offer (a plugin's builder takes the size alone)."""
    builder = AUGMENTATIONS.get(policy, "--augment")
    return builder(size) if batched else builder(size, batched=False)


@AUGMENTATIONS.register("us", title=AUGMENT_TITLES["us"])
def ultrasound(size: int, batched: bool = True) -> nn.Module:
    """What a probe can do: zoom/field of view, left-right flip, mild defocus blur."""
    return nn.Sequential(
        _crop(size, batched, scale=(0.5, 1.0), ratio=(0.8, 1.25)),
        K.RandomHorizontalFlip(),
        _blur(batched, _odd(size // 16), sigma=(0.1, 1.0), p=0.3),
    )


@AUGMENTATIONS.register("default", title=AUGMENT_TITLES["default"])
def imagenet(size: int, batched: bool = True) -> nn.Module:
    """The ImageNet-style baseline: strong crop, flip, colour jitter, blur (three channels)."""
    return nn.Sequential(
        _crop(size, batched, scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        _ToRGB(),  # colour jitter needs three channels
        K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8, order=(0, 1, 2, 3) if batched else None),
        _blur(batched, _odd(size // 10), sigma=(0.1, 2.0), p=0.5),
    )


@AUGMENTATIONS.register("none", title=AUGMENT_TITLES["none"])
def resize_only(size: int, batched: bool = True) -> nn.Module:
    """No augmentation: a resize to the training size."""
    return K.Resize((size, size))


def _crop(size: int, batched: bool, **ranges) -> nn.Module:
    """kornia's random resized crop: one batched warp, or one slice per image (reads the boxes
    back)."""
    mode = "resample" if batched else "slice"
    return K.RandomResizedCrop((size, size), cropping_mode=mode, **ranges)


def _blur(batched: bool, kernel_size: int, sigma: tuple[float, float], p: float) -> nn.Module:
    cls = DeviceGaussianBlur if batched else K.RandomGaussianBlur
    return cls(kernel_size, sigma=sigma, p=p)


class DeviceGaussianBlur(K.RandomGaussianBlur):
    """kornia's random Gaussian blur (its draws, its per-image selection) applied with kornia's
    kernel and separable filter; its own `gaussian_blur2d` checks the drawn sigmas on the host,
    a device readback every step."""

    def apply_transform(self, input, params, flags, transform=None) -> torch.Tensor:
        sigma = params["sigma"].to(input)[:, None]  # (B, 1): one kernel per image
        kernel = get_gaussian_kernel1d(self.flags["kernel_size"], sigma)
        return filter2d_separable(input, kernel, kernel, self.flags["border_type"].name.lower())


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
