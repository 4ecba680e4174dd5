"""Why `bench`'s ResNet-50 student could time slower than a plain timm ResNet-50 exported and
quantised the same way: each difference alone, timed in alternating blocks in one process.

    python benchmarks/bench_student_vs_plain.py [--threads 2] [--runs 30] [--block 5]

Variants, each exported to ONNX (opset 18, legacy exporter) and quantised by the project's
`quantize_int8` (static QDQ, per-channel int8 weights, uint8 activations) on the same real frames:
  student            what `bench` times: grey frames in, preprocessing in the graph, the last
                     feature map out, dynamic batch axis
  student_static     the same with a fixed batch of 1
  student_no_preproc the encoder alone on normalised 3-channel input (dynamic batch)
  plain_features     timm resnet50(num_classes=0): pooled features out, static batch 1
  plain              timm resnet50 with its 1000-class head, static batch 1
Then the old `bench` protocol: the int8 student alternated run by run with the fp32 PyTorch
ViT-B/16 teacher (343 MB of weights through the caches between two student runs), against
blocks of consecutive runs. Prints medians (ms) and ratios to `plain`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from sonodistill.data.listing import collect_frames, frames_tensor
from sonodistill.deploy.onnx_utils import quantize_int8, session
from sonodistill.evaluate.heads import WithPreprocess
from sonodistill.models import to_model_input
from sonodistill.models.encoders import build_encoder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Features(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def export(model: nn.Module, path: Path, channels: int, dynamic: bool) -> Path:
    x = torch.rand(1, channels, 224, 224)
    axes = {"frames": {0: "batch"}, "out": {0: "batch"}} if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["frames"],
            output_names=["out"],
            dynamic_axes=axes,
        )
    return path


def blocks(runners: dict, runs: int, block: int) -> dict[str, list[float]]:
    """Each runner `block` + 1 runs at a time (the first discarded), runners in turn, order
    reversed every round."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for round_ in range(-(-runs // block)):
        for key in keys if round_ % 2 == 0 else keys[::-1]:
            runners[key]()
            for _ in range(block):
                t0 = time.perf_counter()
                runners[key]()
                times[key].append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved(runners: dict, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for i in range(runs):
        for key in keys if i % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            runners[key]()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--n-calib", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sources = [f"busi={DATA / 'busi' / 'Dataset_BUSI_with_GT'}", f"ddti={DATA / 'ddti'}"]
    grey = frames_tensor(collect_frames(sources, args.n_calib // 2), 224)
    calib = {1: grey.numpy(), 3: to_model_input(grey).numpy()}
    student = build_encoder("random:resnet50").eval()
    variants = {
        "student": (WithPreprocess(student), 1, True),
        "student_static": (WithPreprocess(student), 1, False),
        "student_no_preproc": (Features(student), 3, True),
        "plain_features": (timm.create_model("resnet50", num_classes=0), 3, False),
        "plain": (timm.create_model("resnet50"), 3, False),
    }
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, channels, dynamic) in variants.items():
            fp32 = export(model, Path(tmp) / f"{name}.onnx", channels, dynamic)
            int8 = quantize_int8(fp32, Path(tmp) / f"{name}_int8.onnx", calib[channels])
            feed = {"frames": calib[channels][:1]}
            for kind, path in (("fp32", fp32), ("int8", int8)):
                sess = session(path, args.threads)
                runners[f"{name} {kind}"] = lambda s=sess, f=feed: s.run(None, f)
        for fn in runners.values():
            for _ in range(3):
                fn()
        alone = blocks(runners, args.runs, args.block)
        teacher = build_encoder("teacher:random").eval()
        x = to_model_input(grey[:1])
        with torch.inference_mode():
            pair = {"student int8": runners["student int8"], "teacher": lambda: teacher(x)}
            old = interleaved(pair, args.runs)
            new = blocks(pair, args.runs, args.block)
    med = {k: statistics.median(v) for k, v in alone.items()}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{args.threads} threads, load average {load}; medians of {args.runs} runs (ms)\n")
    print("| variant | fp32 | int8 | fp32 / plain | int8 / plain |\n|---|---|---|---|---|")
    for name in variants:
        f, i = med[f"{name} fp32"], med[f"{name} int8"]
        print(
            f"| {name} | {f:.1f} | {i:.1f} | {f / med['plain fp32']:.2f} | "
            f"{i / med['plain int8']:.2f} |"
        )
    print("\n| protocol | student int8 | teacher fp32 (PyTorch) | teacher / student |")
    print("|---|---|---|---|")
    for label, times in (("run by run (old bench)", old), ("blocks", new)):
        s, t = statistics.median(times["student int8"]), statistics.median(times["teacher"])
        print(f"| {label} | {s:.1f} | {t:.1f} | {t / s:.1f}x |")
    print(f"\nint8 calibrated on {len(grey)} real BUSI/DDTI frames")


if __name__ == "__main__":
    main()
