"""Reading weight files safely and refusing the ones that do not fit."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sonodistill.errors import UserError

# Containers that training frameworks wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "module", "model_state")


class WeightsMismatchError(UserError, ValueError):
    """A weights file whose tensors do not match the model; the message lists every mismatch."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file, without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # truncated or not a safetensors file
            raise WeightsMismatchError(f"{path}: not a readable weights file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zips, non-torch files
        raise WeightsMismatchError(f"{path}: not a readable weights file ({err})") from err
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
        )
        if inner is None:
            raise WeightsMismatchError(
                f"{path}: no state dict found (top-level keys: {list(obj)[:10]})"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsMismatchError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {_strip_prefix(k): v for k, v in obj.items()}


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(key: str) -> str:
    # DDP and torch.compile wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsMismatchError naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or reshaped:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")
        raise WeightsMismatchError("\n".join(lines))


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """check_state_dict, then load; dtype differences are cast by load_state_dict."""
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
