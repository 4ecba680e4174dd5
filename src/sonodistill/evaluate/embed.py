"""`sonodistill embed`: embeddings of ultrasound frames with any encoder, saved with metadata.

Sources (`--sources`, repeatable, mixed freely): folders, images, videos, built corpora or
tables of frames, listed as `sonodistill.data.listing` describes.

Output folder: `metadata.parquet` (one row per frame: dataset, anatomy, file, frame, group),
`<model>.npy` (N, C) global-average-pooled final features for each encoder, `<model>.cls.npy`
(N, D) the CLS token for ViT teachers, `embeddings.json` (index of models) and `config.yaml`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sonodistill.config import save_config
from sonodistill.data.listing import collect_frames, frames_tensor
from sonodistill.distill.run import load_encoder
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, parse_spec
from sonodistill.progress import track

log = logging.getLogger(__name__)


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
        encoders.append(load_encoder(spec).eval().to(cfg.device))
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
