"""Leakage guard: exact and near duplicates between a corpus and evaluation sets.

Every image is fingerprinted twice, as read (grey) and as the corpus build cleans it (coloured
marks removed, cropped to the field of view), so that a corpus frame matches an evaluation image
whether or not it went through the same cleaning. Two images are an *exact* match when the grey
pixels of either version are identical, a *near* match when the perceptual hashes are within a
threshold of Hamming bits (resized or re-encoded copies).

Fingerprints of evaluation sets are cached (keyed by the files' paths, sizes and times) under
$SONODISTILL_CACHE or ~/.cache/sonodistill/hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from sonodistill.data import frames as fr
from sonodistill.data import hashing
from sonodistill.data.files import list_files, worker_pool
from sonodistill.data.manifest import is_corpus, load_manifest
from sonodistill.data.readers import ReadError, read_frames
from sonodistill.errors import UserError
from sonodistill.io import write_parquet

log = logging.getLogger("sonodistill.corpus")

HASH_COLUMNS = ["file", "frame", "sha1_raw", "phash_raw", "sha1_clean", "phash_clean"]


def cache_dir() -> Path:
    return Path(os.environ.get("SONODISTILL_CACHE", Path.home() / ".cache/sonodistill/hashes"))


def fingerprint_file(path: str) -> list[dict]:
    """Raw and cleaned fingerprints of every frame of one file ([] if it cannot be read)."""
    import cv2

    cv2.setNumThreads(1)
    rows = []
    try:
        for index, frame in read_frames(path):
            raw = fr.to_grey(frame)
            clean = fr.to_grey(frame, remove_marks=True)
            top, bottom, left, right = fr.fov_box(clean)
            clean = np.ascontiguousarray(clean[top:bottom, left:right])
            rows.append(
                {
                    "file": path,
                    "frame": index,
                    "sha1_raw": hashing.pixel_sha1(raw),
                    "phash_raw": hashing.phash(raw),
                    "sha1_clean": hashing.pixel_sha1(clean),
                    "phash_clean": hashing.phash(clean),
                }
            )
    except (ReadError, OSError, ValueError) as exc:
        log.warning("leakage: cannot read %s: %s", path, exc)
    return rows


def fingerprint_set(path: str | Path, workers: int = 2, use_cache: bool = True) -> pd.DataFrame:
    """Fingerprints of every image of a folder/glob/file (mask files left out), cached."""
    files = [str(f) for f in list_files(str(path), ["*mask*"])]
    if not files:
        raise FileNotFoundError(f"{path}: no image found")
    stamp = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:16]
    cached = cache_dir() / f"{key}.parquet"
    if use_cache and cached.is_file():
        return pd.read_parquet(cached)
    rows: list[dict] = []
    if workers > 1 and len(files) > 8:
        with worker_pool(workers) as pool:
            for part in pool.map(fingerprint_file, files, chunksize=16):
                rows += part
    else:
        for f in files:
            rows += fingerprint_file(f)
    df = pd.DataFrame(rows, columns=HASH_COLUMNS)
    if use_cache:
        try:
            write_parquet(cached, df)
        except (OSError, UserError) as exc:  # a cache: the check goes on without it
            log.warning("leakage: cannot cache fingerprints in %s: %s", cached.parent, exc)
    return df


def _corpus_fingerprints(path: str | Path, workers: int) -> pd.DataFrame:
    """A built corpus (folder with manifest.parquet, or the manifest): its kept frames, as
    stored. Anything else: a folder/glob of images, fingerprinted like an evaluation set."""
    p = Path(path)
    if is_corpus(p):
        m, _ = load_manifest(p)
        m = m[m.kept]
        return pd.DataFrame(
            {
                "file": m.id.to_numpy(),
                "frame": m.frame.to_numpy(),
                "sha1_raw": m.sha1.to_numpy(),
                "phash_raw": m.phash.to_numpy(),
                "sha1_clean": m.sha1.to_numpy(),
                "phash_clean": m.phash.to_numpy(),
            }
        )
    return fingerprint_set(p, workers)


def match(a: pd.DataFrame, b: pd.DataFrame, threshold: int, same: bool = False) -> pd.DataFrame:
    """Pairs (ia, ib, distance, match) of fingerprints of a and b that are exact or within
    `threshold` bits (the smaller distance of the raw and cleaned versions)."""
    out: dict[tuple[int, int], tuple[int, str]] = {}
    for ca in ("sha1_raw", "sha1_clean"):
        for cb in ("sha1_raw", "sha1_clean"):
            idx_b: dict[str, list[int]] = {}
            for j, h in enumerate(b[cb]):
                idx_b.setdefault(h, []).append(j)
            for i, h in enumerate(a[ca]):
                for j in idx_b.get(h, []):
                    if not (same and j <= i):
                        out[(i, j)] = (0, "exact")
    for ca in ("phash_raw", "phash_clean"):
        for cb in ("phash_raw", "phash_clean"):
            ha, hb = hashing.hex_to_uint64(a[ca]), hashing.hex_to_uint64(b[cb])
            for i, j, d in hashing.near_pairs(ha, hb, threshold, same=same):
                if (i, j) not in out or (out[(i, j)][1] == "near" and d < out[(i, j)][0]):
                    out[(i, j)] = (d, "near")
    rows = [(i, j, d, m) for (i, j), (d, m) in sorted(out.items())]
    return pd.DataFrame(rows, columns=["ia", "ib", "distance", "match"])


def check_leakage(
    corpus: str | Path, against: dict[str, str], threshold: int = 4, workers: int = 2
) -> pd.DataFrame:
    """Report of exact/near duplicates between a corpus and each evaluation set, and inside
    each evaluation set (columns: set, scope, a, b, distance, match)."""
    c = _corpus_fingerprints(corpus, workers)
    rows = []
    for name, path in against.items():
        e = fingerprint_set(path, workers)
        for _, r in match(c, e, threshold).iterrows():
            rows.append((name, "corpus", _label(c, r.ia), _label(e, r.ib), r.distance, r.match))
        for _, r in match(e, e, threshold, same=True).iterrows():
            if e.file.iat[r.ia] != e.file.iat[r.ib]:
                rows.append((name, "within", _label(e, r.ia), _label(e, r.ib), r.distance, r.match))
    return pd.DataFrame(rows, columns=["set", "scope", "a", "b", "distance", "match"])


def _label(df: pd.DataFrame, i: int) -> str:
    f, frame = df.file.iat[i], int(df.frame.iat[i])
    return f if frame == 0 and not str(f).count("/file") else f"{f}#{frame}"


def exclude_matches(manifest: pd.DataFrame, sets, threshold: int, workers: int = 2) -> int:
    """Drop (in place) the kept frames of a manifest that match an evaluation set: reason
    `excluded:NAME`, duplicate_of the matching evaluation file. Returns how many."""
    kept = manifest.index[manifest.kept].to_numpy()
    if not len(kept):
        return 0
    c = pd.DataFrame(
        {
            "sha1_raw": manifest.loc[kept, "sha1"].to_numpy(),
            "phash_raw": manifest.loc[kept, "phash"].to_numpy(),
        }
    )
    c["sha1_clean"], c["phash_clean"] = c.sha1_raw, c.phash_raw
    dropped = 0
    for s in sets:
        e = fingerprint_set(s.path, workers)
        pairs = match(c, e, threshold)
        for ia, group in pairs.groupby("ia"):
            row = kept[ia]
            if not manifest.at[row, "kept"]:
                continue
            manifest.at[row, "kept"] = False
            manifest.at[row, "reason"] = f"{fr.EXCLUDED}:{s.name}"
            manifest.at[row, "duplicate_of"] = e.file.iat[int(group.ib.iat[0])]
            dropped += 1
        log.info("exclude %s (%d images): %d corpus frames dropped", s.name, len(e), dropped)
    return dropped
