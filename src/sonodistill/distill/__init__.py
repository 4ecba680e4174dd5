"""Feature-level distillation: objective, augmentation, and the training recipe.

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

from sonodistill.utils.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
