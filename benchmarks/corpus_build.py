"""Throughput of `sonodistill corpus build` on the real files of ../shared/data/corpus.

    .venv/bin/python benchmarks/corpus_build.py [--workers 2] [--out DIR] [--max_per_clip 64]

Builds every file there (mp4 clips, MetaImage sequences/volumes, NIfTI copies, DICOM) from
scratch into a temporary folder (or --out, emptied first) and prints frames/s (frames decoded
and judged per second of wall time), the counts per kind and per drop reason, and how many frames
the near-duplicate filter keeps per video clip.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="corpus folder (default: a temporary one, removed after)")
    parser.add_argument("--max_per_clip", type=int, default=64)
    parser.add_argument("--data", default=str(CORPUS), help="the shared corpus folder")
    args = parser.parse_args()

    import pandas as pd

    from sonodistill.data.corpus import build_corpus
    from sonodistill.data.sources import BuildSettings, load_sources

    data = Path(args.data)
    if not data.is_dir():
        print(f"corpus data not found at {data}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    out = Path(args.out) if args.out else tmp / "corpus"
    shutil.rmtree(out, ignore_errors=True)
    sources = [
        ("covid_blues", "lung", "covid_blues/lus_videos"),
        ("plus", "phantom", "plus/TestImages"),
        ("plus_nifti", "phantom", "plus/nifti_derived"),
        ("dicom", "mixed", "dicom"),
    ]
    spec = {"sources": [{"dataset": d, "anatomy": a, "path": str(data / p)} for d, a, p in sources]}
    (tmp / "sources.yaml").write_text(yaml.safe_dump(spec))
    settings = BuildSettings(workers=args.workers)
    settings.frames.max_per_clip = args.max_per_clip
    try:
        result = build_corpus(load_sources(tmp / "sources.yaml", settings), out, progress=True)
        m, s = result.manifest, result.summary
        print(
            f"\nbuild of {data}: {s['files']} files, {s['frames_seen']} frames seen, "
            f"{s['frames_kept']} kept, {result.seconds:.1f} s with {args.workers} workers"
        )
        print(f"throughput: {s['frames_seen'] / result.seconds:.1f} frames/s")
        print("per kind:", json.dumps(s["per_kind"]))
        print("drop reasons:", json.dumps(s["drop_reasons"]))
        clips = m[(m.kind == "video") & (m.frame >= 0)].groupby("source")
        per_clip = pd.DataFrame({"frames": clips.size(), "kept": clips.kept.sum()})
        q = per_clip.kept.quantile([0, 0.5, 1]).tolist()
        share = per_clip.kept.sum() / per_clip.frames.sum()
        print(
            f"video clips: {len(per_clip)}, frames per clip median {per_clip.frames.median():.0f}, "
            f"kept per clip min/median/max {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f} "
            f"({share:.1%} of clip frames kept)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
