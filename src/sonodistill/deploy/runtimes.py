"""Backends: how a model is written for a runtime, and how it is run there, one record each.

A `Backend` says which file of a model folder it reads, how `sonodistill export` (and `bench`,
in a temporary folder) writes that file, and how a runner is opened on it; export, bench,
predict and the app all go through `BACKENDS`, so a new target is one module with its two
functions and one registry entry (here, or from a plugin):

    BACKENDS.register("toy_ort", Backend("toy ONNX fp32", "model_toy.onnx",
                      open="sonodistill.deploy.onnx_utils:open_session",
                      write="sonodistill.deploy.onnx_utils:write_fp32"))

A *model folder* is either
- a head checkpoint (`head.yaml` + `model.safetensors`, from `sonodistill evaluate
  --save_models true`): the PyTorch backends;
- an export folder (from `sonodistill export --model`): each backend's file (`model_fp32.onnx`,
  `model_int8.onnx`, `model_{fp32,int8}.pte` for ExecuTorch, ...) and the model itself in
  `head/` for the PyTorch backends.
Every runner takes grey frames (N, 1, S, S) float32 in [0, 1] and returns the model's outputs
(segmentation logits (N, C, S, S), classification logits (N, K), a backbone's feature map) as
numpy.

Light: no torch, onnxruntime or numpy at import (the runtimes are imported by `open` and
`write`, given as `module:function` strings), so `predict --backend ort_int8` loads no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from sonodistill.errors import UserError
from sonodistill.registry import Registry
from sonodistill.utils.fields import registered

if TYPE_CHECKING:
    import numpy as np

    from sonodistill.evaluate.head_checkpoint import HeadSpec

    Runner = Callable[[np.ndarray], np.ndarray]

HEAD_DIR = "head"
"""Where an export folder keeps the model itself (for the PyTorch backends)."""
INSTALL_EXECUTORCH = "ExecuTorch is not installed: pip install 'sonodistill[ondevice]'"


@dataclass
class WriteJob:
    """What a backend's `write` gets: the model and where and how to write it."""

    model: Any
    """The torch module: grey frames (B, 1, S, S) in [0, 1] -> outputs."""
    path: Path
    """The file to write (atomically)."""
    image_size: int
    calibration: Any = None
    """Real frames (N, 1, S, S) float32 in [0, 1] for int8 backends, else None."""
    output: str = "features"
    """Name of the graph's output: `features` (a backbone) or `logits` (a model)."""
    opset: int = 18
    exporter: str = "legacy"
    per_channel: bool = True
    calib_method: str = "minmax"
    written: dict[str, Path] = field(default_factory=dict)
    """Backends already written for this model ({name: file}): ort_int8 quantises ort_fp32's
    graph when it is there."""


@dataclass(frozen=True)
class Backend:
    """One runtime target: its file in a model folder, how it is written and opened."""

    label: str
    """In tables, predict's summary and the app's menu: `ONNX Runtime int8`."""
    file: str
    """What it reads in a model folder: `model_int8.onnx`; `head` (HEAD_DIR) for the PyTorch
    backends, which run the model itself."""
    open: Callable | str
    """open(source, threads) -> runner: `source` a file of a model folder (the model's folder
    for PyTorch backends, which also take an in-memory module); `module:function` strings
    are imported on first use."""
    write: Callable | str | None = None
    """write(WriteJob) -> the written file (export; bench in a temporary folder); None: nothing
    to write (the PyTorch backends run the model itself)."""
    int8: bool = False
    """Needs calibration frames."""
    requires: str | None = None
    """A module it needs that may be missing (`executorch`), checked before anything is written."""
    install_hint: str = ""
    """The one-line fix when `requires` is missing."""
    precision: Literal["fp32", "bf16", "int8"] = "fp32"
    """fp32 ones are held to export's `--tolerance` of PyTorch."""
    ondevice: bool = False
    """A phone's runtime: bench times it for the student (the on-device model) only, unless
    --ondevice_teacher."""

    @property
    def runs_the_model(self) -> bool:
        """A PyTorch backend: it runs the model (folder or module), no file of its own."""
        return self.file == HEAD_DIR

    def missing(self) -> str | None:
        """Why this backend cannot run here (its `requires` is not installed), else None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return self.install_hint or f"{self.requires} is not installed"
        return None

    def opener(self) -> Callable:
        return _resolve(self.open)

    def writer(self) -> Callable | None:
        return None if self.write is None else _resolve(self.write)


def _resolve(target: Callable | str) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


BACKENDS: Registry[Backend] = Registry("backend", key="backends")
"""Every runtime target, in the order tables and menus list them."""
_TORCH = "sonodistill.deploy.torch_runtime"
_ORT = "sonodistill.deploy.onnx_utils"
_PTE = "sonodistill.deploy.ondevice"
BACKENDS.register(
    "torch", Backend("PyTorch fp32", HEAD_DIR, open=f"{_TORCH}:open_fp32"), title="PyTorch fp32"
)
BACKENDS.register(
    "torch_bf16",
    Backend("PyTorch bf16", HEAD_DIR, open=f"{_TORCH}:open_bf16", precision="bf16"),
    title="PyTorch bf16 (autocast)",
)
BACKENDS.register(
    "ort_fp32",
    Backend(
        "ONNX Runtime fp32",
        "model_fp32.onnx",
        open=f"{_ORT}:open_session",
        write=f"{_ORT}:write_fp32",
    ),
    title="ONNX Runtime fp32",
)
BACKENDS.register(
    "ort_int8",
    Backend(
        "ONNX Runtime int8",
        "model_int8.onnx",
        open=f"{_ORT}:open_session",
        write=f"{_ORT}:write_int8",
        int8=True,
        precision="int8",
    ),
    title="ONNX Runtime int8 (static QDQ)",
)
for _precision in ("fp32", "int8"):
    BACKENDS.register(
        f"executorch_{_precision}",
        Backend(
            f"ExecuTorch XNNPACK {_precision}",
            f"model_{_precision}.pte",
            open=f"{_PTE}:open_pte",
            write=f"{_PTE}:write_pte_{_precision}",
            int8=_precision == "int8",
            requires="executorch",
            install_hint=INSTALL_EXECUTORCH,
            precision=_precision,
            ondevice=True,
        ),
        title=f"ExecuTorch XNNPACK {_precision} (on-device)",
    )
BACKENDS.alias("torch_fp32", "torch", deprecated=True)  # bench's id before 0.2

BackendName = registered(BACKENDS)
"""A registered backend name (`sonodistill registry backends`)."""


# --- model folders ----------------------------------------------------------------------------


@dataclass
class ModelFolder:
    """A head checkpoint or an export folder, with what it can run."""

    path: Path
    spec: HeadSpec
    image_size: int | None
    files: dict[str, Path] = field(default_factory=dict)
    """backend -> what it reads in the folder (the PyTorch backends: the model's folder)."""

    @property
    def backends(self) -> list[str]:
        return [b for b in BACKENDS if b in self.files]


def _is_head(path: Path) -> bool:
    # evaluate.head_checkpoint is imported inside functions: its light part (HeadSpec, the file
    # names) will not need torch (issue 20, WP-C); until then the import is the heavy one.
    from sonodistill.evaluate.head_checkpoint import HEAD_WEIGHTS, HEAD_YAML

    return (path / HEAD_YAML).is_file() and (path / HEAD_WEIGHTS).is_file()


def backend_of_file(path: str | Path) -> str | None:
    """The backend whose file this is (`.../model_int8.onnx` -> ort_int8), else None."""
    name = Path(path).name
    return next((n for n, b in BACKENDS.items() if b.file == name and not b.runs_the_model), None)


def default_backend(folder: ModelFolder) -> str:
    """PyTorch when the folder has the model itself, else its first runtime file."""
    return "torch" if "torch" in folder.files else folder.backends[0]


def open_model_folder(path: str | Path) -> ModelFolder:
    """Read a model folder's spec and list its backends; FileNotFoundError names what is off.
    A model file of an export folder (`model_int8.onnx`) stands for its folder."""
    from sonodistill.evaluate.head_checkpoint import HEAD_WEIGHTS, HEAD_YAML, read_head_spec

    path = Path(path)
    if path.is_file() and backend_of_file(path):
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    torch_backends = [n for n, b in BACKENDS.items() if b.runs_the_model]
    if _is_head(path):
        spec = read_head_spec(path)
        return ModelFolder(path, spec, spec.image_size, dict.fromkeys(torch_backends, path))
    head = path / HEAD_DIR
    if not _is_head(head):  # exports made before the model was copied beside the graphs
        config = path / "config.yaml"
        stored = yaml.safe_load(config.read_text()) if config.is_file() else None
        named = (stored or {}).get("model") or (stored or {}).get("head")
        head = Path(named) if named else head
    files = {n: path / b.file for n, b in BACKENDS.items() if not b.runs_the_model}
    files = {n: f for n, f in files.items() if f.is_file()}
    if not files and not _is_head(head):
        raise FileNotFoundError(
            f"{path}: neither a head checkpoint ({HEAD_YAML} + {HEAD_WEIGHTS}) nor an export "
            "folder (model_*.onnx / model_*.pte from sonodistill export --model)"
        )
    if not (head / HEAD_YAML).is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_DIR}/{HEAD_YAML} saying what the model outputs")
    spec = read_head_spec(head)
    size = spec.image_size or _onnx_size(files)
    if _is_head(head):
        files = {**dict.fromkeys(torch_backends, head), **files}
    return ModelFolder(path, spec, size, files)


def _onnx_size(files: dict[str, Path]) -> int | None:
    """The input side of an exported ONNX graph (read without its weights)."""
    for path in files.values():
        if path.suffix == ".onnx":
            import onnx

            dims = onnx.load(str(path), load_external_data=False).graph.input[0]
            side = dims.type.tensor_type.shape.dim[-1].dim_value
            return int(side) or None
    return None


def open_runner(folder: ModelFolder, backend: str, threads: int | None = None) -> Runner:
    """A callable running the folder's model in `backend`'s runtime."""
    name = BACKENDS.entry(backend, "--backend").name
    record = BACKENDS.get(name)
    if name not in folder.files:
        hint = "sonodistill export --model" + (
            f" --backends+ {name}" if not record.runs_the_model else ""
        )
        what = "PyTorch model (head.yaml)" if record.runs_the_model else record.file
        raise FileNotFoundError(
            f"{folder.path}: no {what} for backend {name} (has: "
            f"{', '.join(folder.backends) or 'none'}; make it with {hint})"
        )
    why = record.missing()
    if why:
        raise UserError(f"--backend {name}: {why}")
    return record.opener()(folder.files[name], threads)
