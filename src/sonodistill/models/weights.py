"""Reading weight files safely, unwrapping training checkpoints, refusing what does not fit.

Every error names the file in one line (the CLI prints it without a traceback):
- files: `.safetensors` (read without executing code) or torch files (`weights_only=True`);
- folders: a Hugging Face snapshot (`model.safetensors`, sharded `model.safetensors.index.json`,
  `pytorch_model.bin`), a hub cache folder with one snapshot, or a folder with one weights file;
- wrappers: `state_dict`, `model_ema`, `model`, `teacher` (preferred over `student`), `student`,
  `module`, `model_state` containers; `module.` / `_orig_mod.` key prefixes; a `backbone.` prefix
  keeps the backbone and drops the heads beside it (DINOv3 training checkpoints: `dino_head`,
  `ibot_head`), with a log line saying what was dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sonodistill.errors import UserError

log = logging.getLogger(__name__)

# Containers that training frameworks wrap a state dict in, in order of preference.
_WRAPPER_KEYS = (
    "state_dict",
    "model_ema",
    "model",
    "teacher",
    "student",
    "module",
    "model_state",
)
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_SHOW = 5  # tensor names listed per kind of mismatch


class WeightsMismatchError(UserError, ValueError):
    """A weights file that cannot be read or does not fit the model (one line naming the file)."""


class UnknownFormatError(WeightsMismatchError):
    """A readable file in none of a family's formats (the registry adds which family it fits)."""

    def __init__(self, path: Path | str, state: dict, family_title: str):
        self.path, self.state, self.family_title = str(path), state, family_title
        super().__init__(
            f"{path}: not a {family_title} file (first tensors: {_short(list(state), 4)})"
        )


@dataclass
class LoadReport:
    """How a weights file was read: recorded beside every run that uses it."""

    file: str
    format: str
    dropped: dict[str, int] = field(default_factory=dict)
    """Tensor groups left out (heads, neck, ...) and how many tensors each had."""
    notes: list[str] = field(default_factory=list)
    """Checks and corrections, e.g. how the RoPE periods were set."""

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("%s: %s", self.file, text)

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "format": self.format,
            "dropped": dict(self.dropped),
            "notes": list(self.notes),
        }


# --- reading --------------------------------------------------------------------------------------


def weight_files(path: str | Path) -> list[Path]:
    """The file(s) holding the weights at `path` (a file or a folder, see the module doc)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_file():
        return [path]
    snapshots = sorted(p for p in (path / "snapshots").glob("*") if p.is_dir())
    if snapshots:  # a Hugging Face hub cache folder: models--org--name/snapshots/<hash>/
        if len(snapshots) > 1:
            names = ", ".join(p.name for p in snapshots)
            raise WeightsMismatchError(f"{path}: several snapshots ({names}); pass one of them")
        return weight_files(snapshots[0])
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise WeightsMismatchError(f"{index}: not a readable shard index ({err})") from err
        return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found
    what = (
        f"several weights files ({', '.join(p.name for p in found)})"
        if found
        else "no weights file"
    )
    raise WeightsMismatchError(
        f"{path}: a folder with {what}; expected one file or a Hugging Face snapshot "
        "(model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def read_file(path: Path) -> object:
    """The raw object stored in one weights file; every failure names the file in one line."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsMismatchError(f"{path}: empty file (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError: truncated, garbage, bad header
            raise WeightsMismatchError(
                f"{path}: not a readable .safetensors file (truncated or not weights: "
                f"{_first_line(err)})"
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zips, objects beyond tensors
        text = str(err)
        if "Unsupported global" in text:
            raise WeightsMismatchError(
                f"{path}: holds Python objects besides tensors, which are not loaded (no code "
                "is executed from weights files); save its state dict alone with torch.save"
            ) from err
        reason = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler" in text else text
        raise WeightsMismatchError(
            f"{path}: not a readable weights file (truncated or not a torch/safetensors file: "
            f"{_first_line(reason)})"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_state_dict(path: str | Path, report: LoadReport | None = None) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a file or folder, unwrapped (see the module doc)."""
    files = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(unwrap(read_file(file), file, report))
    return state


def unwrap(obj: object, source: Path | str, report: LoadReport | None = None) -> dict:
    """The backbone's tensors inside a (possibly wrapped) checkpoint object."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        keys = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not keys:
            raise WeightsMismatchError(
                f"{source}: no state dict found (top-level keys: {_short(list(obj))})"
            )
        if report is not None and len(obj) > 1:
            report.note(f"read the checkpoint's '{keys[0]}' entry (top level: {_short(list(obj))})")
        obj = obj[keys[0]]
    if not isinstance(obj, Mapping):
        raise WeightsMismatchError(f"{source}: expected a state dict, found {type(obj).__name__}")
    state = {_strip_prefixes(str(k)): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        heads: dict[str, int] = {}
        for key in [k for k in state if not k.startswith("backbone.")]:
            group = key.split(".")[0]
            heads[group] = heads.get(group, 0) + 1
            del state[key]
        state = {k[len("backbone.") :]: v for k, v in state.items()}
        if heads and report is not None:
            report.dropped.update(heads)
            report.note("kept backbone.*, dropped " + _groups(heads))
    return state


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(key: str) -> str:
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _groups(groups: Mapping[str, int]) -> str:
    return ", ".join(f"{g} ({n} tensors)" for g, n in sorted(groups.items()))


def _short(items: list, n: int = _SHOW) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# --- checking -------------------------------------------------------------------------------------


def mismatches(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> str:
    """'' when the names and shapes agree, else one line: missing, unexpected, mis-shaped."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [
        f"{k} file {tuple(state_dict[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    parts = [
        f"{len(items)} {title} ({_short(items)})"
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", reshaped),
        )
        if items
    ]
    return "; ".join(parts)


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, name: str = ""
) -> None:
    """Raise WeightsMismatchError (one line) naming what is missing, unexpected or mis-shaped."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = mismatches(expected, state_dict)
    if problems:
        raise WeightsMismatchError(f"{source} does not fit {name or 'the model'}: {problems}")


def load_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, name: str = ""
) -> None:
    """check_state_dict, then load; dtype differences are cast by load_state_dict."""
    check_state_dict(model, state_dict, source, name)
    model.load_state_dict(state_dict, strict=True)


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights detached, on the CPU and contiguous: what safetensors writes."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
