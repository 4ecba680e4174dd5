"""One downstream run: train on the split's training images, select the epoch with the best
validation score, test that checkpoint (the same rule for every model, Sec. 4.3 / App. A)."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import lightning_fabric
import numpy as np
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn
from torch.utils.data import DataLoader

from sonodistill.evaluate import config
from sonodistill.evaluate.datasets import ClsDataset, DatasetIndex, Record, SegDataset
from sonodistill.evaluate.heads import build_model, trainable_parameters
from sonodistill.evaluate.metrics import (
    EMPTY_RULES,
    classification_scores,
    dice_iou,
    predict_mask,
    segmentation_scores,
)
from sonodistill.evaluate.probe_cache import CachedFeatures, FeatureCache, cacheable
from sonodistill.evaluate.splits import split_ids
from sonodistill.models.encoders import Encoder, EncoderSpec


class TrainSettings(config.TrainSettings):
    """`evaluate.config.TrainSettings` that also takes the 0.1 keywords `seg_size` and
    `cls_size`: a bridge for demo.py, deleted with it once the demo calls the suite (issue 18,
    WP-B of issue 20)."""

    def __init__(self, **options):
        renamed = {"seg_size": "seg_image_size", "cls_size": "cls_image_size"}
        super().__init__(**{renamed.get(k, k): v for k, v in options.items()})


def pick_device(name: str) -> torch.device:
    """A `fields.Device` name as a torch device (auto: CUDA when there is one, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    """A context factory: bf16 autocast for `bf16`, and for `auto` on a GPU; else nothing."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def loader_workers(settings: config.TrainSettings, device: torch.device) -> int:
    if settings.num_workers is not None:
        return settings.num_workers
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


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
    model: nn.Module,
    loader: DataLoader,
    task_type: str,
    num_classes: int,
    device,
    forward: Callable | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    settings: config.TrainSettings | None = None,
) -> dict:
    """Scores of `model` on a loader's batches (in dataset order); `forward` replaces
    `model(x)` (cached features: the probe's head alone). `per_image`: every image's id and
    score (seg: Dice, IoU; cls: label and prediction). Segmentation follows the settings'
    `metric_resolution` and `empty_mask`."""
    s = settings or config.TrainSettings()
    model.eval()
    forward = forward or model
    data = getattr(loader.dataset, "base", loader.dataset)  # cached features wrap the images
    ids = [r.id for r in data.records]
    seg = task_type == "seg"
    preds, labels, dices, ious, k = [], [], [], [], 0
    for x, y in loader:
        with autocast():
            logits = forward(x.to(device, non_blocking=True)).float().cpu()
        if not seg:
            preds += logits.argmax(1).tolist()
            labels += y.tolist()
            continue
        if s.metric_resolution == "train":
            d, i = dice_iou(predict_mask(logits), y, num_classes, s.empty_mask)
            dices += d.tolist()
            ious += i.tolist()
            k += len(x)
            continue
        for one in logits:
            target = torch.from_numpy(data.original_mask(k).astype(np.int64))
            up = F.interpolate(one[None], size=target.shape, mode="bilinear", align_corners=False)
            d, i = dice_iou(predict_mask(up), target[None], num_classes, s.empty_mask)
            dices.append(float(d[0]))
            ious.append(float(i[0]))
            k += 1
    if not seg:
        scores = classification_scores(preds, labels, num_classes)
        return {**scores, "per_image": {"id": ids, "label": labels, "pred": preds}}
    dice, iou = np.array(dices), np.array(ious)
    return {
        **segmentation_scores(dice, iou),
        "per_image": {"id": ids, "dice": dice.round(5).tolist(), "iou": iou.round(5).tolist()},
    }


def make_loaders(
    index: DatasetIndex,
    splits: dict,
    fraction: float,
    s: config.TrainSettings,
    gen,
    device: torch.device | None = None,
):
    records: dict[str, list[Record]] = {
        name: index.subset(thin(split_ids(splits, name, fraction), s.subset))
        for name in ("train", "val", "test")
    }
    if index.task_type == "seg":

        def make(name, flip):
            return SegDataset.of(index, records[name], s.seg_image_size, flip)

        batch = s.seg_batch
    else:

        def make(name, flip):
            return ClsDataset(records[name], s.cls_image_size, flip)

        batch = s.cls_batch
    device = device or pick_device(s.device)
    workers = loader_workers(s, device)
    kw = {
        "num_workers": workers,
        "batch_size": batch,
        "persistent_workers": workers > 0,  # workers keep their decoded images across epochs
        "pin_memory": device.type == "cuda",
    }
    return {
        "train": DataLoader(make("train", s.hflip), shuffle=True, generator=gen, **kw),
        "val": DataLoader(make("val", False), **kw),
        "test": DataLoader(make("test", False), **kw),
    }


def run_one(
    index: DatasetIndex,
    splits: dict,
    encoder: EncoderSpec | str,
    protocol: str,
    fraction: float,
    seed: int,
    settings: config.TrainSettings,
    on_epoch: Callable[[int, dict], None] | None = None,
    on_end: Callable[[nn.Module], None] | None = None,
    cache: FeatureCache | None = None,
) -> dict:
    """Train, select by validation (seg: Dice; cls: macro-F1), test the selected checkpoint.

    `on_epoch(epoch, row)` follows training; `on_end(model)` receives the selected model. A
    linear probe trains on cached features (`cache`, shared by a suite's runs, or its own)
    unless `settings.feature_cache` is false.
    """
    start = time.time()
    gen = seed_everything(seed)
    device = pick_device(settings.device)
    loaders = make_loaders(index, splits, fraction, settings, gen, device)
    sets = {name: loader.dataset for name, loader in loaders.items()}  # the images, uncached
    model = build_model(encoder, index.task_type, protocol, index.num_classes, settings.seg_decoder)
    model = model.to(device)
    autocast = autocast_for(device, settings.precision)
    forward = model
    if settings.feature_cache and cacheable(model):
        loaders, forward = _on_cached_features(
            model, loaders, cache or FeatureCache(), index, settings, gen, device, autocast
        )
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = len(loaders["train"])
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=max(1, settings.restart_epochs * steps)
    )
    loss_fn = SegLoss(index.num_classes) if index.task_type == "seg" else nn.CrossEntropyLoss()
    select = "dice" if index.task_type == "seg" else "f1"
    args = (index.task_type, index.num_classes, device, forward, autocast, settings)

    def score(loader: DataLoader) -> dict:
        return evaluate(model, loader, *args)

    best, best_state, history = -1.0, None, []
    for epoch in range(settings.epochs):
        model.train()
        total, seen = torch.zeros((), device=device), 0
        for x, y in loaders["train"]:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = forward(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(x)  # read once per epoch: no per-step device sync
            seen += len(x)
        val = score(loaders["val"])
        val.pop("per_image")
        train_loss = total.item() / max(seen, 1)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, **val})
        if best_state is None or val[select] > best:  # strict: ties keep the earlier epoch
            best, best_state = val[select], copy.deepcopy(model.state_dict())
            best_epoch = epoch + 1
        if on_epoch:
            on_epoch(epoch + 1, history[-1])
    model.load_state_dict(best_state)
    test = score(loaders["test"])
    per_image = test.pop("per_image")
    if on_end:
        on_end(model)
    return {
        "test": test,
        "val_best": best,
        "select_metric": f"val_{select}",
        "best_epoch": best_epoch,
        "history": history,
        "per_image": per_image,
        "baselines": trivial_scores(index, sets, settings),
        "n": {k: len(v) for k, v in sets.items()},
        "trainable_params": sum(p.numel() for p in params),
        "backbone": backbone_info(model.encoder),
        "metric_resolution": settings.metric_resolution if index.task_type == "seg" else None,
        "empty_rule": EMPTY_RULES[settings.empty_mask] if index.task_type == "seg" else None,
        "device": str(device),
        "wall_s": round(time.time() - start, 2),
    }


def _on_cached_features(model, loaders, cache, index, settings, gen, device, autocast):
    """The run's loaders and forward on cached features: the same batches (the same shuffle
    generator), whose images are replaced by their frozen features, and the head alone."""
    size = settings.seg_image_size if index.task_type == "seg" else settings.cls_image_size
    sets = {name: loader.dataset for name, loader in loaders.items()}
    batch = loaders["train"].batch_size
    cache.prepare(model, list(sets.values()), index.name, size, batch, device, autocast)
    cached = {
        name: DataLoader(
            CachedFeatures(ds, cache),
            batch_size=batch,
            shuffle=name == "train",
            generator=gen if name == "train" else None,
        )
        for name, ds in sets.items()
    }
    return cached, lambda features: model.decode(features, (size, size))


def backbone_info(encoder: Encoder) -> dict:
    """Family (public name), architecture and parameter count of a run's encoder (Table 8)."""
    return {
        "family": type(encoder).title or encoder.spec.family,
        "name": encoder.spec.name,
        "params": sum(p.numel() for p in encoder.parameters()),
    }


def trivial_scores(index: DatasetIndex, sets: dict, s: config.TrainSettings) -> dict:
    """Test scores of the trivial predictors on the same images, resolution and rule: all
    background and all foreground (segmentation), the training split's majority class
    (classification). The floor a trained model must clear; `per_image` as a run's, so that
    the tables test each cell against them image by image (`evaluate.stats.no_better`)."""
    test = sets["test"]
    ids = [r.id for r in test.records]
    if index.task_type == "cls":
        train_labels = [r.label for r in sets["train"].records]
        majority = max(set(train_labels), key=train_labels.count)
        labels = [r.label for r in test.records]
        scores = classification_scores([majority] * len(labels), labels, index.num_classes)
        per_image = {"id": ids, "label": labels, "pred": [majority] * len(labels)}
        return {"majority_class": {**scores, "per_image": per_image}}
    out = {}
    for name, value in (("all_background", 0), ("all_foreground", 1)):
        dices, ious = [], []
        for k in range(len(test)):
            target = test.original_mask(k) if s.metric_resolution == "original" else test.load(k)[1]
            target = torch.from_numpy(target.astype(np.int64))[None]
            d, i = dice_iou(torch.full_like(target, value), target, index.num_classes, s.empty_mask)
            dices.append(float(d[0]))
            ious.append(float(i[0]))
        dice, iou = np.array(dices), np.array(ious)
        per_image = {"id": ids, "dice": dice.round(5).tolist(), "iou": iou.round(5).tolist()}
        out[name] = {**segmentation_scores(dice, iou), "per_image": per_image}
    return out
