"""The linear-probe suite on DDTI with and without the feature cache, side by side.

    python benchmarks/linear_probe_cache.py [--seeds 0 1 2] [--epochs 5] [--size 128]
        [--lr 1e-3] [--encoder fixed|random:resnet18|SPEC] [--threads 2] [--rounds 1]
        [--device cpu|cuda|auto]

Runs `sonodistill evaluate`'s suite (task ddti_seg, protocol linear, the given encoder and
seeds) twice per round in one process. `--encoder fixed` (the default) is a ResNet-18 whose
weights come from a file, as a distilled student's do (`student:RUN_DIR`): its seeds share the
features; `random:resnet18` draws new weights per seed, so each seed encodes the images anew.
The two paths: `--train.feature_cache false` (the old path: the frozen
encoder re-encodes the training and validation images every epoch) and the cached path
(features once per encoder weights and dataset), alternating which goes first, on the same
split file (hashed once, before the clocks start). Prints wall times, their ratio, and each
seed's test Dice and last training loss in both paths (the same result to float rounding). The
learning rate is 10x the paper's so that a 5-epoch probe moves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from sonodistill.evaluate.config import SplitConfig, SuiteConfig, TrainSettings
from sonodistill.evaluate.datasets import builtin_datasets, load_dataset
from sonodistill.evaluate.splits import load_or_make_splits
from sonodistill.evaluate.suite import run_suite

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def suite(out: Path, args, cache: bool) -> SuiteConfig:
    return SuiteConfig(
        out=str(out),
        data_root=str(DATA),
        encoders=[args.encoder],
        tasks=["ddti_seg"],
        protocols=["linear"],
        seeds=args.seeds,
        train=TrainSettings(
            seg_image_size=args.size,
            epochs=args.epochs,
            lr=args.lr,
            feature_cache=cache,
            device=args.device,
        ),
    )


def results(out: Path) -> dict[int, tuple[float, float]]:
    """Test Dice and last training loss per seed."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return {r["seed"]: (r["test"]["dice"], r["history"][-1]["train_loss"]) for r in runs}


def fixed_resnet18(folder: Path) -> str:
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = folder / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return f"timm:resnet18={path}@R18 (weights from a file)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--encoder", default="fixed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (evaluate's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {False: [], True: []}
    dice: dict[bool, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.encoder == "fixed":
            args.encoder = fixed_resnet18(Path(tmp))
        splits = Path(tmp) / "splits"  # hashed and split once, before the clocks start
        index = load_dataset(builtin_datasets(DATA)["ddti_seg"], "ddti_seg")
        load_or_make_splits(index, splits / "ddti_seg.json", SplitConfig())
        for round_ in range(args.rounds):
            for cache in (False, True) if round_ % 2 == 0 else (True, False):
                out = Path(tmp) / f"{'cached' if cache else 'uncached'}_{round_}"
                shutil.copytree(splits, out / "splits")
                start = time.perf_counter()
                run_suite(suite(out, args, cache))
                times[cache].append(time.perf_counter() - start)
                dice[cache] = results(out)
    old, new = (min(times[c]) for c in (False, True))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\nDDTI linear probe, {args.encoder}, {args.epochs} epochs, {args.size} px, lr "
        f"{args.lr:g}, seeds {args.seeds}, {args.device}, {args.threads} threads, load average "
        f"{load}; best of "
        f"{args.rounds} "
        "round(s)\n"
    )
    print("| path | wall time (s) | test Dice per seed | last training loss per seed |")
    print("|---|---|---|---|")
    for cache, value in ((False, old), (True, new)):
        shown = [", ".join(f"{dice[cache][s][k]:.4f}" for s in args.seeds) for k in (0, 1)]
        label = "cached features" if cache else "uncached (feature_cache false, the old path)"
        print(f"| {label} | {value:.1f} | {shown[0]} | {shown[1]} |")
    worst = [max(abs(dice[True][s][k] - dice[False][s][k]) for s in args.seeds) for k in (0, 1)]
    print(
        f"\ncached / uncached: {old / new:.2f}x faster; largest differences: Dice "
        f"{worst[0]:.1e}, training loss {worst[1]:.1e}"
    )


if __name__ == "__main__":
    main()
