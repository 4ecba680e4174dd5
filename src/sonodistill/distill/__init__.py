"""Feature-level distillation: objective, augmentation, and the training recipe."""

from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.config import DistillConfig, OptimConfig
from sonodistill.distill.loss import token_cosine, token_mse
from sonodistill.distill.recipe import distill
from sonodistill.distill.run import load_encoder, read_metrics, resolve_encoder

__all__ = [
    "DistillConfig",
    "OptimConfig",
    "build_augmentation",
    "distill",
    "load_encoder",
    "mixup",
    "read_metrics",
    "resolve_encoder",
    "token_cosine",
    "token_mse",
]
