"""Feature-level distillation: objective, augmentation, and the training recipe."""

from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.config import DistillConfig, OptimConfig
from sonodistill.distill.loss import token_cosine, token_mse
from sonodistill.distill.recipe import distill, read_metrics

__all__ = [
    "DistillConfig",
    "OptimConfig",
    "build_augmentation",
    "distill",
    "mixup",
    "read_metrics",
    "token_cosine",
    "token_mse",
]
