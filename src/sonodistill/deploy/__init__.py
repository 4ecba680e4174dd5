"""Deployment: ONNX export (fp32, int8) checked against PyTorch, and the teacher-vs-student
cost benchmark (paper Table 5). Head checkpoints: `sonodistill.evaluate.head_checkpoint`.

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

from sonodistill.utils.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
