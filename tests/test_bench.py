"""`sonodistill bench` (Table 5) with tiny models: FLOP and parameter counts checked by hand,
the table's structure and ratios; speed is never asserted."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch
from conftest import BUSI, TINY_TEACHER_KWARGS
from torch import nn

from sonodistill.cli import main
from sonodistill.deploy.bench import (
    BenchConfig,
    _ratio,
    bench,
    time_blocks,
    time_fn,
)
from sonodistill.errors import UserError
from sonodistill.models.encoders import EncoderSpec, build_encoder
from sonodistill.models.flops import count_flops, count_params


def test_flops_are_two_per_mac():
    flops, _ = count_flops(nn.Linear(10, 20), torch.randn(3, 10))
    assert flops == 2 * 3 * 10 * 20
    conv_flops, _ = count_flops(nn.Conv2d(4, 8, 3, bias=False), torch.randn(1, 4, 10, 10))
    assert conv_flops == 2 * (8 * 8) * 8 * 4 * 9  # output pixels x out x in x kernel


def test_vit_attention_is_counted_on_cpu():
    enc = build_encoder(
        EncoderSpec(family="dinov3", weights="random", model_kwargs=TINY_TEACHER_KWARGS)
    )
    size, vit = 64, enc.backbone
    flops, by_op = count_flops(enc, torch.randn(1, 3, size, size))
    n = vit.num_prefix_tokens + (size // 16) ** 2
    # Q K^T and attn V: 2 matmuls of N x N x D MACs per block, 2 FLOPs each.
    attention = len(vit.blocks) * 2 * 2 * n * n * vit.embed_dim
    assert by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == attention
    assert flops == attention + by_op["aten.addmm"] + by_op["aten.convolution"]


def test_ratio_wording():
    assert _ratio(86.0, 25.0, False, "smaller") == "3.44x smaller (-70.9%)"
    assert _ratio(2.3, 27.6, True, "higher") == "12.00x higher (+1100.0%)"
    assert _ratio(10.0, 20.0, False, "faster") == "2.00x slower (+100.0%)"


def test_time_fn_statistics():
    calls = []
    stats = time_fn(lambda: calls.append(1), warmup=2, runs=5)
    assert len(calls) == 7
    assert stats["throughput"] == pytest.approx(1000.0 / stats["latency_ms"])


def test_time_blocks_runs_each_model_in_turns_of_consecutive_runs():
    order: list[str] = []
    stats = time_blocks(
        {"t": lambda: order.append("t"), "s": lambda: order.append("s")},
        warmup=1,
        runs=5,
        block=2,
    )
    # Warm-up, then per block one untimed run and two timed ones; turns reversed every round;
    # the last block is cut to the 5 runs asked for.
    assert "".join(order) == "ts" + "ttt" + "sss" + "sss" + "ttt" + "tt" + "ss"
    assert set(stats) == {"t", "s"} and stats["t"]["latency_median_ms"] >= 0


def test_bench_tiny_teacher_vs_resnet18(shared_data, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # as the CLI logs: the quantiser's chatter must not show
    cfg = BenchConfig(
        teacher={
            "family": "dinov3",
            "weights": "random",
            "label": "tiny-ViT",
            "model_kwargs": TINY_TEACHER_KWARGS,
        },
        student="random:resnet18@R18",
        image_size=32,
        warmup=1,
        runs=2,
        threads=1,
        calib_frames=[f"busi={shared_data / BUSI}"],
        n_calib=2,
        device="cpu",
        out=str(tmp_path / "bench"),
    )
    result = bench(cfg)
    t, s = result["teacher"], result["student"]
    assert t["params_backbone"] == count_params(
        build_encoder(
            EncoderSpec(family="dinov3", weights="random", model_kwargs=TINY_TEACHER_KWARGS)
        ).backbone
    )
    assert s["params_backbone"] == 11_176_512  # timm resnet18 without classifier
    assert t["params_head"] == 48 * 3 + 3  # linear classifier on the CLS token
    assert s["params_head"] == 512 * 96 + 96  # 1x1 conv to 2 blocks x 48 teacher channels
    for backend in ("torch", "ort_fp32", "ort_int8"):
        assert t[backend]["latency_ms"] > 0 and s[backend]["latency_ms"] > 0
    assert "real frames" in result["env"]["calibration"] and result["env"]["threads"] == 1

    table = pd.read_csv(tmp_path / "bench" / "table5.csv")
    assert list(table.columns) == [
        "metric",
        "teacher: tiny-ViT",
        "student: R18",
        "student vs teacher",
    ]
    metrics = table.metric.tolist()
    assert metrics[:3] == [
        "Parameters, backbone only (M)",
        "Parameters, backbone + head (M)",
        "FLOPs (GFLOPs, 1 MAC = 2 FLOPs)",
    ]
    assert "CPU latency, ONNX Runtime int8, 1 threads (ms, mean ± std)" in metrics
    deployed = table.set_index("metric").loc[
        "CPU latency, deployed student (ONNX Runtime int8) vs teacher (PyTorch fp32), "
        "1 threads (ms, mean ± std)"
    ]
    ratio = t["torch"]["latency_median_ms"] / s["ort_int8"]["latency_median_ms"]
    word = "faster" if ratio >= 1 else "slower"
    assert deployed["student vs teacher"].startswith(f"{max(ratio, 1 / ratio):.2f}x {word}")
    for chatter in ("Created a copy of bias input", "Axis 1 is out-of-range", "Performing sym"):
        assert chatter not in caplog.text  # ONNX Runtime's quantiser, once per tensor
    assert table.iloc[0]["student vs teacher"].endswith(
        "larger (+%.1f%%)"
        % ((s["params_backbone"] - t["params_backbone"]) / t["params_backbone"] * 100)
    )
    md = (tmp_path / "bench" / "table5.md").read_text()
    assert "1 CPU threads" in md and "Head: teacher = linear classifier" in md
    saved = json.loads((tmp_path / "bench" / "table5.json").read_text())
    assert saved["student"]["flops"] == s["flops"] > 0


def test_cli_subset_of_backends_with_the_names_before_0_2(tmp_path, capsys):
    flags = f"--student random:resnet18@r18 --out {tmp_path / 'b'} --student_head mlp"
    flags += " --image_size 32 --warmup 0 --runs 2 --threads 1 --backends [torch_fp32] --gpu off"
    teacher = {"family": "dinov3", "weights": "random", "model_kwargs": TINY_TEACHER_KWARGS}
    argv = [*flags.split(), "--teacher", json.dumps(teacher)]
    assert main(["bench", *argv]) == 0
    captured = capsys.readouterr()
    assert "PyTorch fp32" in captured.out and "ONNX Runtime" not in captured.out
    assert "mlp, to 2 x teacher width" in captured.out  # --student_head is --student_projection
    lines = [line for line in captured.err.splitlines() if "is deprecated" in line]
    old = [line.split(": ", 1)[1].split(" is deprecated")[0] for line in lines]
    assert old == ["--student_head", "--gpu", "--device off", "backend torch_fp32"]
    saved = (tmp_path / "b" / "config.yaml").read_text()
    assert "device: cpu" in saved and "- torch\n" in saved and "student_projection: mlp" in saved
    # A second bench into the same folder: refused, unless it overwrites.
    assert main(["bench", *argv]) == 2
    assert "already holds a sonodistill bench run" in capsys.readouterr().err
    assert main(["bench", *argv, "--overwrite", "true"]) == 0


@pytest.mark.parametrize(
    "option, message",
    [
        ({"backends": ["ort_int9"]}, "--backends ort_int9: unknown backend; did you mean ort_int8"),
        ({"block": 0}, "--block 0: must be > 0"),
        ({"warmup": -1}, "--warmup -1: must be >= 0"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, option, message):
    cfg = BenchConfig(student="random:resnet18", device="cpu", out=str(tmp_path / "b"), **option)
    with pytest.raises(UserError, match=message):
        bench(cfg)
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_on_without_cuda_is_a_clear_error(tmp_path):
    cfg = BenchConfig(
        teacher={"family": "dinov3", "weights": "random", "model_kwargs": TINY_TEACHER_KWARGS},
        student="random:resnet18",
        image_size=32,
        warmup=0,
        runs=1,
        backends=[],
        device="cuda",
        out=str(tmp_path / "b"),
    )
    with pytest.raises(UserError, match="^--device cuda: CUDA is not available here"):
        bench(cfg)
    assert not (tmp_path / "b").exists()


def test_bench_times_the_on_device_runtime_beside_onnx_int8(shared_data, tmp_path):
    # ExecuTorch int8 (XNNPACK) beside ONNX Runtime int8, for the student (the on-device
    # model); the teacher's cell says n/a and the table says why.
    cfg = BenchConfig(
        teacher={"family": "dinov3", "weights": "random", "model_kwargs": TINY_TEACHER_KWARGS},
        student="random:resnet10t@R10t",  # smallest timm ResNet: lowers in 2/3 of R18 time
        image_size=32,
        warmup=1,
        runs=2,
        threads=1,
        backends=["ort_int8", "executorch_int8"],
        calib_frames=[f"busi={shared_data / BUSI}"],
        n_calib=2,
        device="cpu",
        out=str(tmp_path / "bench"),
    )
    result = bench(cfg)
    student = result["student"]["executorch_int8"]
    assert student["latency_ms"] > 0 and student["file_mb"] > 0
    assert result["student"]["ort_int8"]["latency_ms"] > 0
    rows = {
        r["metric"].split(",")[1].strip(): r for r in result["rows"] if "latency" in r["metric"]
    }
    assert set(rows) == {"ONNX Runtime int8", "ExecuTorch XNNPACK int8"}
    assert "executorch_int8" not in result["teacher"]
    assert rows["ExecuTorch XNNPACK int8"]["teacher"] == "n/a"
    assert rows["ExecuTorch XNNPACK int8"]["student vs teacher"] == ""
    note = (tmp_path / "bench" / "table5.md").read_text()
    assert (
        "No ExecuTorch XNNPACK int8 row for the teacher: the on-device model is the student" in note
    )
