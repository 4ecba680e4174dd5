"""ONNX export, ONNX Runtime sessions, int8 static quantization and output comparison; the
`ort_fp32` and `ort_int8` backends (`write_fp32`, `write_int8`, `open_session`).

torch is imported by the export alone, so that running an exported graph loads no torch.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sonodistill.io import atomic_path

if TYPE_CHECKING:
    from torch import nn

    from sonodistill.deploy.runtimes import WriteJob

log = logging.getLogger(__name__)

INPUT = "frames"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_size: int = 224,
    opset: int = 18,
    exporter: str = "legacy",
    output_names: Sequence[str] = ("features",),
) -> Path:
    """Export `model` (input: (B, 1, S, S) frames) with a dynamic batch axis.

    `legacy` is TorchScript-based torch.onnx.export (fast, robust for CNNs and timm ViTs here);
    `dynamo` uses torch.export + onnxscript.
    """
    import torch

    path = Path(path)
    model = model.eval()
    dummy = torch.rand(2, 1, image_size, image_size)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                model,
                (dummy,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT],
                output_names=list(output_names),
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
            program.save(str(tmp))
        elif exporter == "legacy":
            axes = {name: {0: "batch"} for name in (INPUT, *output_names)}
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT],
                output_names=list(output_names),
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        else:
            raise ValueError(f"exporter must be 'legacy' or 'dynamo', not {exporter!r}")
        import onnx

        onnx.checker.check_model(str(tmp))
    return path


def session(path: str | Path, threads: int | None = None, cuda: bool = False, spin: bool = True):
    """An ONNX Runtime session; `threads` fixes the intra-op thread count (timings); `spin`
    False stops its threads busy-waiting after each run (a pipeline doing other work between
    runs would otherwise lose that CPU to them)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), opts, providers=providers)


class OrtRunner:
    """Runs an ONNX graph: (N, 1, S, S) float32 frames -> its first output."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = session(path, threads, spin=False)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: frames})[0]


def open_session(path: str | Path, threads: int | None = None) -> OrtRunner:
    """The ONNX Runtime backends' runner on a `.onnx` file (`runtimes.Backend.open`)."""
    return OrtRunner(path, threads)


def write_fp32(job: WriteJob) -> Path:
    """The `ort_fp32` backend's file: the model as an fp32 ONNX graph (`runtimes.Backend.write`)."""
    return export_onnx(job.model, job.path, job.image_size, job.opset, job.exporter, (job.output,))


def write_int8(job: WriteJob) -> Path:
    """The `ort_int8` backend's file: the fp32 graph (ort_fp32's, else one made here in a
    temporary folder) statically quantised on the job's calibration frames."""
    fp32 = job.written.get("ort_fp32")
    with tempfile.TemporaryDirectory() as tmp:
        if fp32 is None:
            fp32 = write_fp32(replace(job, path=Path(tmp) / "model_fp32.onnx"))
        return quantize_int8(fp32, job.path, job.calibration, job.per_channel, job.calib_method)


def run_session(sess, frames: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """First output of the session for (N, 1, S, S) float32 frames, in batches."""
    name = sess.get_inputs()[0].name
    outs = [
        sess.run(None, {name: frames[i : i + batch_size].astype(np.float32)})[0]
        for i in range(0, len(frames), batch_size)
    ]
    return np.concatenate(outs)


class FramesReader:
    """onnxruntime CalibrationDataReader over real frames, one frame per call (batch 1)."""

    def __init__(self, frames: np.ndarray, input_name: str = INPUT):
        self.frames = frames.astype(np.float32)
        self.input_name = input_name
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.frames):
            return None
        self.i += 1
        return {self.input_name: self.frames[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calib_frames: np.ndarray,
    per_channel: bool = True,
    method: str = "minmax",
) -> Path:
    """Static int8 quantization (QDQ; weights int8 per channel, activations uint8) calibrated
    on real frames. quant_pre_process (shape inference + graph optimisation) comes first, as
    onnxruntime recommends."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    reader = type("Reader", (FramesReader, CalibrationDataReader), {})(calib_frames)
    out_path = Path(out_path)
    with (
        tempfile.TemporaryDirectory() as tmp,
        _quiet_quantizer(),
        atomic_path(out_path) as partial,
    ):
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        quantize_static(
            str(pre),
            str(partial),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
        )
    return out_path


class _QuantizerChatter(logging.Filter):
    """ONNX Runtime's quantiser logs on the root logger, once per tensor, dozens of lines per
    model: "Created a copy of bias input ..." (a shared bias initializer), "Axis 1 is
    out-of-range for weight ..." (a 1-D weight skipped by per-channel quantisation). Neither
    asks the user for anything; errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname


@contextlib.contextmanager
def _quiet_quantizer():
    """Quantiser messages below errors dropped: those on the root logger by the filter, those
    on onnxruntime's own loggers by their level."""
    root, chatter, ort = logging.getLogger(), _QuantizerChatter(), logging.getLogger("onnxruntime")
    level = ort.level
    root.addFilter(chatter)
    ort.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.removeFilter(chatter)
        ort.setLevel(level)


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Max/mean abs difference and per-sample cosine similarity (mean and worst)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = other.reshape(len(other), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "max_abs": float(np.abs(a - b).max()),
        "mean_abs": float(np.abs(a - b).mean()),
        "ref_abs_max": float(np.abs(a).max()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }
