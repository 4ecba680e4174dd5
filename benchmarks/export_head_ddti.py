"""Export of a fine-tuned segmentation head: Dice change of ONNX fp32/int8 on real DDTI images.

A short CPU fine-tune of `sonodistill.evaluate`'s U-Net around an encoder (default: random
ResNet-18) on DDTI images whose names sort first, then `sonodistill export --head` with the
Dice on other DDTI images (names sorting last, disjoint from training). It checks the export
path on a trained head, not the paper's Dice. Usage:
    python benchmarks/export_head_ddti.py [--encoder student:RUN_DIR] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sonodistill.data.masks import image_mask
from sonodistill.deploy.export import ExportConfig, export, report_markdown
from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, save_head

DDTI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ddti"


def load(files: list[Path], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = [np.asarray(Image.open(f).convert("L").resize((size, size))) for f in files]
    masks = [image_mask(f, size) for f in files]
    x = torch.from_numpy(np.stack(images)).float().div(255).unsqueeze(1)
    return x, torch.from_numpy(np.stack(masks)).float().unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="random:resnet18")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--out", default="runs/export_head_ddti")
    args = parser.parse_args()
    torch.manual_seed(0)
    files = sorted((DDTI / "image").glob("*.PNG"))
    train, test = files[: args.n_train], files[-args.n_test :]
    x, y = load(train, args.size)
    spec = HeadSpec(task_type="seg", encoder=args.encoder, protocol="finetune", num_classes=2)
    model = build_head_model(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (16,))
        logits = model(x[idx])
        p = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (p * y[idx]).sum() + 1) / (p.sum() + y[idx].sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y[idx]) + soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        test_dir = Path(tmp) / "test"  # links to the held-out images, DDTI layout
        (test_dir / "image").mkdir(parents=True)
        (test_dir / "mask").mkdir()
        for f in test:
            (test_dir / "image" / f.name).symlink_to(f)
            (test_dir / "mask" / f.name).symlink_to(DDTI / "mask" / f.name)
        save_head(model.eval(), spec, Path(tmp) / "head")
        cfg = ExportConfig(
            head=str(Path(tmp) / "head"),
            frames=[f"ddti={DDTI}", f"busi={DDTI.parent / 'busi' / 'Dataset_BUSI_with_GT'}"],
            test_set=str(test_dir),
            n_test=args.n_test,
            image_size=args.size,
            out=args.out,
            overwrite=True,  # a benchmark replaces its previous output
        )
        print(report_markdown(export(cfg)))


if __name__ == "__main__":
    main()
