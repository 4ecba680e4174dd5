"""On-device models: ExecuTorch programs (`.pte`) for its XNNPACK CPU backend, fp32 or int8.

int8 goes through PyTorch's export quantisation (torchao's pt2e flow with ExecuTorch's
XNNPACKQuantizer: symmetric int8, per-channel weights, static activations calibrated on real
frames), then `to_edge_transform_and_lower` delegates the graph to XNNPACK, the runtime that
ExecuTorch ships for Android/iOS CPUs. The program's input is a grey frame (1, 1, S, S) in
[0, 1] like the ONNX graphs (normalisation inside); batch 1, as a scanner feeds it.

Why ExecuTorch rather than ONNX Runtime's mobile format: executorch 1.5.1 installs beside
torch 2.14.1 without changing it (checked with pip in a scratch venv first), and its Python
runtime runs the very `.pte` a phone runs, so that outputs and timings here are those of the
on-device runtime. It is an optional dependency: `pip install 'sonodistill[ondevice]'`. The
backends `executorch_fp32` and `executorch_int8` (`deploy.runtimes`) write and open through
`write_pte_fp32`, `write_pte_int8` and `open_pte`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sonodistill.deploy.runtimes import INSTALL_EXECUTORCH as INSTALL_HINT
from sonodistill.io import write_bytes

if TYPE_CHECKING:
    from torch import nn

    from sonodistill.deploy.runtimes import WriteJob

log = logging.getLogger(__name__)


def _import_executorch():
    # Importing torchao/ExecuTorch logs a deprecation warning through torch's pytree logger.
    quiet = logging.getLogger("torch.utils._pytree")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import executorch.runtime as runtime
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    finally:
        quiet.setLevel(level)
    return {
        "runtime": runtime,
        "partitioner": XnnpackPartitioner,
        "quantizer": XNNPACKQuantizer,
        "qconfig": get_symmetric_quantization_config,
        "lower": to_edge_transform_and_lower,
        "prepare": prepare_pt2e,
        "convert": convert_pt2e,
    }


def export_pte(
    model: nn.Module,
    path: str | Path,
    image_size: int,
    calib_frames: np.ndarray | None = None,
    quantize: bool = True,
) -> Path:
    """Write `model` (grey (1, 1, S, S) frames -> outputs) as an XNNPACK-delegated `.pte`.

    int8 (`quantize`) needs calibration frames (N, 1, S, S) in [0, 1], real ones.
    """
    import torch

    et = _import_executorch()
    path = Path(path)
    example = (torch.rand(1, 1, image_size, image_size),)
    with torch.no_grad():
        program = torch.export.export(model.eval(), example)
        if quantize:
            if calib_frames is None or not len(calib_frames):
                raise ValueError("int8 ExecuTorch export: give real calibration frames")
            quantizer = et["quantizer"]()
            quantizer.set_global(et["qconfig"](is_per_channel=True))
            prepared = et["prepare"](program.module(), quantizer)
            for frame in calib_frames:
                prepared(torch.from_numpy(np.ascontiguousarray(frame[None], np.float32)))
            program = torch.export.export(et["convert"](prepared), example)
        lowered = et["lower"](program, partitioner=[et["partitioner"]()]).to_executorch()
    return write_bytes(path, lowered.buffer)  # atomic: temp, fsync, rename


def write_pte_fp32(job: WriteJob) -> Path:
    """The `executorch_fp32` backend's file (`runtimes.Backend.write`)."""
    log.info("ExecuTorch fp32: exporting %s", job.path)
    return export_pte(job.model, job.path, job.image_size, None, quantize=False)


def write_pte_int8(job: WriteJob) -> Path:
    """The `executorch_int8` backend's file, calibrated on the job's frames."""
    log.info("ExecuTorch int8: exporting %s", job.path)
    return export_pte(job.model, job.path, job.image_size, job.calibration, quantize=True)


def open_pte(path: str | Path, threads: int | None = None) -> PteRunner:
    """The ExecuTorch backends' runner on a `.pte` file (`runtimes.Backend.open`)."""
    return PteRunner(path, threads)


def set_threads(threads: int | None) -> None:
    """Threads of ExecuTorch's XNNPACK thread pool (process-wide)."""
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))


class PteRunner:
    """Runs a `.pte` in ExecuTorch's runtime: (N, 1, S, S) float32 -> first output, N calls."""

    def __init__(self, path: str | Path, threads: int | None = None):
        runtime = _import_executorch()["runtime"]
        set_threads(threads)
        self.path = Path(path)
        self.method = runtime.Runtime.get().load_program(str(self.path)).load_method("forward")

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        outs = [
            self.method.execute([torch.from_numpy(np.ascontiguousarray(f[None], np.float32))])[0]
            for f in frames
        ]
        return torch.cat(outs).numpy()
