"""Near-duplicate images: the one notion the project uses for evaluation splits, corpus
deduplication and the leakage guard.

Fingerprint of a grey frame (`fingerprint`):
- `sha1`: SHA-1 of the pixels (exact copies);
- `thumbs`: two aligned thumbnails, (2, 34, 34) uint8, area-resampled from the whole frame and
  from its field of view (`frames.fov_box`: the largest bright region, so that a different
  border, burned-in text or a cropped screenshot does not move the content);
- `simhash`: a 64-bit locality-sensitive hash of each thumbnail (signs of 64 fixed random
  projections of its z-normalised 16 x 16 version): the Hamming distance between two SimHashes
  estimates the angle between the thumbnails, so it indexes the similarity below cheaply.

Similarity of two frames (`similarity`): the Pearson correlation of the central 32 x 32 windows
of their thumbnails, the highest over the two views and over shifts of up to one thumbnail pixel
(3% of the frame). Area resampling averages speckle out; the field-of-view view and the shifts
absorb small crops and borders. Two frames are near duplicates when their similarity reaches
`threshold`; candidates are the pairs whose SimHashes differ by at most `candidate_bits` in
either view (plus exact copies), so a corpus never compares all pairs.

The thresholds are calibrated on BUSI and DDTI (docs/near_duplicates.md): at 0.92 every
visually identical pair of either set is linked, and DDTI's largest group stays at 5 images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from sonodistill.data.config import CANDIDATE_BITS, CORPUS_THRESHOLD, LOOSE, THRESHOLD  # noqa: F401
from sonodistill.data.frames import fov_box
from sonodistill.data.hashing import hamming_matrix, pixel_sha1
from sonodistill.errors import UserError
from sonodistill.io import write_parquet

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped whenever the fingerprint changes, so that cached fingerprints are recomputed."""
THUMB = 32
"""Side of the compared window; thumbnails keep one pixel more on each side for the shifts."""
SHIFT = 1
_HASH_SIDE = 16
_PROJECTION = np.random.default_rng(20250611).standard_normal((64, _HASH_SIDE * _HASH_SIDE))


@dataclass
class Fingerprints:
    """Fingerprints of N frames (row i = frame i)."""

    sha1: np.ndarray  # (N,) str
    thumbs: np.ndarray  # (N, 2, 34, 34) uint8
    simhash: np.ndarray  # (N, 2) uint64

    def __len__(self) -> int:
        return len(self.sha1)

    def take(self, index) -> Fingerprints:
        index = np.asarray(index, dtype=np.intp)
        return Fingerprints(self.sha1[index], self.thumbs[index], self.simhash[index])

    @staticmethod
    def concat(parts: Iterable[Fingerprints]) -> Fingerprints:
        parts = list(parts)
        if not parts:
            return empty_fingerprints()
        return Fingerprints(
            np.concatenate([p.sha1 for p in parts]),
            np.concatenate([p.thumbs for p in parts]),
            np.concatenate([p.simhash for p in parts]),
        )

    def to_frame(self) -> pd.DataFrame:
        """Columns sha1, simhash0, simhash1 (hex), thumbs (bytes): for parquet caches."""
        return pd.DataFrame(
            {
                "sha1": self.sha1,
                "simhash0": [f"{h:016x}" for h in self.simhash[:, 0].tolist()],
                "simhash1": [f"{h:016x}" for h in self.simhash[:, 1].tolist()],
                "thumbs": [t.tobytes() for t in self.thumbs],
            }
        )

    @staticmethod
    def from_frame(df: pd.DataFrame) -> Fingerprints:
        side = THUMB + 2 * SHIFT
        if df.empty:
            return empty_fingerprints()
        thumbs = np.stack([np.frombuffer(b, np.uint8) for b in df.thumbs]).reshape(
            -1, 2, side, side
        )
        simhash = np.array(
            [[int(a, 16), int(b, 16)] for a, b in zip(df.simhash0, df.simhash1, strict=True)],
            dtype=np.uint64,
        )
        return Fingerprints(df.sha1.to_numpy(dtype=object), thumbs, simhash)


def empty_fingerprints() -> Fingerprints:
    side = THUMB + 2 * SHIFT
    return Fingerprints(
        np.array([], dtype=object),
        np.zeros((0, 2, side, side), np.uint8),
        np.zeros((0, 2), np.uint64),
    )


def _thumb(grey: np.ndarray) -> np.ndarray:
    side = THUMB + 2 * SHIFT
    return cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA)


def _fov(grey: np.ndarray, side: int = 256) -> tuple[int, int, int, int]:
    """`frames.fov_box` found on a copy at most `side` pixels wide (the box only positions a
    32-pixel thumbnail), mapped back to the frame."""
    h, w = grey.shape
    scale = side / max(h, w)
    if scale >= 1:
        return fov_box(grey)
    small = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), cv2.INTER_AREA)
    top, bottom, left, right = fov_box(small)
    sh, sw = h / small.shape[0], w / small.shape[1]
    return round(top * sh), round(bottom * sh), round(left * sw), round(right * sw)


def _zscore(x: np.ndarray) -> np.ndarray:
    """Rows of x (..., D) centred and scaled to unit norm (constant rows stay 0)."""
    x = x.astype(np.float32)
    x = x - x.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 1e-6, norm, 1.0)


def _simhash(thumbs: np.ndarray) -> np.ndarray:
    """(N, 2, S, S) thumbnails -> (N, 2) uint64 SimHashes of their 16 x 16 versions."""
    n = len(thumbs)
    flat = thumbs.reshape(-1, *thumbs.shape[-2:])
    small = np.zeros((len(flat), _HASH_SIDE, _HASH_SIDE), np.uint8)
    for k, t in enumerate(flat):
        small[k] = cv2.resize(t, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA)
    bits = _zscore(small.reshape(len(flat), -1)) @ _PROJECTION.T.astype(np.float32) > 0
    packed = np.packbits(bits, axis=1).view(">u8").astype(np.uint64)[:, 0]
    return packed.reshape(n, 2)


def fingerprint_batch(greys: Iterable[np.ndarray]) -> Fingerprints:
    """Fingerprints of grey uint8 frames (any sizes)."""
    shas, thumbs = [], []
    for grey in greys:
        grey = np.ascontiguousarray(grey)
        top, bottom, left, right = _fov(grey)
        shas.append(pixel_sha1(grey))
        thumbs.append(np.stack([_thumb(grey), _thumb(grey[top:bottom, left:right])]))
    if not shas:
        return empty_fingerprints()
    stacked = np.stack(thumbs)
    return Fingerprints(np.array(shas, dtype=object), stacked, _simhash(stacked))


def fingerprint(grey: np.ndarray) -> Fingerprints:
    """The fingerprint of one frame (a Fingerprints of length 1)."""
    return fingerprint_batch([grey])


def _centres(thumbs: np.ndarray) -> np.ndarray:
    """(N, 2, S+2, S+2) -> (N, 2, S*S): the unshifted central windows, z-normalised."""
    c = thumbs[:, :, SHIFT : SHIFT + THUMB, SHIFT : SHIFT + THUMB]
    return _zscore(c.reshape(len(thumbs), 2, THUMB * THUMB))


def _shifted(thumbs: np.ndarray) -> np.ndarray:
    """(2, S+2, S+2) -> (2, 9, S*S): the 3 x 3 shifted windows of one frame, z-normalised."""
    views = np.lib.stride_tricks.sliding_window_view(thumbs, (THUMB, THUMB), axis=(1, 2))
    return _zscore(views.reshape(2, (2 * SHIFT + 1) ** 2, THUMB * THUMB))


def _by_first(ia: np.ndarray, ib: np.ndarray):
    """(row positions, i, partners j) for each distinct i of the pairs."""
    order = np.argsort(ia, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(ia[order]) != 0])
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(order)
        rows = order[s:e]
        yield rows, int(ia[rows[0]]), ib[rows]


def _one_way(a: Fingerprints, cb: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Max over views and shifts of a's shifted windows against b's centres."""
    out = np.empty(len(ia), np.float32)
    for rows, i, js in _by_first(ia, ib):
        windows = _shifted(a.thumbs[i])  # (2, 9, D)
        out[rows] = np.einsum("vkd,jvd->jvk", windows, cb[js]).max(axis=(1, 2))
    return out


def unshifted_similarity(a: Fingerprints, b: Fingerprints, ia, ib, block: int = 256) -> np.ndarray:
    """The cheap part of `similarity`: the best view's correlation without shifts (a lower
    bound of it; used to rank pairs, never to decide one)."""
    ia, ib = np.asarray(ia, dtype=np.intp), np.asarray(ib, dtype=np.intp)
    out = np.empty(len(ia), np.float32)
    if not len(ia):
        return out
    ca, cb = _centres(a.thumbs), _centres(b.thumbs)
    order = np.argsort(ia, kind="stable")
    bounds = np.searchsorted(ia[order], np.arange(0, len(a) + block, block))
    for k in range(len(bounds) - 1):
        rows = order[bounds[k] : bounds[k + 1]]
        if not len(rows):
            continue
        # one matrix product per block of a's rows and the b's it meets (BLAS, no per-pair copy)
        first = k * block
        cols, where = np.unique(ib[rows], return_inverse=True)
        dense = np.maximum(
            ca[first : first + block, 0] @ cb[cols, 0].T,
            ca[first : first + block, 1] @ cb[cols, 1].T,
        )
        out[rows] = dense[ia[rows] - first, where]
    return out


def similarity(a: Fingerprints, b: Fingerprints, ia, ib) -> np.ndarray:
    """Similarity of the pairs (a[ia[k]], b[ib[k]]), shape (len(ia),), in [-1, 1]: every pair
    scored with its shifts, so that a pair's similarity never depends on which other pairs or
    which threshold it was scored with (the split, its audit, the corpus dedup and the leakage
    guard decide alike). The shifts were once skipped below threshold - 0.1 unshifted; on BUSI
    they add up to 0.119, so that shortcut could miss pairs that a looser pass then found."""
    ia, ib = np.asarray(ia, dtype=np.intp), np.asarray(ib, dtype=np.intp)
    out = unshifted_similarity(a, b, ia, ib)
    if len(ia):
        forward = _one_way(a, _centres(b.thumbs), ia, ib)
        backward = _one_way(b, _centres(a.thumbs), ib, ia)
        out = np.maximum(out, np.maximum(forward, backward))
    return out


def candidate_pairs(
    a: Fingerprints, b: Fingerprints | None, bits: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(ia, ib) of the pairs with SimHashes within `bits` in either view, or the same pixels.
    `b` None: pairs inside `a` with ia < ib. Chunked: memory stays at chunk x len(b)."""
    same = b is None
    b = a if same else b
    codes, _ = pd.factorize(np.concatenate([a.sha1, b.sha1]))
    code_a, code_b = codes[: len(a)], codes[len(a) :]
    found_i, found_j = [], []
    for start in range(0, len(a), chunk):
        stop = min(start + chunk, len(a))
        hit = code_a[start:stop, None] == code_b[None, :]
        for view in (0, 1):
            hit |= hamming_matrix(a.simhash[start:stop, view], b.simhash[:, view]) <= bits
        if same:
            hit &= np.arange(start, stop)[:, None] < np.arange(len(b))[None, :]
        i, j = np.nonzero(hit)
        found_i.append(i + start)
        found_j.append(j)
    if not found_i:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    return np.concatenate(found_i).astype(np.intp), np.concatenate(found_j).astype(np.intp)


def near_duplicates(
    a: Fingerprints,
    b: Fingerprints | None = None,
    threshold: float = THRESHOLD,
    candidate_bits: int = CANDIDATE_BITS,
) -> pd.DataFrame:
    """The project's one near-duplicate decision: pairs (i in a, j in b) that are exact copies
    or at least `threshold` similar; `b` None: pairs inside `a` (i < j). Columns i, j,
    similarity, exact; sorted by similarity. Splits, the audit, corpus dedup and the leakage
    guard all call it, so the pairs found at a threshold are the pairs found at a looser one
    filtered to that threshold."""
    ia, ib = candidate_pairs(a, b, candidate_bits)
    other = a if b is None else b
    sim = similarity(a, other, ia, ib)
    exact = a.sha1[ia] == other.sha1[ib] if len(ia) else np.zeros(0, bool)
    sim = np.where(exact, 1.0, sim).round(4)  # decided on the value that is reported
    keep = exact | (sim >= threshold)
    df = pd.DataFrame({"i": ia[keep], "j": ib[keep], "similarity": sim[keep], "exact": exact[keep]})
    return df.sort_values(["similarity", "i", "j"], ascending=[False, True, True]).reset_index(
        drop=True
    )


def components(n: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected-component label of each of n nodes given undirected edges."""
    edges = list(edges)
    rows = [e[0] for e in edges]
    cols = [e[1] for e in edges]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def cache_dir() -> Path:
    """Where fingerprints of files are cached: $SONODISTILL_CACHE (unless empty) or
    ~/.cache/sonodistill/hashes."""
    return Path(os.environ.get("SONODISTILL_CACHE") or Path.home() / ".cache/sonodistill/hashes")


def file_stamp(path: str | Path) -> tuple[str, int, int]:
    """(path, size, modification time): what keys a cache of results computed from a file."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def cached_fingerprints(
    items: list[tuple[str, int]], compute: Callable[[], Fingerprints], tag: str = ""
) -> Fingerprints:
    """`compute()` for the frames `items` ((file, frame index) pairs, in order), cached under
    `cache_dir()` and keyed by the files' paths, sizes and modification times: the evaluation
    sets are fingerprinted once, not at every suite, audit or leakage check."""
    stamp = []
    for path, frame in items:
        name, size, mtime = file_stamp(path)
        stamp.append((name, int(frame), size, mtime))
    key = hashlib.sha1(json.dumps([VERSION, tag, stamp]).encode()).hexdigest()[:20]
    path = cache_dir() / f"neardup-{key}.parquet"
    if path.is_file():
        try:
            fps = Fingerprints.from_frame(pd.read_parquet(path))
            if len(fps) == len(items):
                return fps
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable fingerprint cache %s: %s", path, exc)
    fps = compute()
    try:
        write_parquet(path, fps.to_frame())
    except (OSError, UserError) as exc:
        log.warning("cannot cache fingerprints in %s: %s", path.parent, exc)
    return fps
