"""Checkpoints that survive a kill, a full disk or a damaged file.

Each save is atomic (`sonodistill.io`) and keeps the one before it: `last.pt` becomes
`previous.pt` just before the new file takes its name. Loading tries `last.pt`, then
`previous.pt`, with a warning for each file that cannot be read; a run only fails when neither
is readable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save

from sonodistill.errors import UserError
from sonodistill.io import atomic_path, write_bytes

log = logging.getLogger(__name__)

PREVIOUS = "previous.pt"
REQUIRED = ("student", "optimizer", "scheduler", "step")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically; the file it replaces is kept as previous.pt."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # through a Python file: a full disk is an OSError
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before last.pt moves aside
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
    return path


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """A safetensors file, written atomically."""
    return write_bytes(path, save(tensors))


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(path: str | Path) -> tuple[dict, Path] | None:
    """(state, file) of the newest readable checkpoint among `path` and its previous.pt; None
    when there is neither. UserError when they exist but none can be read."""
    path = Path(path)
    candidates = [p for p in (path, path.with_name(PREVIOUS)) if p.is_file()]
    problems = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except Exception as err:  # zero bytes, a cut zip, another file: torch's words mislead
            log.debug("torch.load(%s): %s", candidate, err)
            reason = (
                "empty (0 bytes)"
                if candidate.stat().st_size == 0
                else "damaged, or not a checkpoint of sonodistill distill"
            )
        else:
            missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
            if not missing:
                return state, candidate
            reason = f"not a checkpoint of sonodistill distill (no {', '.join(missing)})"
        problems.append(f"{candidate.name}: {reason}")
        log.warning("checkpoint %s is unreadable (%s); trying an older one", candidate, reason)
    if problems:
        raise UserError(
            f"{path.parent}: no readable checkpoint ({'; '.join(problems)}); "
            "start over with --overwrite true"
        )
    return None
