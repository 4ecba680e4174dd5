"""Unlabeled ultrasound corpus: build (readers, cleaning, dedup), leakage guard, training pack."""

from __future__ import annotations

from pathlib import Path


def list_corpus_images(path: str | Path) -> list[Path]:
    """The kept frame PNGs of a built corpus: `path` is its folder (with manifest.parquet) or
    the manifest file. Raises FileNotFoundError when there is no manifest or a frame is missing."""
    from sonodistill.data.corpus import load_manifest

    manifest, root = load_manifest(path)
    paths = [root / p for p in manifest.loc[manifest.kept, "path"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} corpus frames are missing, e.g. {missing[0]}")
    return paths


__all__ = ["list_corpus_images"]
