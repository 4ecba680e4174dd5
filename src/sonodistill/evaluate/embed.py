"""`sonodistill embed`: embeddings of ultrasound frames with any encoder, saved with metadata.

Sources (`--sources`, repeatable, mixed freely): folders, images, videos, built corpora or
tables of frames, listed as `sonodistill.data.listing` describes.

Encoders: any family's spec (`sonodistill.models.encoders`), as a string or a mapping of
EncoderSpec fields. Each gives the vectors its family offers (`Encoder.vectors`).

Output folder: `metadata.parquet` (one row per frame: dataset, anatomy, file, frame, group),
`LABEL.npy` (N, C) the global average of each encoder's last feature map (a ViT's mean patch
token), `LABEL.cls.npy` (N, D) a CLS vector where the family has one (ViT: the CLS token;
DINOv3 ConvNeXt: its normed average), `embeddings.json` (index of models) and `config.yaml`.
LABEL is the encoder's label (`@LABEL`, else ARCH-rand, ARCH-WEIGHTSSTEM or RUN-distill, as in
the suite's tables). Everything is validated (sources, encoders and their weights, the image
size) before the first file is written; a folder that holds embeddings needs --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sonodistill.config import check_fields
from sonodistill.data.listing import collect_frames, frames_tensor
from sonodistill.errors import UserError
from sonodistill.evaluate.config import EMBED, EmbedConfig
from sonodistill.evaluate.train import pick_device
from sonodistill.io import atomic_path, write_json, write_parquet
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, build_encoder, encoder_label
from sonodistill.progress import track
from sonodistill.utils.rundir import RunDir

log = logging.getLogger(__name__)


# --- embedding ----------------------------------------------------------------------------------


@torch.inference_mode()
def embed_batch(encoder: Encoder, images: torch.Tensor) -> dict[str, np.ndarray]:
    """[0, 1] grey images -> the encoder's named vectors (`pooled`, and `cls` where it has one)."""
    vectors = encoder.vectors(to_model_input(images))
    return {name: v.float().cpu().numpy() for name, v in vectors.items()}


def build_encoders(items: list[str | dict], image_size: int) -> list[Encoder]:
    """Every encoder of the config, weights loaded and input size checked."""
    encoders = []
    for item in items:
        encoder = build_encoder(item, "--encoders")
        encoder.check_input_size(image_size, image_size, "--image_size")
        encoders.append(encoder)
    return encoders


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def embed(cfg: EmbedConfig) -> Path:
    """Embed all frames of cfg.sources with every encoder; returns the output folder."""
    check_fields(cfg)
    if not cfg.sources:
        raise UserError("--sources: give at least one source (--sources+ NAME=PATH)")
    run = RunDir(cfg.out, EMBED, overwrite=cfg.overwrite)
    run.precheck()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # random encoders: the same init for a given seed
    encoders = [e.eval().to(device) for e in build_encoders(cfg.encoders, cfg.image_size)]
    labels = [slug(encoder_label(item)) for item in cfg.encoders]
    if len(set(labels)) != len(labels):
        raise UserError(f"--encoders: labels must differ (add @LABEL): {labels}")
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
    log.info("embed: %d frames from %d datasets", len(frames), meta.dataset.nunique())
    with run.claim():  # frames and encoders ready: one embed writes at a time
        vectors = _embed_all(cfg, frames, encoders, device)  # an unreadable frame: nothing written
        run.clear()
        run.save_options(cfg)
        write_parquet(run / "metadata.parquet", meta)
        return _write_embeddings(run.path, frames, encoders, labels, vectors, cfg.image_size)


def _embed_all(cfg: EmbedConfig, frames, encoders, device) -> list[dict[str, list[np.ndarray]]]:
    """Per encoder, {vector name: batches}; every frame is read once for all encoders."""
    vectors: list[dict[str, list[np.ndarray]]] = [{} for _ in encoders]
    starts = range(0, len(frames), cfg.batch_size)
    for start in track(starts, "embedding", total=len(starts)):
        images = frames_tensor(frames[start : start + cfg.batch_size], cfg.image_size)
        images = images.to(device)
        for k, encoder in enumerate(encoders):
            for name, v in embed_batch(encoder, images).items():
                vectors[k].setdefault(name, []).append(v)
    return vectors


def _write_embeddings(out: Path, frames, encoders, labels, vectors, image_size: int) -> Path:
    index = {"n": len(frames), "image_size": image_size, "models": []}
    for encoder, label, named in zip(encoders, labels, vectors, strict=True):
        entry = {
            "label": label,
            "spec": dataclasses.asdict(encoder.spec),
            "dim": int(encoder.out_channels),
            "vectors": sorted(named),
        }
        for name, parts in named.items():
            entry[name] = f"{label}.npy" if name == "pooled" else f"{label}.{name}.npy"
            save_array(out / entry[name], np.concatenate(parts))
        index["models"].append(entry)
    write_json(out / "embeddings.json", index, default=str)  # last: it lists the arrays
    return out


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array.astype(np.float32))


def load_embeddings(folder: str | Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Metadata and {label: pooled, label.cls: CLS, ...} arrays of an `embed` output folder."""
    folder = Path(folder)
    index = json.loads((folder / "embeddings.json").read_text())
    meta = pd.read_parquet(folder / "metadata.parquet")
    arrays = {}
    for m in index["models"]:
        for name in m.get("vectors", ["pooled", *(["cls"] if "cls" in m else [])]):
            key = m["label"] if name == "pooled" else f"{m['label']}.{name}"
            arrays[key] = np.load(folder / m[name])
    return meta, arrays
