"""Frames to embed, calibrate or check, from folders, videos and corpora, as references
(`FrameRef`: dataset, file, frame index) that are read back as grey squares (`load_frames`).

Sources (`NAME=PATH` or `PATH`, mixed freely):
- a folder (searched recursively), one image or one video. Images are png/jpg/bmp/tif; videos
  (mp4, avi, ...) give `frames_per_video` evenly spaced frames. Masks (`data.masks`:
  `*_mask.png`, `*_Annotation.png`, ..., files under a `mask/` or `masks/` folder) are skipped.
  The dataset label is NAME (default: the folder's name); with `label_component K` the K-th path
  component under the folder is appended (`busi/benign`).
- a corpus from `sonodistill corpus build` (its folder or `manifest.parquet`): the kept frames,
  labelled by their dataset and anatomy, grouped by the clip/volume they come from.
- any other `PATH.parquet`: a table with `dataset`, `file` and optionally `anatomy`, `frame`
  columns; relative files are resolved against the table's folder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sonodistill.data.greys import read_greys, resize_square
from sonodistill.data.manifest import is_corpus, load_manifest
from sonodistill.data.masks import is_mask
from sonodistill.data.readers import IMAGE_EXT, VIDEO_EXT, video_frame_count


@dataclass
class FrameRef:
    """Where one frame comes from; `frame` is the index in a video (-1 for still images)."""

    dataset: str
    file: str
    frame: int = -1
    anatomy: str = ""
    source: str = ""
    """The clip or volume a corpus frame was extracted from."""

    @property
    def group(self) -> str:
        # Frames of one clip are near-duplicates: cross-validation must keep them together.
        return self.source or self.file


# --- listing ------------------------------------------------------------------------------------


def spread(count: int, k: int) -> list[int]:
    """k evenly spaced indices in [0, count) (the frames a video gives when it is listed: here,
    and in evaluation's dataset formats)."""
    if count <= 0:
        return []
    k = min(k, count)
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, k)})


def split_source(text: str) -> tuple[str | None, Path]:
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(text)


def list_source(
    text: str, label_component: int | None = None, frames_per_video: int = 8
) -> list[FrameRef]:
    """Frames of one source (see the module docstring), in sorted, reproducible order."""
    name, path = split_source(text)
    if is_corpus(path):
        return list_corpus(path, name)
    if path.suffix == ".parquet":
        return list_manifest(path, name, frames_per_video)
    if not path.exists():
        raise FileNotFoundError(f"source {text!r}: {path} does not exist")
    root = path if path.is_dir() else path.parent
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    label = name or root.name
    frames: list[FrameRef] = []
    for file in files:
        suffix = file.suffix.lower()
        if suffix not in IMAGE_EXT | VIDEO_EXT or not file.is_file() or is_mask(file):
            continue
        dataset = label
        if label_component is not None:
            parts = file.relative_to(root).parts[:-1]
            if len(parts) > label_component:
                dataset = f"{label}/{parts[label_component]}"
        if suffix in VIDEO_EXT:
            for i in spread(video_frame_count(file), frames_per_video):
                frames.append(FrameRef(dataset, str(file), i))
        else:
            frames.append(FrameRef(dataset, str(file)))
    if not frames:
        raise FileNotFoundError(f"source {text!r}: no images or videos found")
    return frames


def list_corpus(path: Path, name: str | None) -> list[FrameRef]:
    """The kept frames of a built corpus (its folder or manifest), with their provenance."""
    table, root = load_manifest(path)
    return [
        FrameRef(
            name or str(r.dataset), str(root / r.path), -1, str(r.anatomy or ""), str(r.source)
        )
        for r in table[table.kept].itertuples(index=False)
    ]


def list_manifest(path: Path, name: str | None, frames_per_video: int) -> list[FrameRef]:
    """A table of frames: rows with dataset, file (and optionally anatomy, frame)."""
    table = pd.read_parquet(path)
    missing = {"dataset", "file"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    frames = []
    for row in table.itertuples(index=False):
        file = Path(row.file)
        file = file if file.is_absolute() else path.parent / file
        anatomy = str(getattr(row, "anatomy", "") or "")
        dataset = name or str(row.dataset)
        frame = getattr(row, "frame", None)
        if frame is not None and not pd.isna(frame):
            frames.append(FrameRef(dataset, str(file), int(frame), anatomy))
        elif file.suffix.lower() in VIDEO_EXT:
            for i in spread(video_frame_count(file), frames_per_video):
                frames.append(FrameRef(dataset, str(file), i, anatomy))
        else:
            frames.append(FrameRef(dataset, str(file), -1, anatomy))
    return frames


def collect_frames(
    sources: Sequence[str],
    max_per_source: int | None = None,
    label_component: int | None = None,
    frames_per_video: int = 8,
    anatomy: Sequence[str] = (),
    seed: int = 0,
) -> list[FrameRef]:
    """Frames of all sources, at most max_per_source each (seeded random subset, order kept)."""
    anatomies = dict(a.split("=", 1) for a in anatomy)
    rng = np.random.default_rng(seed)
    out: list[FrameRef] = []
    for text in sources:
        frames = list_source(text, label_component, frames_per_video)
        if max_per_source is not None and len(frames) > max_per_source:
            keep = np.sort(rng.choice(len(frames), size=max_per_source, replace=False))
            frames = [frames[i] for i in keep]
        for f in frames:
            top = f.dataset.split("/")[0]
            f.anatomy = f.anatomy or anatomies.get(f.dataset, anatomies.get(top, ""))
        out.extend(frames)
    return out


# --- reading ------------------------------------------------------------------------------------


def load_frames(frames: Sequence[FrameRef], size: int) -> Iterator[np.ndarray]:
    """Grey uint8 (size, size) arrays, in order; each video is decoded once per run of frames."""
    for grey in read_greys([(f.file, f.frame) for f in frames]):
        yield resize_square(grey, size)


def frames_tensor(frames: Sequence[FrameRef], size: int) -> torch.Tensor:
    """(N, 1, size, size) floats in [0, 1]."""
    arrays = list(load_frames(frames, size))
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1).float().div_(255.0)
