"""The one input convention shared by teacher, student and every downstream model."""

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 1|3, H, W) floats in [0, 1] -> 3-channel ImageNet-normalised tensor.

    Grey ultrasound frames are replicated to three channels, as in the paper (Sec. 4.3).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1|3, H, W) images, got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
