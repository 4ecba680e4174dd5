"""Feature-level distillation: objective, augmentation, and the training recipe."""

from sonodistill.distill.augment import build_augmentation, mixup
from sonodistill.distill.config import DistillConfig, OptimConfig
from sonodistill.distill.loss import LOSSES, get_loss, register_loss, token_cosine, token_mse
from sonodistill.distill.recipe import distill
from sonodistill.distill.run import load_encoder, read_metrics, resolve_encoder

__all__ = [
    "LOSSES",
    "DistillConfig",
    "OptimConfig",
    "build_augmentation",
    "distill",
    "get_loss",
    "load_encoder",
    "mixup",
    "read_metrics",
    "register_loss",
    "resolve_encoder",
    "token_cosine",
    "token_mse",
]
