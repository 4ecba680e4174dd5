"""Training cache: the kept frames of a corpus, resized, in one memory-mapped uint8 array.

    PACK_DIR/frames.u8      np.memmap, uint8, shape (N, S, S), grey
    PACK_DIR/index.parquet  one row per frame, in array order: id, dataset, anatomy, source, frame
    PACK_DIR/pack.json      {"count": N, "size": S, "dtype": "uint8", "layout": "N,H,W"}

The folder's rules are `data.config.PACK` (a pack there needs --overwrite). Each frame is
resized to S x S (`--image_size`) by `data.greys.resize_square` (the project's one resize: a
plain resize, no crop, no letterbox, area interpolation when shrinking).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from sonodistill.config import ImageSize, check
from sonodistill.data.config import PACK
from sonodistill.data.greys import resize_square
from sonodistill.data.manifest import load_manifest
from sonodistill.errors import UserError
from sonodistill.io import atomic_path, write_json, write_parquet
from sonodistill.progress import track
from sonodistill.utils.rundir import RunDir

INDEX_COLUMNS = ["id", "dataset", "anatomy", "source", "frame"]


def pack_corpus(
    corpus: str | Path,
    out: str | Path,
    image_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the pack of a corpus folder (or manifest file) at `image_size` pixels; returns the
    pack folder. A pack already in `out` needs `overwrite`."""
    image_size = check(ImageSize, image_size, "--image_size")
    manifest, root = load_manifest(corpus)
    kept = manifest[manifest.kept].reset_index(drop=True)
    if kept.empty:
        raise UserError(f"{corpus}: the corpus has no kept frame to pack")
    run = RunDir(out, PACK, overwrite=overwrite)
    with run.claim():
        run.clear()
        _write_pack(corpus, run.path, root, kept, image_size, progress)
    return run.path


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
