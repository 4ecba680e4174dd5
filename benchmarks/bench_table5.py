"""The paper's Table 5 at full size: DINOv3 ViT-B/16 teacher vs ResNet-50 student, 224 px.

One `sonodistill bench` run: parameters, FLOPs, CPU latency/throughput for PyTorch fp32/bf16
and ONNX Runtime fp32/int8 (int8 calibrated on real BUSI, DDTI and lung frames from
../shared/data), and the GPU rows when CUDA is present. Weights do not change the cost, so
both models are randomly initialised unless given. Usage:
    python benchmarks/bench_table5.py [--threads 2] [--runs 50] [--student student:RUN_DIR]
        [--out runs/bench_table5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sonodistill.deploy.bench import BenchConfig, bench

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--teacher", default="teacher:random@ViT-B/16 DINOv3 teacher")
    parser.add_argument("--student", default="random:resnet50@ResNet-50 student")
    parser.add_argument("--out", default="runs/bench_table5")
    args = parser.parse_args()
    calib = [
        f"busi={DATA / 'busi' / 'Dataset_BUSI_with_GT'}",
        f"ddti={DATA / 'ddti'}",
        f"lung={DATA / 'corpus' / 'covid_blues' / 'lus_videos'}",
    ]
    cfg = BenchConfig(
        teacher=args.teacher,
        student=args.student,
        image_size=args.image_size,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        calib_frames=calib,
        n_calib=16,
        out=args.out,
        overwrite=True,  # a benchmark replaces its previous table
    )
    bench(cfg)
    print((Path(args.out) / "table5.md").read_text())


if __name__ == "__main__":
    main()
