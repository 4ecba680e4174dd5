"""The PyTorch backends (`torch`, `torch_bf16`): the model itself, eager, fp32 or bf16 autocast.

They write nothing: they run a model folder's PyTorch model (`head.yaml` + `model.safetensors`,
read with `evaluate.head_checkpoint.load_head`) or, in `sonodistill bench`, a module in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class TorchRunner:
    """Grey frames (N, 1, S, S) float32 -> the module's outputs, under inference mode; with
    `dtype` bfloat16, under CPU autocast."""

    def __init__(self, model: nn.Module, threads: int | None = None, dtype=None):
        if threads:
            torch.set_num_threads(threads)
        self.model, self.dtype = model.eval(), dtype

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames)
        if self.dtype is None:
            return self.model(x).numpy()
        with torch.autocast("cpu", dtype=self.dtype):
            return self.model(x).float().numpy()


def _model(source: Path | nn.Module) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    from sonodistill.evaluate.head_checkpoint import load_head

    return load_head(source)[0]


def open_fp32(source: Path | nn.Module, threads: int | None = None) -> TorchRunner:
    """A runner on a model folder (or a module), fp32."""
    return TorchRunner(_model(source), threads)


def open_bf16(source: Path | nn.Module, threads: int | None = None) -> TorchRunner:
    """A runner on a model folder (or a module), bf16 autocast (emulated where the CPU has no
    native bf16: see `bf16_native`)."""
    return TorchRunner(_model(source), threads, torch.bfloat16)


def bf16_native() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX): emulated bf16 would be a misleading
    timing."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
