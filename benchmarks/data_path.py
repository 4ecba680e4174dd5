"""Can the data path feed a GPU cluster? Decode + resize images/s per CPU core from a corpus's
PNG frames and from its memory-mapped pack, and the cores that feed 2,500 images/s.

    python benchmarks/data_path.py [--work /tmp/sonodistill-data-path] [--size 224]
        [--clips 24] [--seconds 4] [--rounds 3]

Builds (once; kept in --work) a corpus from real files of ../shared/data/corpus (lung-ultrasound
clips, the DICOM echo cine and the PLUS phantom sequences; never an evaluation set), packs it
with `sonodistill corpus pack` at 256 px (the pack's default) and at the training size, then
times what one DataLoader worker does per image, in one process on one core (torch and OpenCV
single-threaded; per second of this process's CPU time, so that a shared machine's other jobs do
not dilute it), the three sources in turn round after round, in a random order of frames (as
the sampler draws them):
  png        the corpus folder: PNG decode, grey, resize to the training size (cv2 INTER_AREA)
  pack       the 256 px pack: memory-map read + resize to the training size (cv2 INTER_AREA)
  pack_fit   a pack at the training size: memory-map read, no resize
The files are in the page cache after the build (a warm cache, as after a first epoch); the
augmentation is not here: it runs batched on the GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from pathlib import Path

import cv2
import torch
import yaml

from sonodistill.data.corpus import build_corpus
from sonodistill.data.images import open_training_images
from sonodistill.data.pack import pack_corpus
from sonodistill.data.sources import BuildSettings, load_sources

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
TARGET = 2500  # images/s


def corpus(work: Path, clips: int) -> Path:
    out = work / "corpus"
    if (out / "manifest.parquet").is_file():
        return out
    videos = sorted((CORPUS / "covid_blues" / "lus_videos").glob("*.mp4"))[:clips]
    sources = [{"dataset": "covid_blues", "anatomy": "lung", "path": str(v)} for v in videos] + [
        {"dataset": "dicom", "anatomy": "heart", "path": str(CORPUS / "dicom")},
        {"dataset": "plus", "anatomy": "phantom", "path": str(CORPUS / "plus" / "TestImages")},
    ]
    work.mkdir(parents=True, exist_ok=True)
    (work / "sources.yaml").write_text(yaml.safe_dump({"sources": sources}))
    build_corpus(load_sources(work / "sources.yaml", BuildSettings(workers=2)), out)
    return out


def rate(dataset, order: list[int], seconds: float) -> float:
    """Items per CPU second of this (single-threaded) process over `seconds` of CPU time of
    __getitem__ calls in `order` (cycled): a per-core rate that other processes on a shared
    machine do not dilute."""
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        dataset[order[done % len(order)]]
        done += 1
    return done / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/sonodistill-data-path")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    work = Path(args.work)
    root = corpus(work, args.clips)
    packs = {256: work / "pack256", args.size: work / f"pack{args.size}"}
    for size, folder in packs.items():
        if not (folder / "pack.json").is_file():
            pack_corpus(root, folder, image_size=size)
    sources = {
        "png": open_training_images(root, args.size),
        "pack": open_training_images(packs[256], args.size),
        "pack_fit": open_training_images(packs[args.size], args.size),
    }
    n = len(sources["png"])
    order = random.Random(0).sample(range(n), n)
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for round_ in range(args.rounds):
        names = list(sources) if round_ % 2 == 0 else list(sources)[::-1]
        for name in names:
            rates[name].append(rate(sources[name], order, args.seconds))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\n{n} corpus frames ({args.clips} lung clips, DICOM, PLUS), training size "
        f"{args.size} px, one core, median of {args.rounds} rounds of {args.seconds:g} CPU-s; "
        f"load average {load}\n"
    )
    print(f"| source | images/s per core | cores for {TARGET:,} images/s |\n|---|---|---|")
    for name, what in (
        ("png", "PNG frames (decode + grey + resize)"),
        ("pack", "pack at 256 px (read + resize)"),
        ("pack_fit", f"pack at {args.size} px (read only)"),
    ):
        value = statistics.median(rates[name])
        print(f"| {what} | {value:,.0f} | {math.ceil(TARGET / value)} |")


if __name__ == "__main__":
    main()
