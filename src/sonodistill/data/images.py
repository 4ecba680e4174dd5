"""Training images for distillation: an image folder, a corpus (folder or manifest) or a pack.

Workers only decode and resize to a fixed square (`data.greys`, the image path evaluation,
embedding and export share); augmentation runs batched on the device.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from sonodistill.data.greys import read_grey, resize_square
from sonodistill.data.manifest import is_corpus, list_corpus_images
from sonodistill.data.pack import is_pack, open_pack
from sonodistill.data.readers import IMAGE_EXT, ReadError
from sonodistill.errors import UserError

log = logging.getLogger(__name__)


def find_images(root: str | Path) -> list[Path]:
    """Every image file under root (any depth), in a stable order."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(sorted(IMAGE_EXT))})")
    return files


class ImageFiles(Dataset):
    """Grey uint8 tensors (1, size, size) from image files; unreadable files are skipped."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        # A corrupt file is logged and replaced by the next readable one, so batches stay full.
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            try:
                # The corpus reader: 16-bit and colour images become 8-bit grey like corpus frames.
                grey = read_grey(path)
            except ReadError as err:
                log.warning("skipping unreadable image %s: %s", path, err)
                continue
            return torch.from_numpy(resize_square(grey, self.size))[None]
        raise UserError(f"no readable image among the {len(self.files)} training images")


class PackedFrames(Dataset):
    """Frames from `sonodistill corpus pack`: a memory-mapped (N, S, S) uint8 array."""

    def __init__(self, pack_dir: str | Path, size: int):
        self.pack_dir, self.size = Path(pack_dir), size
        self.frames, index = open_pack(pack_dir)
        self.names = index["id"].astype(str).tolist()

    def __getstate__(self) -> dict:
        # Sent to spawned processes (ddp_spawn ranks, spawn workers) without the frames: each
        # maps the file again instead of receiving a copy of the whole array.
        return {k: v for k, v in self.__dict__.items() if k != "frames"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.frames, _ = open_pack(self.pack_dir)

    def __len__(self) -> int:
        return self.frames.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        # resize_square returns a fresh writable array: no copy of the memory-mapped frame first
        return torch.from_numpy(resize_square(self.frames[index], self.size))[None]


def dataset_identity(dataset: Dataset) -> dict:
    """{"images": N, "names": hash of the image names}: whether two runs see the same images,
    wherever the folder was copied or mounted (run_info.json's `data`)."""
    if isinstance(dataset, ImageFiles):
        names = ["/".join(p.parts[-3:]) for p in dataset.files]
    else:
        names = list(getattr(dataset, "names", []))
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
    return {"images": len(dataset), "names": digest}


def open_training_images(path: str | Path, size: int) -> Dataset:
    """A pack folder, a corpus folder or manifest (kept frames only), or any image folder."""
    path = Path(path)
    if is_pack(path):
        return PackedFrames(path, size)
    if path.suffix == ".parquet" or is_corpus(path):
        return ImageFiles(list_corpus_images(path), size)
    if path.is_dir():
        return ImageFiles(find_images(path), size)
    raise FileNotFoundError(f"{path}: not an image folder, corpus, manifest or pack")


class ResumableSampler(Sampler[int]):
    """Epoch-seeded shuffle, sharded across ranks, that can start mid-epoch.

    Resuming at (epoch, batches done) yields exactly the indices the interrupted run would have
    seen next; torch's DistributedSampler cannot skip ahead without decoding the skipped batches.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.batches_per_epoch = length // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{length} images cannot fill one global batch of {batch_size * world}"
            )
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        used = self.batches_per_epoch * self.batch_size * self.world
        mine = order[:used][self.rank :: self.world]
        return iter(mine[self.start_batch * self.batch_size :].tolist())
