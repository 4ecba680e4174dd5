"""ONNX export parity of a ResNet-50 student on real frames (fp32 and int8 vs PyTorch), 224 px.

Runs `sonodistill export` on a distill run dir (`--student RUN_DIR`; without one, a randomly
initialised ResNet-50 in the same format) with calibration and check frames from BUSI, DDTI and
COVID-BLUES lung clips in ../shared/data. Usage:
    python benchmarks/export_parity.py [--student runs/distill] [--out runs/export_parity]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
import yaml
from safetensors.torch import save_file

from sonodistill.deploy.export import ExportConfig, export, report_markdown

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_student(folder: Path) -> Path:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet50", pretrained=False, num_classes=0)
    save_file(backbone.state_dict(), str(folder / "student_backbone.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"student": {"name": "resnet50"}}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="distill run dir (default: random ResNet-50)")
    parser.add_argument("--out", default="runs/export_parity")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--n-check", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        student = args.student or str(random_student(Path(tmp)))
        cfg = ExportConfig(
            encoder=f"student:{student}",
            frames=[
                f"busi={DATA / 'busi' / 'Dataset_BUSI_with_GT'}",
                f"ddti={DATA / 'ddti'}",
                f"lung={DATA / 'corpus' / 'covid_blues' / 'lus_videos'}",
            ],
            out=args.out,
            image_size=args.image_size,
            n_calib=args.n_calib,
            n_check=args.n_check,
            overwrite=True,  # a benchmark replaces its previous output
        )
        print(report_markdown(export(cfg)))


if __name__ == "__main__":
    main()
