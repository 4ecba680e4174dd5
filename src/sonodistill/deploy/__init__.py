"""Deployment: ONNX export (fp32, int8) checked against PyTorch, and the teacher-vs-student
cost benchmark (paper Table 5)."""

from sonodistill.deploy.flops import count_flops, count_params
from sonodistill.deploy.heads import HeadSpec, load_head, save_evaluate_head, save_head
from sonodistill.deploy.onnx_utils import (
    WithPreprocess,
    compare,
    export_onnx,
    quantize_int8,
    run_session,
    session,
)

__all__ = [
    "HeadSpec",
    "WithPreprocess",
    "compare",
    "count_flops",
    "count_params",
    "export_onnx",
    "load_head",
    "quantize_int8",
    "run_session",
    "save_evaluate_head",
    "save_head",
    "session",
]
