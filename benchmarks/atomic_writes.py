"""What an atomic write costs: the same corpus frames written plainly, through
`sonodistill.io.write_bytes` (temporary file, fsync, rename, folder fsync), and as the corpus build
writes them (temporary file and rename each, one `sync_files` pass per batch), alternating, in one
run.

    .venv/bin/python benchmarks/atomic_writes.py [--frames 400] [--out DIR] [--rounds 3]

Frames are real PNGs of ../shared/data (a lung clip, re-encoded as the corpus build does); the
folder should be on the disk you care about (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from sonodistill.io import sync_files, write_bytes

CLIPS = Path(__file__).resolve().parents[1].parent / "shared/data/corpus/covid_blues/lus_videos"


def frames(n: int) -> list[bytes]:
    out: list[bytes] = []
    for clip in sorted(CLIPS.glob("*.mp4")):
        with av.open(str(clip)) as video:
            for frame in video.decode(video=0):
                grey = np.asarray(frame.to_image().convert("L"))
                out.append(cv2.imencode(".png", grey)[1].tobytes())
                if len(out) == n:
                    return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="folder to write in (default: a temporary one)")
    args = parser.parse_args()
    pngs = frames(args.frames)
    root = Path(args.out or tempfile.mkdtemp(prefix="atomic-bench-"))
    times: dict[str, list[float]] = {"plain": [], "atomic": [], "batched": []}
    for r in range(args.rounds):
        for name in times:
            folder = root / f"{name}{r}"
            folder.mkdir(parents=True)
            start = time.perf_counter()
            paths = [folder / f"{i:06d}.png" for i in range(len(pngs))]
            for path, data in zip(paths, pngs, strict=True):
                if name == "plain":
                    path.write_bytes(data)
                else:
                    write_bytes(path, data, durable=name == "atomic")
            if name == "batched":
                sync_files(paths)
            times[name].append(time.perf_counter() - start)
            shutil.rmtree(folder)
    size = sum(map(len, pngs)) / len(pngs) / 1024
    for name, t in times.items():
        per = 1e3 * statistics.median(t) / len(pngs)
        print(f"{name:>6}: {per:.3f} ms per frame ({len(pngs)} PNGs of {size:.0f} KiB, median)")
    for name in ("atomic", "batched"):
        ratio = statistics.median(times[name]) / statistics.median(times["plain"])
        print(f"{name} / plain: {ratio:.2f}x")
    if not args.out:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
