"""Segmentation and classification metrics as the paper reports them (Sec. 4.3).

Dice and IoU are computed per image for the foreground and then averaged over the test set.
Libraries average over pixels of the whole set (smp's `iou_score` with micro reduction) or
drop empty images (MONAI's `ignore_empty`), so the per-image rule is written out here.

Empty rule (`empty="one"`, the default): an image whose ground truth and prediction are both
empty scores Dice = IoU = 1 (the prediction is exactly right, e.g. a normal BUSI case with no
false positive); an empty ground truth with any predicted foreground, or the reverse, scores 0.
The alternative (`empty="ignore"`, MONAI's `ignore_empty`): an image with an empty ground truth
is left out of the mean (its score is NaN), whatever is predicted.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

EMPTY_RULES = {
    "one": "an image whose mask and prediction are both empty scores 1, exactly one empty 0",
    "ignore": "images with an empty mask are left out of the mean",
}
EMPTY_RULE = EMPTY_RULES["one"]


def predict_mask(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) class-index map; one logit: foreground where > 0
    (sigmoid > 0.5)."""
    logits = torch.as_tensor(logits)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)


def dice_iou(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int = 2,
    empty: str = "one",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Dice and IoU of (B, H, W) class-index maps, shape (B,) each.

    Binary (num_classes=2): foreground is class 1. Multi-class: the mean over foreground
    classes 1..C-1 of each image, each class scored with the empty rule above (`ignore`: a
    class absent from the truth is left out of the image's mean; NaN if every class is).
    """
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty rule {empty!r}: use one of {sorted(EMPTY_RULES)}")
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)}: (B, H, W)")
    dices, ious = [], []
    for c in range(1, num_classes):
        p = (pred == c).flatten(1)
        t = (target == c).flatten(1)
        inter = (p & t).sum(1).double()
        total = p.sum(1).double() + t.sum(1).double()
        union = total - inter
        both_empty = total == 0
        score_empty = 1.0 if empty == "one" else float("nan")
        skip = both_empty if empty == "one" else t.sum(1) == 0
        dices.append(torch.where(skip, score_empty, 2 * inter / total.clamp(min=1)))
        ious.append(torch.where(skip, score_empty, inter / union.clamp(min=1)))
    if empty == "one":
        return torch.stack(dices).mean(0).numpy(), torch.stack(ious).mean(0).numpy()
    return torch.stack(dices).nanmean(0).numpy(), torch.stack(ious).nanmean(0).numpy()


def classification_scores(pred, target, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 (every class weighted equally, Sec. 4.3). With `num_classes`,
    a class absent from both prediction and truth still counts (F1 = 0), so small test sets
    cannot inflate the macro average by dropping classes."""
    pred, target = np.asarray(pred), np.asarray(target)
    labels = list(range(num_classes)) if num_classes else None
    return {
        "acc": float(accuracy_score(target, pred)),
        "f1": float(f1_score(target, pred, labels=labels, average="macro", zero_division=0)),
    }


def segmentation_scores(dice: np.ndarray, iou: np.ndarray) -> dict[str, float]:
    """Means over images (NaN scores, images left out by the `ignore` rule, are skipped)."""
    dice, iou = np.asarray(dice, float), np.asarray(iou, float)
    if np.isnan(dice).all():
        return {"dice": float("nan"), "iou": float("nan")}
    return {"dice": float(np.nanmean(dice)), "iou": float(np.nanmean(iou))}
