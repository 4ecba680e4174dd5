"""Linear probes on cached features: a frozen encoder sees each image once per suite.

A linear probe's encoder is frozen and in eval mode, so its features of an image never change:
recomputing them every epoch (50 epochs: 50 identical forward passes) is wasted work. The cache
computes them once per (encoder weights, dataset, image size), for every image of the run's
splits (and its mirror image when `--train.hflip` is on), and the probe's head trains on them.
The same images, draws and head updates follow, so the results are those of the uncached path
to float rounding (tests/test_probe_cache.py); `--train.feature_cache false` is the old path.

The key holds a digest of the encoder's weights, so seeds of a random encoder (new weights per
seed) get their own features, while a distilled student's seeds share them. The last `KEEP`
keys are kept: a suite runs the encoders in turn at every label fraction, so each comes back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

KEEP = 8
"""Feature sets kept at once (the least recently used is dropped); a few MB each at the
sizes linear probes run at."""


def cacheable(model: nn.Module) -> bool:
    """A frozen encoder with a head that reads its features (`encode` / `decode`)."""
    return bool(getattr(model, "frozen", False)) and hasattr(model, "decode")


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Frozen features by (record id, mirrored), for the current (encoder, dataset, size)."""

    def __init__(self):
        self.key: tuple | None = None
        self.features: dict[tuple[str, bool], torch.Tensor] = {}
        self._kept: dict[tuple, dict[tuple[str, bool], torch.Tensor]] = {}
        self.images_encoded = 0
        """How many images went through an encoder (tests and benchmarks read it)."""

    def prepare(
        self,
        model: nn.Module,
        datasets: list[Dataset],
        dataset_name: str,
        size: int,
        batch_size: int,
        device: torch.device,
        autocast: Callable,
    ) -> None:
        """Encode every image of `datasets` not cached yet (as is, and mirrored if a dataset
        flips); a new encoder, dataset or size selects its own features (kept or empty)."""
        key = (state_digest(model.encoder), type(model).__name__, dataset_name, size)
        if key != self.key:
            self.key, self.features = key, self._kept.pop(key, {})
            self._kept[key] = self.features  # the most recently used last
            while len(self._kept) > KEEP:
                del self._kept[next(iter(self._kept))]
        todo: dict[tuple[str, bool], torch.Tensor] = {}
        for ds in datasets:
            for i, record in enumerate(ds.records):
                for mirrored in (False, True) if ds.hflip else (False,):
                    if (record.id, mirrored) not in self.features:
                        image = unflipped(ds, i)
                        todo[(record.id, mirrored)] = image.flip(-1) if mirrored else image
        keys = list(todo)
        model.eval()
        with torch.no_grad():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                x = torch.stack([todo[k] for k in chunk]).to(device)
                with autocast():
                    feats = model.encode(x)
                self.features.update(zip(chunk, feats, strict=True))
                self.images_encoded += len(chunk)


def unflipped(ds: Dataset, i: int) -> torch.Tensor:
    """The dataset's image i as its __getitem__ would give it before any flip."""
    saved, ds.hflip = ds.hflip, False
    try:
        return ds[i][0]
    finally:
        ds.hflip = saved


class CachedFeatures(Dataset):
    """(features, target) in place of (image, target): the wrapped dataset still runs (the same
    random draws, the same targets), and its image selects the cached features of that input,
    as is or mirrored."""

    def __init__(self, base: Dataset, cache: FeatureCache):
        self.base, self.cache = base, cache

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        mirrored = self.base.hflip and not torch.equal(x, unflipped(self.base, i))
        return self.cache.features[(self.base.records[i].id, mirrored)], y
