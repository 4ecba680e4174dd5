"""Leakage guard: exact and near duplicates between a corpus and evaluation sets.

One near-duplicate notion for the whole project (`data.neardup`): evaluation splits, corpus
deduplication and this guard call the same similarity with the same default threshold.
Every evaluation image is fingerprinted twice, as read (grey) and as the corpus build cleans
it (coloured marks removed, cropped to the field of view), so that a corpus frame matches an
evaluation image whether or not it went through the same cleaning. A pair is an *exact* match
when the grey pixels are identical, a *near* match when its similarity reaches the threshold.

Fingerprints of evaluation sets are cached (keyed by the files' paths, sizes and times) under
$SONODISTILL_CACHE or ~/.cache/sonodistill/hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from sonodistill.data import frames as fr
from sonodistill.data import neardup as nd
from sonodistill.data.config import NEARDUP_FILE, THRESHOLD
from sonodistill.data.files import list_files, worker_pool
from sonodistill.data.greys import read_grey
from sonodistill.data.manifest import is_corpus, load_manifest
from sonodistill.data.readers import ReadError, read_frames
from sonodistill.errors import UserError
from sonodistill.io import write_parquet

log = logging.getLogger("sonodistill.corpus")

VERSIONS = ("raw", "clean")


def fingerprint_file(path: str) -> pd.DataFrame:
    """Raw and cleaned fingerprints of every frame of one file (empty if it cannot be read)."""
    import cv2

    cv2.setNumThreads(1)
    meta, raw, clean = [], [], []
    try:
        for index, frame in read_frames(path):
            raw.append(fr.to_grey(frame))
            grey = fr.to_grey(frame, remove_marks=True)
            top, bottom, left, right = fr.fov_box(grey)
            clean.append(np.ascontiguousarray(grey[top:bottom, left:right]))
            meta.append({"file": path, "frame": index})
    except (ReadError, OSError, ValueError) as exc:
        log.warning("leakage: cannot read %s: %s", path, exc)
    return _with_fingerprints(pd.DataFrame(meta, columns=["file", "frame"]), raw, clean)


def _with_fingerprints(meta: pd.DataFrame, raw: list, clean: list) -> pd.DataFrame:
    parts = [meta.reset_index(drop=True)]
    for version, greys in (("raw", raw), ("clean", clean)):
        parts.append(nd.fingerprint_batch(greys).to_frame().add_prefix(f"{version}_"))
    return pd.concat(parts, axis=1)


def fingerprints_of(df: pd.DataFrame, version: str) -> nd.Fingerprints:
    """The `raw` or `clean` fingerprints of a fingerprint table."""
    cols = [c for c in df.columns if c.startswith(f"{version}_")]
    return nd.Fingerprints.from_frame(df[cols].rename(columns=lambda c: c.split("_", 1)[1]))


def fingerprint_set(path: str | Path, workers: int = 2, use_cache: bool = True) -> pd.DataFrame:
    """Fingerprints of every image of a folder/glob/file (mask files left out), cached."""
    files = [str(f) for f in list_files(str(path), ["*mask*"])]
    if not files:
        raise FileNotFoundError(f"{path}: no image found")
    stamp = [nd.file_stamp(f) for f in files]
    key = hashlib.sha1(json.dumps([nd.VERSION, stamp]).encode()).hexdigest()[:16]
    cached = nd.cache_dir() / f"leakage-{key}.parquet"
    if use_cache and cached.is_file():
        return pd.read_parquet(cached)
    parts: list[pd.DataFrame] = []
    if workers > 1 and len(files) > 8:
        with worker_pool(workers) as pool:
            parts = list(pool.map(fingerprint_file, files, chunksize=16))
    else:
        parts = [fingerprint_file(f) for f in files]
    df = pd.concat(parts, ignore_index=True)
    if use_cache:
        try:
            write_parquet(cached, df)
        except (OSError, UserError) as exc:  # a cache: the check goes on without it
            log.warning("leakage: cannot cache fingerprints in %s: %s", cached.parent, exc)
    return df


def corpus_fingerprints(root: Path, manifest: pd.DataFrame) -> nd.Fingerprints:
    """Fingerprints of a built corpus's kept frames, in manifest order: from its
    neardup.parquet, else computed from the frames' PNGs."""
    kept = manifest[manifest.kept]
    stored = root / NEARDUP_FILE
    if stored.is_file():
        table = pd.read_parquet(stored).set_index("id")
        if set(kept.id) <= set(table.index):
            return nd.Fingerprints.from_frame(table.loc[list(kept.id)].reset_index())
    paths = [root / p for p in kept.path]
    items = [(str(p), -1) for p in paths]
    return nd.cached_fingerprints(items, lambda: nd.fingerprint_batch(map(read_grey, paths)))


def _corpus_fingerprints(path: str | Path, workers: int) -> pd.DataFrame:
    """A built corpus (folder with manifest.parquet, or the manifest): its kept frames, as
    stored (cleaned). Anything else: a folder/glob of images, fingerprinted like an
    evaluation set."""
    p = Path(path)
    if not is_corpus(p):
        return fingerprint_set(p, workers)
    m, root = load_manifest(p)
    fps = corpus_fingerprints(root, m).to_frame()
    kept = m[m.kept].reset_index(drop=True)
    meta = pd.DataFrame({"file": kept.id.to_numpy(), "frame": kept.frame.to_numpy()})
    return pd.concat([meta, fps.add_prefix("raw_"), fps.add_prefix("clean_")], axis=1)


def match(a: pd.DataFrame, b: pd.DataFrame, threshold: float, same: bool = False) -> pd.DataFrame:
    """Pairs (ia, ib, similarity, match) of fingerprint tables a and b that are exact copies or
    at least `threshold` similar, in any of their raw/cleaned versions (the best is kept)."""
    best: dict[tuple[int, int], tuple[float, bool]] = {}
    for va in VERSIONS:
        fa = fingerprints_of(a, va)
        for vb in VERSIONS:
            fb = fingerprints_of(b, vb)
            pairs = nd.near_duplicates(fa, None if same and va == vb else fb, threshold)
            for i, j, sim, exact in pairs[["i", "j", "similarity", "exact"]].itertuples(
                index=False
            ):
                if same and i >= j:
                    i, j = j, i
                    if i == j:
                        continue
                old = best.get((i, j))
                if old is None or (exact, sim) > (old[1], old[0]):
                    best[(i, j)] = (float(sim), bool(exact))
    rows = [(i, j, s, "exact" if e else "near") for (i, j), (s, e) in sorted(best.items())]
    return pd.DataFrame(rows, columns=["ia", "ib", "similarity", "match"])


def check_leakage(
    corpus: str | Path, against: dict[str, str], threshold: float = THRESHOLD, workers: int = 2
) -> pd.DataFrame:
    """Report of exact/near duplicates between a corpus and each evaluation set, and inside
    each evaluation set (columns: set, scope, a, b, similarity, match)."""
    c = _corpus_fingerprints(corpus, workers)
    rows = []
    for name, path in against.items():
        e = fingerprint_set(path, workers)
        for _, r in match(c, e, threshold).iterrows():
            rows.append((name, "corpus", _label(c, r.ia), _label(e, r.ib), r.similarity, r.match))
        for _, r in match(e, e, threshold, same=True).iterrows():
            if e.file.iat[r.ia] != e.file.iat[r.ib]:
                row = (name, "within", _label(e, r.ia), _label(e, r.ib), r.similarity, r.match)
                rows.append(row)
    return pd.DataFrame(rows, columns=["set", "scope", "a", "b", "similarity", "match"])


def _label(df: pd.DataFrame, i: int) -> str:
    f, frame = df.file.iat[i], int(df.frame.iat[i])
    return f if frame == 0 and not str(f).count("/file") else f"{f}#{frame}"


def exclude_matches(
    manifest: pd.DataFrame, kept: nd.Fingerprints, sets, threshold: float, workers: int = 2
) -> int:
    """Drop (in place) the kept frames of a manifest that match an evaluation set: reason
    `excluded:NAME`, duplicate_of the matching evaluation file. `kept`: the fingerprints of the
    kept frames, in manifest order. Returns how many."""
    rows = manifest.index[manifest.kept].to_numpy()
    if not len(rows):
        return 0
    fps = kept.to_frame()
    c = pd.concat([fps.add_prefix("raw_"), fps.add_prefix("clean_")], axis=1)
    dropped = 0
    for s in sets:
        e = fingerprint_set(s.path, workers)
        pairs = match(c, e, threshold)
        for ia, group in pairs.groupby("ia"):
            row = rows[ia]
            if not manifest.at[row, "kept"]:
                continue
            manifest.at[row, "kept"] = False
            manifest.at[row, "reason"] = f"{fr.EXCLUDED}:{s.name}"
            manifest.at[row, "duplicate_of"] = e.file.iat[int(group.ib.iat[0])]
            dropped += 1
        log.info("exclude %s (%d images): %d corpus frames dropped", s.name, len(e), dropped)
    return dropped
