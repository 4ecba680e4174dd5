"""Atomic checkpoint files: a crash while writing never corrupts the last good checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_save(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        save_file(obj, str(tmp))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
    return path


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
