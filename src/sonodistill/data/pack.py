"""Training cache: the kept frames of a corpus, resized, in one memory-mapped uint8 array.

    PACK_DIR/frames.u8      np.memmap, uint8, shape (N, size, size), grey
    PACK_DIR/index.parquet  one row per frame, in array order: id, dataset, anatomy, source, frame
    PACK_DIR/pack.json      {"count": N, "size": size, "dtype": "uint8", "layout": "N,H,W"}

Each frame is resized to size x size by `data.greys.resize_square` (the project's one resize: a
plain resize, no crop, no letterbox, area interpolation when shrinking).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from sonodistill.data.greys import resize_square
from sonodistill.data.manifest import load_manifest
from sonodistill.errors import UserError, check
from sonodistill.io import atomic_path, claim_run_dir, remove_owned, write_json, write_parquet
from sonodistill.progress import track

INDEX_COLUMNS = ["id", "dataset", "anatomy", "source", "frame"]


OWNED = ("frames.u8", "index.parquet", "pack.json")
"""What a pack folder holds: `--overwrite` removes these and nothing else."""


def pack_corpus(
    corpus: str | Path,
    out: str | Path,
    size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the pack of a corpus folder (or manifest file); returns the pack folder. A pack
    already in `out` needs `overwrite`."""
    check(size >= 8, "--size", size, "must be at least 8")
    manifest, root = load_manifest(corpus)
    kept = manifest[manifest.kept].reset_index(drop=True)
    if kept.empty:
        raise UserError(f"{corpus}: the corpus has no kept frame to pack")
    out = Path(out)
    with claim_run_dir(out, "corpus pack", OWNED, overwrite=overwrite):
        if overwrite:
            remove_owned(out, OWNED)
        _write_pack(corpus, out, root, kept, size, progress)
    return out


def _write_pack(corpus, out: Path, root: Path, kept: pd.DataFrame, size: int, progress: bool):
    with atomic_path(out / "frames.u8") as tmp:
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(kept), size, size))
        rows = track(kept.path, "corpus pack") if progress else kept.path
        for i, rel in enumerate(rows):
            grey = cv2.imread(str(root / rel), cv2.IMREAD_GRAYSCALE)
            if grey is None:
                raise UserError(f"{root / rel}: frame listed in the manifest cannot be read")
            array[i] = resize_square(grey, size)
        array.flush()
        del array
    write_parquet(out / "index.parquet", kept[INDEX_COLUMNS])
    meta = {
        "count": len(kept),
        "size": size,
        "dtype": "uint8",
        "layout": "N,H,W",
        "resize": "plain",
        "corpus": str(Path(corpus).resolve()),
    }
    write_json(out / "pack.json", meta)  # last: a folder with pack.json holds a whole pack


def is_pack(path: str | Path) -> bool:
    return (Path(path) / "pack.json").is_file()


def open_pack(path: str | Path) -> tuple[np.memmap, pd.DataFrame]:
    """The read-only frame array and the index of a pack folder."""
    path = Path(path)
    meta = json.loads((path / "pack.json").read_text())
    n, size = int(meta["count"]), int(meta["size"])
    frames = np.memmap(path / "frames.u8", dtype=np.uint8, mode="r", shape=(n, size, size))
    return frames, pd.read_parquet(path / "index.parquet")
