"""One downstream run selects the epoch with the best validation score and tests that epoch's
weights: validation scores are scripted, so the rule itself is under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sonodistill.evaluate import train as train_module
from sonodistill.evaluate.datasets import load_seg_folder
from sonodistill.evaluate.train import TrainSettings, run_one


@pytest.fixture
def tiny_seg(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
        mask = np.zeros((32, 32), np.uint8)
        mask[8 : 16 + i, 8:20] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    index = load_seg_folder(tmp_path)
    ids = [r.id for r in index.records]
    splits = {"ids": {"train": ids[:8], "val": ids[8:10], "test": ids[10:]}, "fractions": {}}
    return index, splits


@pytest.mark.parametrize(
    ("scores", "best"),
    [([0.2, 0.5, 0.5], 2), ([0.9, 0.2, 0.4], 1)],
)
def test_the_best_validation_epoch_is_the_one_tested(tiny_seg, monkeypatch, scores, best):
    index, splits = tiny_seg
    weights_seen = []  # the head's weights at each validation, then at the test

    def scripted(model, loader, task, num_classes, device):
        weights_seen.append(model.head.weight.detach().clone())
        if len(weights_seen) <= len(scores):  # validation after each epoch
            return {"dice": scores[len(weights_seen) - 1], "iou": 0.0, "per_image_dice": []}
        return {"dice": -1.0, "iou": -1.0}  # the test

    monkeypatch.setattr(train_module, "evaluate", scripted)
    settings = TrainSettings(seg_size=32, epochs=len(scores), seg_batch=4, lr=1e-2, device="cpu")
    result = run_one(index, splits, "random:resnet18", "linear", 1.0, 0, settings)

    assert result["best_epoch"] == best and result["val_best"] == max(scores)  # ties: earliest
    assert [row["dice"] for row in result["history"]] == scores
    *per_epoch, tested = weights_seen
    assert torch.equal(tested, per_epoch[best - 1])  # the selected epoch's weights were tested
    assert not torch.equal(per_epoch[0], per_epoch[-1])  # training did change them
