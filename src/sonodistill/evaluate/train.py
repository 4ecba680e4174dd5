"""One downstream run: train on the split's training images, select the epoch with the best
validation score, test that checkpoint (the same rule for every model, Sec. 4.3 / App. A)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning_fabric
import numpy as np
import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn
from torch.utils.data import DataLoader

from sonodistill.evaluate.datasets import ClsDataset, DatasetIndex, Record, SegDataset
from sonodistill.evaluate.heads import Protocol, build_model, trainable_parameters
from sonodistill.evaluate.metrics import (
    EMPTY_RULE,
    classification_scores,
    dice_iou,
    predict_mask,
    segmentation_scores,
)
from sonodistill.evaluate.splits import split_ids
from sonodistill.models.encoders import Encoder, EncoderSpec


@dataclass
class TrainSettings:
    """The paper's recipe (Sec. 4.3); lower sizes, epochs and subset for CPU smoke runs."""

    seg_size: int = 256
    cls_size: int = 224
    epochs: int = 50
    seg_batch: int = 32
    cls_batch: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    restart_epochs: int = 10
    """Cosine annealing with warm restarts: epochs per cycle (T_0)."""
    subset: int | None = None
    """Use at most this many images per split (evenly spaced, so classes stay mixed)."""
    hflip: bool = False
    """Random horizontal flips while training (the paper states no downstream augmentation)."""
    seg_decoder: str = "auto"
    """Fine-tuned segmentation decoder: unet (smp's U-Net on the encoder's pyramid), light (a
    light head on the last map), or auto: the family's default (light for plain ViTs, as the
    paper's DINOv3 reference; unet otherwise)."""
    device: str = "auto"
    num_workers: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def thin(ids: list[str], subset: int | None) -> list[str]:
    """Evenly spaced subset (records are ordered by class, so every class keeps its share)."""
    if not subset or subset >= len(ids):
        return ids
    return [ids[int(i * len(ids) / subset)] for i in range(subset)]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (Lightning's helper); the generator shuffles the loader."""
    lightning_fabric.seed_everything(seed, verbose=False)
    return torch.Generator().manual_seed(seed)


class SegLoss(nn.Module):
    """0.8 Dice + 0.2 Focal (smp), binary on one logit or multi-class on C logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        mode = "binary" if num_classes == 2 else "multiclass"
        self.dice, self.focal = DiceLoss(mode, from_logits=True), FocalLoss(mode)
        self.binary = num_classes == 2

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = mask[:, None].float() if self.binary else mask
        return 0.8 * self.dice(logits, target) + 0.2 * self.focal(logits, target)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, task_type: str, num_classes: int, device
) -> dict:
    model.eval()
    if task_type == "seg":
        dices, ious = [], []
        for x, y in loader:
            d, i = dice_iou(predict_mask(model(x.to(device))).cpu(), y, num_classes)
            dices.append(d)
            ious.append(i)
        dice, iou = np.concatenate(dices), np.concatenate(ious)
        return {**segmentation_scores(dice, iou), "per_image_dice": dice.round(5).tolist()}
    preds, labels = [], []
    for x, y in loader:
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(y)
    return classification_scores(torch.cat(preds), torch.cat(labels), num_classes)


def make_loaders(index: DatasetIndex, splits: dict, fraction: float, s: TrainSettings, gen):
    records: dict[str, list[Record]] = {
        name: index.subset(thin(split_ids(splits, name, fraction), s.subset))
        for name in ("train", "val", "test")
    }
    if index.task_type == "seg":
        binary = index.num_classes == 2

        def make(name, flip):
            return SegDataset(records[name], s.seg_size, binary, flip)

        batch = s.seg_batch
    else:

        def make(name, flip):
            return ClsDataset(records[name], s.cls_size, flip)

        batch = s.cls_batch
    kw = {"num_workers": s.num_workers, "batch_size": batch}
    return {
        "train": DataLoader(make("train", s.hflip), shuffle=True, generator=gen, **kw),
        "val": DataLoader(make("val", False), **kw),
        "test": DataLoader(make("test", False), **kw),
    }


def run_one(
    index: DatasetIndex,
    splits: dict,
    encoder: EncoderSpec | str,
    protocol: Protocol,
    fraction: float,
    seed: int,
    settings: TrainSettings,
    on_epoch: Callable[[int, dict], None] | None = None,
    on_end: Callable[[nn.Module], None] | None = None,
) -> dict:
    """Train, select by validation (seg: Dice; cls: macro-F1), test the selected checkpoint.

    `on_epoch(epoch, row)` follows training; `on_end(model)` receives the selected model.
    """
    start = time.time()
    gen = seed_everything(seed)
    device = pick_device(settings.device)
    loaders = make_loaders(index, splits, fraction, settings, gen)
    model = build_model(encoder, index.task_type, protocol, index.num_classes, settings.seg_decoder)
    model = model.to(device)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = len(loaders["train"])
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=max(1, settings.restart_epochs * steps)
    )
    loss_fn = SegLoss(index.num_classes) if index.task_type == "seg" else nn.CrossEntropyLoss()
    select = "dice" if index.task_type == "seg" else "f1"
    best, best_state, history = -1.0, None, []
    for epoch in range(settings.epochs):
        model.train()
        total, seen = 0.0, 0
        for x, y in loaders["train"]:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(x)
            seen += len(x)
        val = evaluate(model, loaders["val"], index.task_type, index.num_classes, device)
        val.pop("per_image_dice", None)
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), **val})
        if val[select] > best:  # strict: ties keep the earlier epoch
            best, best_state = val[select], copy.deepcopy(model.state_dict())
            best_epoch = epoch + 1
        if on_epoch:
            on_epoch(epoch + 1, history[-1])
    model.load_state_dict(best_state)
    test = evaluate(model, loaders["test"], index.task_type, index.num_classes, device)
    if on_end:
        on_end(model)
    return {
        "test": test,
        "val_best": best,
        "select_metric": f"val_{select}",
        "best_epoch": best_epoch,
        "history": history,
        "n": {k: len(v.dataset) for k, v in loaders.items()},
        "trainable_params": sum(p.numel() for p in params),
        "backbone": backbone_info(model.encoder),
        "empty_rule": EMPTY_RULE if index.task_type == "seg" else None,
        "device": str(device),
        "wall_s": round(time.time() - start, 2),
    }


def backbone_info(encoder: Encoder) -> dict:
    """Family (public name), architecture and parameter count of a run's encoder (Table 8)."""
    return {
        "family": type(encoder).title or encoder.spec.family,
        "name": encoder.spec.name,
        "params": sum(p.numel() for p in encoder.parameters()),
    }


def trivial_baselines(index: DatasetIndex, splits: dict, settings: TrainSettings) -> dict:
    """Test Dice/IoU of predicting all background and all foreground (class 1) everywhere,
    on the same test images at the same size: the floor a trained model must clear."""
    ids = thin(split_ids(splits, "test"), settings.subset)
    ds = SegDataset(index.subset(ids), settings.seg_size, index.num_classes == 2)
    masks = torch.stack([ds[i][1] for i in range(len(ds))])
    out = {}
    for name, value in (("all_background", 0), ("all_foreground", 1)):
        dice, iou = dice_iou(torch.full_like(masks, value), masks, index.num_classes)
        out[name] = segmentation_scores(dice, iou)
    return out
