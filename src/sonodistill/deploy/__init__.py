"""Deployment: ONNX export (fp32, int8) checked against PyTorch, and the teacher-vs-student
cost benchmark (paper Table 5). Head checkpoints: `sonodistill.evaluate.head_checkpoint`."""

from sonodistill.deploy.onnx_utils import (
    compare,
    export_onnx,
    quantize_int8,
    run_session,
    session,
)
from sonodistill.models.flops import count_flops, count_params

__all__ = [
    "compare",
    "count_flops",
    "count_params",
    "export_onnx",
    "quantize_int8",
    "run_session",
    "session",
]
