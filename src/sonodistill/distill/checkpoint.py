"""Atomic checkpoint files: a crash while writing never corrupts the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from sonodistill.io import save_torch, write_bytes


def atomic_save(obj: dict, path: str | Path) -> Path:
    if Path(path).suffix == ".safetensors":
        return write_bytes(path, save(obj))
    return save_torch(path, obj)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
