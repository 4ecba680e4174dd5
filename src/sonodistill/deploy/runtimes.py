"""Where a fine-tuned model lives and how to run it: one runtime per backend, one call per frame.

A *model folder* is either
- a head checkpoint (`head.yaml` + `model.safetensors`, from `sonodistill evaluate
  --save_models true`): backend `torch`;
- an export folder (from `sonodistill export --head`): `model_fp32.onnx`, `model_int8.onnx`,
  `model_{fp32,int8}.pte` (ExecuTorch) and the head itself in `head/` for `torch`.
Every runtime takes grey frames (N, 1, S, S) float32 in [0, 1] and returns the head's outputs
(segmentation logits (N, C, S, S), classification logits (N, K)) as numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from sonodistill.evaluate.head_checkpoint import (
    HEAD_WEIGHTS,
    HEAD_YAML,
    HeadSpec,
    load_head,
    read_head_spec,
)

HEAD_DIR = "head"  # an export folder keeps the PyTorch head here


@dataclass(frozen=True)
class Backend:
    label: str
    file: str | None
    """File in an export folder; None: the PyTorch head."""


BACKENDS: dict[str, Backend] = {
    "torch": Backend("PyTorch fp32", None),
    "ort_fp32": Backend("ONNX Runtime fp32", "model_fp32.onnx"),
    "ort_int8": Backend("ONNX Runtime int8", "model_int8.onnx"),
    "executorch_fp32": Backend("ExecuTorch XNNPACK fp32", "model_fp32.pte"),
    "executorch_int8": Backend("ExecuTorch XNNPACK int8", "model_int8.pte"),
}


@dataclass
class ModelFolder:
    """A head checkpoint or an export folder, with what it can run."""

    path: Path
    spec: HeadSpec
    image_size: int | None
    files: dict[str, Path] = field(default_factory=dict)
    """backend -> file present in the folder ('torch' -> the head folder)."""

    @property
    def backends(self) -> list[str]:
        return [b for b in BACKENDS if b in self.files]


def _is_head(path: Path) -> bool:
    return (path / HEAD_YAML).is_file() and (path / HEAD_WEIGHTS).is_file()


def backend_of_file(path: str | Path) -> str | None:
    """The backend whose file this is (`.../model_int8.onnx` -> ort_int8), else None."""
    name = Path(path).name
    return next((b for b, spec in BACKENDS.items() if spec.file == name), None)


def default_backend(folder: ModelFolder) -> str:
    """PyTorch when the folder has the head, else its first runtime file."""
    return "torch" if "torch" in folder.files else folder.backends[0]


def open_model_folder(path: str | Path) -> ModelFolder:
    """Read a model folder's spec and list its backends; FileNotFoundError names what is off.
    A model file of an export folder (`model_int8.onnx`) stands for its folder."""
    path = Path(path)
    if path.is_file() and backend_of_file(path):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if _is_head(path):
        spec = read_head_spec(path)
        return ModelFolder(path, spec, spec.image_size, {"torch": path})
    head = path / HEAD_DIR
    if not _is_head(head):  # exports made before the head was copied beside the graphs
        config = path / "config.yaml"
        named = yaml.safe_load(config.read_text()).get("head") if config.is_file() else None
        head = Path(named) if named else head
    files = {b: path / spec.file for b, spec in BACKENDS.items() if spec.file}
    files = {b: f for b, f in files.items() if f.is_file()}
    if not files and not _is_head(head):
        raise FileNotFoundError(
            f"{path}: neither a head checkpoint ({HEAD_YAML} + {HEAD_WEIGHTS}) nor an export "
            "folder (model_*.onnx / model_*.pte from sonodistill export --head)"
        )
    if not (head / HEAD_YAML).is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_DIR}/{HEAD_YAML} saying what the model outputs")
    spec = read_head_spec(head)
    size = spec.image_size or _onnx_size(files)
    if _is_head(head):
        files = {"torch": head, **files}
    return ModelFolder(path, spec, size, files)


def _onnx_size(files: dict[str, Path]) -> int | None:
    for backend in ("ort_fp32", "ort_int8"):
        if backend in files:
            import onnx

            dims = onnx.load(str(files[backend]), load_external_data=False).graph.input[0]
            side = dims.type.tensor_type.shape.dim[-1].dim_value
            return int(side) or None
    return None


class TorchRunner:
    def __init__(self, head_dir: Path, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model, _ = load_head(head_dir)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(frames)).numpy()


class OrtRunner:
    def __init__(self, path: Path, threads: int | None = None):
        from sonodistill.deploy.onnx_utils import session

        self.session = session(path, threads, spin=False)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: frames})[0]


def _pte(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    from sonodistill.deploy.ondevice import PteRunner

    return PteRunner(path, threads)


_OPENERS: dict[str, Callable[[Path, int | None], Callable[[np.ndarray], np.ndarray]]] = {
    "torch": TorchRunner,
    "ort_fp32": OrtRunner,
    "ort_int8": OrtRunner,
    "executorch_fp32": _pte,
    "executorch_int8": _pte,
}


def open_runner(
    folder: ModelFolder, backend: str, threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A callable running the folder's model in `backend`'s runtime."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, not {backend!r}")
    if backend not in folder.files:
        hint = "sonodistill export --head" + (
            " --executorch '[int8]'" if "pte" in str(BACKENDS[backend].file) else ""
        )
        raise FileNotFoundError(
            f"{folder.path}: no {BACKENDS[backend].file or 'PyTorch head'} for backend "
            f"{backend} (has: {', '.join(folder.backends) or 'none'}; make it with {hint})"
        )
    return _OPENERS[backend](folder.files[backend], threads)
