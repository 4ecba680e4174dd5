"""`sonodistill embed`: embeddings of ultrasound frames with any encoder, saved with metadata.

Sources (`--sources`, repeatable, mixed freely):
- `NAME=PATH` or `PATH`: a folder (searched recursively), one image or one video. Images are
  png/jpg/bmp/tif; videos (mp4, avi, ...) give `frames_per_video` evenly spaced frames. Masks
  (`*_mask.png`, `*_mask_1.png`, files under a `mask/` or `masks/` folder) are skipped.
  The dataset label is NAME (default: the folder's name); with `label_component K` the K-th
  path component under the folder is appended (`busi/benign`).
- a corpus from `sonodistill corpus build` (its folder or `manifest.parquet`): the kept frames,
  labelled by their dataset and anatomy, grouped by the clip/volume they come from.
- any other `PATH.parquet`: a table with `dataset`, `file` and optionally `anatomy`, `frame`
  columns; relative files are resolved against the table's folder.

Output folder: `metadata.parquet` (one row per frame: dataset, anatomy, file, frame, group),
`<model>.npy` (N, C) global-average-pooled final features for each encoder, `<model>.cls.npy`
(N, D) the CLS token for ViT teachers, `embeddings.json` (index of models) and `config.yaml`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from sonodistill.config import parse_config, save_config
from sonodistill.data.frames import to_grey
from sonodistill.data.readers import IMAGE_EXT, VIDEO_EXT, read_video, video_frame_count
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, build_encoder, parse_spec
from sonodistill.progress import track

log = logging.getLogger(__name__)

_MASK_STEM = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)
_MASK_DIRS = {"mask", "masks", "label", "labels", "annotations"}


@dataclass
class EmbedConfig:
    """Embeddings of frames from folders, videos or a corpus manifest, for several encoders."""

    sources: list[str] = field(default_factory=list)
    """`NAME=PATH` or `PATH` (folder, image, video, or a .parquet corpus manifest)."""
    encoders: list[str] = field(default_factory=lambda: ["random:resnet50@R50-Rand"])
    """Encoder specs: random:ARCH, student:RUN_DIR, timm:ARCH=FILE, teacher:FILE; `@LABEL`."""
    out: str = "runs/embed"
    image_size: int = 224
    """Frames are resized (bilinear) to image_size x image_size grey, as in distillation."""
    batch_size: int = 32
    max_per_source: int | None = 500
    """Frames kept per source (random, seeded) so that no dataset swamps the plots."""
    frames_per_video: int = 8
    label_component: int | None = None
    """Append this path component (under the source folder) to the dataset label."""
    anatomy: list[str] = field(default_factory=list)
    """`DATASET=ANATOMY` pairs, e.g. busi=breast ddti=thyroid lung=lung."""
    seed: int = 0
    device: str = "cpu"
    teacher_kwargs: dict = field(default_factory=dict)
    """Architecture overrides for `teacher:` specs (tiny teachers in tests)."""


@dataclass
class Frame:
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


def is_mask(path: Path) -> bool:
    return bool(_MASK_STEM.search(path.stem)) or any(
        p.lower() in _MASK_DIRS for p in path.parent.parts[-1:]
    )


def _spread(count: int, k: int) -> list[int]:
    """k evenly spaced indices in [0, count)."""
    if count <= 0:
        return []
    k = min(k, count)
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, k)})


def split_source(text: str) -> tuple[str | None, Path]:
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(text)


def list_source(text: str, label_component: int | None = None, frames_per_video: int = 8):
    """Frames of one source (see the module docstring), in sorted, reproducible order."""
    name, path = split_source(text)
    if (path / "manifest.parquet").is_file() or _is_corpus_manifest(path):
        return list_corpus(path, name)
    if path.suffix == ".parquet":
        return list_manifest(path, name, frames_per_video)
    if not path.exists():
        raise FileNotFoundError(f"source {text!r}: {path} does not exist")
    root = path if path.is_dir() else path.parent
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    label = name or root.name
    frames: list[Frame] = []
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
            for i in _spread(video_frame_count(file), frames_per_video):
                frames.append(Frame(dataset, str(file), i))
        else:
            frames.append(Frame(dataset, str(file)))
    if not frames:
        raise FileNotFoundError(f"source {text!r}: no images or videos found")
    return frames


def _is_corpus_manifest(path: Path) -> bool:
    if path.suffix != ".parquet" or not path.is_file():
        return False
    import pyarrow.parquet as pq

    return {"kept", "path", "source"} <= set(pq.read_schema(path).names)


def list_corpus(path: Path, name: str | None) -> list[Frame]:
    """The kept frames of a built corpus (its folder or manifest), with their provenance."""
    from sonodistill.data.corpus import load_manifest

    table, root = load_manifest(path)
    return [
        Frame(name or str(r.dataset), str(root / r.path), -1, str(r.anatomy or ""), str(r.source))
        for r in table[table.kept].itertuples(index=False)
    ]


def list_manifest(path: Path, name: str | None, frames_per_video: int) -> list[Frame]:
    """A corpus manifest: rows with dataset, file (and optionally anatomy, frame)."""
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
            frames.append(Frame(dataset, str(file), int(frame), anatomy))
        elif file.suffix.lower() in VIDEO_EXT:
            for i in _spread(video_frame_count(file), frames_per_video):
                frames.append(Frame(dataset, str(file), i, anatomy))
        else:
            frames.append(Frame(dataset, str(file), -1, anatomy))
    return frames


def collect_frames(
    sources: Sequence[str],
    max_per_source: int | None = None,
    label_component: int | None = None,
    frames_per_video: int = 8,
    anatomy: Sequence[str] = (),
    seed: int = 0,
) -> list[Frame]:
    """Frames of all sources, at most max_per_source each (seeded random subset, order kept)."""
    anatomies = dict(a.split("=", 1) for a in anatomy)
    rng = np.random.default_rng(seed)
    out: list[Frame] = []
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


def _resize(grey: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))


def read_frames(frames: Sequence[Frame], size: int) -> Iterator[np.ndarray]:
    """Grey uint8 (size, size) arrays, in order; each video is decoded once per run of frames."""
    i = 0
    while i < len(frames):
        f = frames[i]
        if f.frame < 0:
            with Image.open(f.file) as img:
                yield _resize(np.asarray(img.convert("L")), size)
            i += 1
            continue
        j = i  # consecutive frames of the same video
        while j < len(frames) and frames[j].file == f.file and frames[j].frame >= 0:
            j += 1
        wanted = {frames[k].frame: k for k in range(i, j)}
        got: dict[int, np.ndarray] = {}
        for index, rgb in read_video(Path(f.file)):
            if index in wanted:
                got[index] = _resize(to_grey(rgb), size)
            if index >= max(wanted):
                break
        for k in range(i, j):
            if frames[k].frame not in got:
                raise ValueError(f"{f.file}: frame {frames[k].frame} could not be decoded")
            yield got[frames[k].frame]
        i = j


def frames_tensor(frames: Sequence[Frame], size: int) -> torch.Tensor:
    """(N, 1, size, size) floats in [0, 1]."""
    arrays = list(read_frames(frames, size))
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1).float().div_(255.0)


# --- embedding ----------------------------------------------------------------------------------


@torch.inference_mode()
def embed_batch(encoder: Encoder, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """[0, 1] grey images -> (pooled features, CLS token or None)."""
    x = to_model_input(images)
    if encoder.is_vit:
        cls, patches = encoder.tokens(x)
        return patches.mean(dim=(-2, -1)).float().cpu().numpy(), cls.float().cpu().numpy()
    return encoder.pooled(x).float().cpu().numpy(), None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def embed(cfg: EmbedConfig) -> Path:
    """Embed all frames of cfg.sources with every encoder; returns the output folder."""
    if not cfg.sources:
        raise ValueError("embed: give at least one source (--sources NAME=PATH)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)  # random encoders: the same init for a given seed
    frames = collect_frames(
        cfg.sources,
        cfg.max_per_source,
        cfg.label_component,
        cfg.frames_per_video,
        cfg.anatomy,
        cfg.seed,
    )
    meta = pd.DataFrame(
        {
            "dataset": [f.dataset for f in frames],
            "anatomy": [f.anatomy for f in frames],
            "file": [f.file for f in frames],
            "frame": [f.frame for f in frames],
            "group": [f.group for f in frames],
        }
    )
    meta.to_parquet(out / "metadata.parquet", index=False)
    log.info("embed: %d frames from %d datasets", len(frames), meta.dataset.nunique())

    encoders = []
    for text in cfg.encoders:
        spec = parse_spec(text)
        if spec.kind == "teacher" and cfg.teacher_kwargs:
            spec.model_kwargs = dict(cfg.teacher_kwargs)
        encoders.append(build_encoder(spec).eval().to(cfg.device))
    labels = [slug(e.name) for e in encoders]
    if len(set(labels)) != len(labels):
        raise ValueError(f"encoder labels must differ (add @LABEL): {labels}")

    pooled: list[list[np.ndarray]] = [[] for _ in encoders]
    cls: list[list[np.ndarray]] = [[] for _ in encoders]
    starts = range(0, len(frames), cfg.batch_size)
    for start in track(starts, "embedding", total=len(starts)):
        images = frames_tensor(frames[start : start + cfg.batch_size], cfg.image_size)
        images = images.to(cfg.device)
        for k, encoder in enumerate(encoders):  # frames are read once for all encoders
            p, c = embed_batch(encoder, images)
            pooled[k].append(p)
            if c is not None:
                cls[k].append(c)

    index = {"n": len(frames), "image_size": cfg.image_size, "models": []}
    for encoder, label, p, c in zip(encoders, labels, pooled, cls, strict=True):
        entry = {
            "label": label,
            "spec": encoder.spec.__dict__ | {"name": encoder.spec.name},
            "pooled": f"{label}.npy",
            "dim": int(encoder.out_channels),
        }
        np.save(out / entry["pooled"], np.concatenate(p).astype(np.float32))
        if c:
            entry["cls"] = f"{label}.cls.npy"
            np.save(out / entry["cls"], np.concatenate(c).astype(np.float32))
        index["models"].append(entry)
    (out / "embeddings.json").write_text(json.dumps(index, indent=2, default=str))
    return out


def load_embeddings(folder: str | Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Metadata and {label: pooled, label.cls: CLS} arrays of an `embed` output folder."""
    folder = Path(folder)
    index = json.loads((folder / "embeddings.json").read_text())
    meta = pd.read_parquet(folder / "metadata.parquet")
    arrays = {}
    for m in index["models"]:
        arrays[m["label"]] = np.load(folder / m["pooled"])
        if "cls" in m:
            arrays[m["label"] + ".cls"] = np.load(folder / m["cls"])
    return meta, arrays


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(EmbedConfig, argv or [], "sonodistill embed", __doc__.splitlines()[0])
    out = embed(cfg)
    print(f"embeddings written to {out}")
    return 0
