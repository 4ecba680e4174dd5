"""Calibration of the project's near-duplicate notion (data.neardup) on BUSI and DDTI.

    python benchmarks/near_duplicates.py [--data ../shared/data] [--exhaustive]

For each set and similarity threshold: the pairs found, the groups they make with the
dataset's own groups (DDTI's dual-view scans) and the largest group; how many of the pairs an
independent pixel correlation (64 x 64 bilinear thumbnails) calls near-identical (>= 0.93 BUSI,
>= 0.95 DDTI) are linked; with --exhaustive, the recall of the SimHash candidate index against
scoring every pair (slow: a minute or two per set). Then the similarity that survives speckle
and small crops of every 5th image. Timings are wall seconds on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sonodistill.data import neardup as nd
from sonodistill.evaluate.datasets import load_busi, load_ddti, read_records

LEVELS = (0.96, 0.94, 0.93, 0.92, 0.91, 0.90, 0.88)
INDEPENDENT = {"BUSI": 0.93, "DDTI": 0.95}


def correlation(greys) -> np.ndarray:
    x = np.stack(
        [
            np.asarray(Image.fromarray(g).resize((64, 64), Image.BILINEAR), float).ravel()
            for g in greys
        ]
    )
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def largest_group(index, pairs) -> int:
    edges = list(zip(pairs.i, pairs.j, strict=True))
    first: dict[str, int] = {}
    for k, r in enumerate(index.records):
        if r.group:
            edges.append((k, first.setdefault(r.group, k)))
    labels = nd.components(len(index.records), edges)
    return int(np.bincount(labels).max())


def robustness(greys, rng) -> None:
    for name, crop, speckle in (
        ("speckle (gamma 4)", 0.0, 4),
        ("crop 1.5% top+left", 0.015, 0),
        ("crop 3% top+left", 0.03, 0),
    ):
        sims = []
        for g in greys[::5]:
            h, w = g.shape
            c = g[int(crop * h) :, int(crop * w) :].astype(np.float32)
            if speckle:
                c = c * rng.gamma(speckle, 1 / speckle, c.shape)
            c = np.clip(c, 0, 255).astype(np.uint8)
            a, b = nd.fingerprint(g), nd.fingerprint(c)
            sims.append(float(nd.similarity(a, b, [0], [0])[0]))
        q = np.quantile(sims, [0, 0.05, 0.5])
        print(f"  {name:<20} min {q[0]:.3f}  5th percentile {q[1]:.3f}  median {q[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--exhaustive", action="store_true")
    args = parser.parse_args()
    root = Path(args.data)
    rng = np.random.default_rng(0)
    for name, index in (("BUSI", load_busi(root / "busi")), ("DDTI", load_ddti(root / "ddti"))):
        t0 = time.perf_counter()
        greys = list(read_records(index.records))
        t1 = time.perf_counter()
        fps = nd.fingerprint_batch(greys)
        t2 = time.perf_counter()
        nd.near_duplicates(fps, None, nd.THRESHOLD)
        t3 = time.perf_counter()
        print(
            f"{name}: {len(greys)} images; read {t1 - t0:.1f} s, fingerprints {t2 - t1:.1f} s, "
            f"pairs at {nd.THRESHOLD} {t3 - t2:.1f} s"
        )
        corr = correlation(greys)
        ids = np.triu_indices(len(greys), 1)
        need = INDEPENDENT[name]
        wanted = {(int(i), int(j)) for i, j in zip(*ids, strict=True) if corr[i, j] >= need}
        loosest = nd.near_duplicates(fps, None, min(LEVELS))
        print(f"  independent pixel correlation >= {need}: {len(wanted)} pairs")
        print("  similarity | pairs | largest group | independent pairs linked (same group)")
        for level in LEVELS:
            pairs = loosest[loosest.similarity >= level]
            edges = list(zip(pairs.i, pairs.j, strict=True))
            labels = nd.components(len(greys), edges)
            linked = sum(labels[i] == labels[j] for i, j in wanted)
            print(
                f"  {level:>10} | {len(pairs):>5} | {largest_group(index, pairs):>13} "
                f"| {linked}/{len(wanted)}"
            )
        if args.exhaustive:
            t = time.perf_counter()
            every = nd.similarity(fps, fps, *ids)
            ia, ib = nd.candidate_pairs(fps, None, nd.CANDIDATE_BITS)
            found = set(zip(ia.tolist(), ib.tolist(), strict=True))
            for level in (nd.THRESHOLD, nd.LOOSE, 0.88):
                hits = [(int(i), int(j)) for i, j, s in zip(*ids, every, strict=True) if s >= level]
                kept = sum(h in found for h in hits)
                print(
                    f"  exhaustive >= {level}: {len(hits)} pairs, {kept} among the "
                    f"{len(found)} SimHash candidates ({time.perf_counter() - t:.0f} s)"
                )
        robustness(greys, rng)


if __name__ == "__main__":
    main()
