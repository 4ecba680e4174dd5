"""Feature-level distillation: objective, augmentation, and the training recipe.

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

import importlib

_EXPORTS = {
    "build_augmentation": "sonodistill.distill.augment",
    "mixup": "sonodistill.distill.augment",
    "AUGMENTATIONS": "sonodistill.distill.config",
    "DistillConfig": "sonodistill.distill.config",
    "LOSSES": "sonodistill.distill.config",
    "OptimConfig": "sonodistill.distill.config",
    "token_cosine": "sonodistill.distill.loss",
    "token_mse": "sonodistill.distill.loss",
    "distill": "sonodistill.distill.recipe",
    "read_metrics": "sonodistill.distill.run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
