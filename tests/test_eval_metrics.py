"""Per-image Dice/IoU (with the empty-mask rule) and classification scores, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonodistill.evaluate.metrics import classification_scores, dice_iou, segmentation_scores


def _masks(*rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_dice_iou_per_image_by_hand():
    # image 0: pred 3 px, truth 2 px, overlap 2 -> Dice 2*2/5 = 0.8, IoU 2/3
    # image 1: pred 1 px, truth 3 px, overlap 1 -> Dice 2/4 = 0.5, IoU 1/3
    pred = _masks([[1, 1], [1, 0]], [[1, 0], [0, 0]])
    true = _masks([[1, 1], [0, 0]], [[1, 1], [1, 0]])
    dice, iou = dice_iou(pred, true)
    np.testing.assert_allclose(dice, [0.8, 0.5])
    np.testing.assert_allclose(iou, [2 / 3, 1 / 3])
    # the paper's mean is over images, not over pooled pixels (pooled: 2*3/9 = 0.667)
    assert segmentation_scores(dice, iou)["dice"] == pytest.approx(0.65)


def test_empty_rule():
    empty = [[0, 0], [0, 0]]
    one = [[0, 1], [0, 0]]
    pred = _masks(empty, one, empty)
    true = _masks(empty, empty, one)
    dice, iou = dice_iou(pred, true)
    # both empty: a correct "no lesion" -> 1; false positive or missed lesion -> 0
    np.testing.assert_array_equal(dice, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(iou, [1.0, 0.0, 0.0])


def test_multiclass_mean_over_foreground_classes():
    pred = _masks([[1, 1], [2, 0]])
    true = _masks([[1, 0], [2, 2]])
    dice, iou = dice_iou(pred, true, num_classes=3)
    # class 1: 2*1/3, IoU 1/2; class 2: 2*1/3, IoU 1/2
    np.testing.assert_allclose(dice, [2 / 3])
    np.testing.assert_allclose(iou, [0.5])
    # a class absent from both truth and prediction counts as correct (empty rule)
    dice4, _ = dice_iou(pred, true, num_classes=4)
    np.testing.assert_allclose(dice4, [(2 / 3 + 2 / 3 + 1) / 3])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        dice_iou(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))


def test_accuracy_and_macro_f1_by_hand():
    target = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    scores = classification_scores(pred, target, num_classes=3)
    assert scores["acc"] == pytest.approx(4 / 6)
    # class 0: P 1, R 2/3 -> 0.8; class 1: P 1/2, R 1/2 -> 0.5; class 2: P 1/2, R 1 -> 2/3
    assert scores["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_keeps_a_class_missing_from_the_test_set():
    target, pred = [0, 0, 1], [0, 0, 1]
    assert classification_scores(pred, target)["f1"] == pytest.approx(1.0)
    assert classification_scores(pred, target, num_classes=3)["f1"] == pytest.approx(2 / 3)
