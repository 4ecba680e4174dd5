"""Deployment: ONNX export (fp32, int8) checked against PyTorch, and the teacher-vs-student
cost benchmark (paper Table 5). Head checkpoints: `sonodistill.evaluate.head_checkpoint`.

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

import importlib

_EXPORTS = {
    "compare": "sonodistill.deploy.onnx_utils",
    "export_onnx": "sonodistill.deploy.onnx_utils",
    "quantize_int8": "sonodistill.deploy.onnx_utils",
    "run_session": "sonodistill.deploy.onnx_utils",
    "session": "sonodistill.deploy.onnx_utils",
    "count_flops": "sonodistill.models.flops",
    "count_params": "sonodistill.models.flops",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
