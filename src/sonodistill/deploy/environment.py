"""Where a timing was taken: CPU, threads, library versions (bench's table, predict's summary).

Versions are read from the modules a command has loaded (and from the installed package
metadata otherwise), so that `predict --backend ort_int8` reports its environment without
importing torch.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path


def default_threads() -> int:
    """CPU threads when --threads is not given: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_name() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _version(package: str) -> str | None:
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict:
    """CPU, threads, torch and onnxruntime versions; native bf16 and the GPU when torch is
    loaded (a command that runs no PyTorch model does not import it to say so)."""
    env = {
        "cpu": cpu_name(),
        "threads": threads,
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "bf16_native": None,
        "gpu": None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if "torch" in sys.modules:
        import torch

        from sonodistill.deploy.torch_runtime import bf16_native

        env["bf16_native"] = bf16_native()
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env
