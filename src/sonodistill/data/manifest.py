"""The corpus manifest: one row per frame seen (kept or not) and one per unreadable or truncated
file.

Columns (`MANIFEST_COLUMNS`): id (`DATASET/FILE_KEY/FRAME` or `DATASET/FILE_KEY/file`), dataset,
anatomy, source (the file read), kind (its file kind), frame (-1: the file itself), kept, reason
(the drop reason, "" when kept), path (the kept PNG, relative to the corpus folder), height,
width, orig_height, orig_width, phash, sha1, duplicate_of.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from sonodistill.data.config import MANIFEST
from sonodistill.data.frames import UNREADABLE

MANIFEST_COLUMNS = [
    "id",
    "dataset",
    "anatomy",
    "source",
    "kind",
    "frame",
    "kept",
    "reason",
    "path",
    "height",
    "width",
    "orig_height",
    "orig_width",
    "phash",
    "sha1",
    "duplicate_of",
]
_INT_COLUMNS = ("height", "width", "orig_height", "orig_width")
_TEXT_COLUMNS = ("id", "dataset", "anatomy", "source", "kind", "reason", "path", "phash", "sha1")
_TEXT_COLUMNS += ("duplicate_of",)


def short_hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def file_key(path: Path) -> str:
    """A file's folder name in the corpus: its stem plus a hash of its absolute path."""
    stem = path.name.split(".")[0] or path.name
    return f"{safe_name(stem)}-{short_hash(str(path.resolve()))}"


def unreadable_row(
    dataset: str, anatomy: str, source: str, reason: str, kind=None, status: str = UNREADABLE
) -> dict:
    """The manifest row of a file that could not be read (frame -1, never kept); `status`
    TRUNCATED: of a file that ends before its declared frames (its frames read have rows)."""
    return {
        "id": f"{safe_name(dataset)}/{file_key(Path(source))}/file",
        "dataset": dataset,
        "anatomy": anatomy,
        "source": source,
        "kind": kind,
        "frame": -1,
        "kept": False,
        "reason": f"{status}: {reason}",
    }


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Every manifest column, in order, with its dtype (missing text is None, reasons "")."""
    df = df.reindex(columns=MANIFEST_COLUMNS)
    df["frame"] = df["frame"].astype("int64")
    for col in _INT_COLUMNS:
        df[col] = df[col].fillna(0).astype("int64")
    df["kept"] = df["kept"].astype(bool)
    for col in _TEXT_COLUMNS:
        df[col] = df[col].astype("object").where(df[col].notna(), None)
    df["reason"] = df["reason"].fillna("")
    return df


def is_corpus(path: str | Path) -> bool:
    """A built corpus folder, or its manifest file (a parquet table with the manifest columns)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    if path.suffix != ".parquet" or not path.is_file():
        return False
    import pyarrow.parquet as pq

    return {"kept", "path", "source"} <= set(pq.read_schema(path).names)


def load_manifest(path: str | Path) -> tuple[pd.DataFrame, Path]:
    """The manifest of a corpus folder or a manifest file, and the folder its paths are in."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(f"{path}: no {MANIFEST} (not a built corpus?)")
    return pd.read_parquet(manifest), manifest.parent


def list_corpus_images(path: str | Path) -> list[Path]:
    """The kept frame PNGs of a built corpus: `path` is its folder (with manifest.parquet) or
    the manifest file. Raises FileNotFoundError when there is no manifest or a frame is missing."""
    manifest, root = load_manifest(path)
    paths = [root / p for p in manifest.loc[manifest.kept, "path"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} corpus frames are missing, e.g. {missing[0]}")
    return paths
