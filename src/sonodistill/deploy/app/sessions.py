"""Sessions of `sonodistill app`: one uploaded file run through one model, kept in memory.

An upload is written to a private folder (`<the app's folder>/s-<random id>/upload<suffix>`;
the client's file name is never used as a path, only shown back to it), checked by its content
and by its whole header (`accept_upload`: nothing outside the upload, a pixel budget), decoded
and run through the shared pipeline (`deploy.pipeline`); as soon as decoding ends the upload is
deleted. Frames (JPEG) and foreground probabilities (8-bit PNG) stay in memory for the viewer
and for the CSV and overlay video made on request at the user's threshold; closing the session
(or its idle timeout, or the server's exit) drops them. With `keep`, each finished session's
upload and outputs are saved there instead, under the session id.

Only pixel data, pixel spacing and frame timing are read from a DICOM file: no header value
that could identify a patient reaches the viewer, the CSV or the video.
"""

from __future__ import annotations

import csv
import gzip
import io
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sonodistill.data.geometry import Geometry, read_geometry
from sonodistill.data.headers import (
    Declared,
    TooLarge,
    check_pixel_budget,
    declared_size,
    external_references,
)
from sonodistill.data.readers import (
    ReadError,
    TruncatedFile,
    detect_kind,
    frame_count,
    read_frames,
)
from sonodistill.deploy.config import OPACITY
from sonodistill.deploy.pipeline import (
    FramePredictor,
    FrameResult,
    StreamStats,
    VideoWriter,
    area_fields,
    first_frames,
    overlay,
    prob_fields,
    stream,
    upsample,
    video_fps,
)
from sonodistill.io import write_bytes, write_json, write_text

if TYPE_CHECKING:
    from sonodistill.evaluate.head_checkpoint import HeadSpec


class SessionClosed(Exception):
    """Raised inside a running job whose session was closed."""


class UploadRejected(ValueError):
    """An upload that is not a supported, self-contained file (HTTP 415), too large (413),
    or cut short by the app's stop (503)."""

    def __init__(self, message: str, status: int = 415):
        super().__init__(message)
        self.status = status


# Suffix the stored upload gets, by kind (readers pick decoders from the content, except
# NIfTI and MetaImage/NRRD, whose libraries go by the name).
_SUFFIX = {"image": ".img", "video": ".video", "dicom": ".dcm"}


@dataclass(frozen=True)
class PixelBudget:
    """What one upload may make the app decode (see `AppConfig.max_pixels`)."""

    frame: int
    total: int
    max_frames: int

    def frames(self, size: Declared) -> int:
        """Frames to decode: at most `max_frames`, and no more than the total allows (a
        header may not say how many frames follow, or say too few)."""
        return max(1, min(self.max_frames, self.total // max(1, size.frame_pixels)))


def upload_kind(path: Path) -> tuple[str, str]:
    """(kind, suffix to store it under) from the file's content alone; UploadRejected when it
    is none of the supported kinds, or when its header, parsed whole, points at data outside
    the upload (`headers.external_references`: it could make the app read the server's
    files)."""
    kind = detect_kind(path, by_extension=False)
    if kind is None and _gzipped_nifti(path):
        kind = "nifti"
    if kind is None:
        raise UploadRejected("not an image, video, DICOM, NIfTI or MetaImage/NRRD file")
    try:
        references = external_references(path, kind)
    except ReadError as exc:
        raise UploadRejected(str(exc)) from exc
    if references:
        raise UploadRejected(
            f"the file refers to data outside the upload ({references[0][:200]}): upload one "
            "self-contained file, not a header pointing at another file"
        )
    if kind == "nifti":
        return kind, ".nii.gz" if _gzipped_nifti(path) else ".nii"
    if kind == "itk":
        with open(path, "rb") as fh:
            return kind, ".nrrd" if fh.read(4) == b"NRRD" else ".mha"
    return kind, _SUFFIX[kind]


def _gzipped_nifti(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return False
    try:
        with gzip.open(path, "rb") as fh:
            inner = fh.read(352)
    except (OSError, EOFError) as exc:
        raise UploadRejected(f"corrupt gzip data ({exc})") from exc
    return inner[344:348] in (b"n+1\x00", b"ni1\x00")


def accept_upload(upload: Path, budget: PixelBudget) -> tuple[str, Path, Declared]:
    """Check a received upload by its content and its header, before a pixel is decoded:
    its kind (renamed to the suffix its reader expects), no reference outside it (415), and
    its declared size within the budget (413). Returns (kind, stored path, declared size)."""
    kind, suffix = upload_kind(upload)
    upload = upload.rename(upload.with_name(f"upload{suffix}"))
    try:
        size = declared_size(upload, kind)
        check_pixel_budget(size, budget.frame, budget.total, budget.max_frames)
    except TooLarge as exc:
        raise UploadRejected(str(exc), 413) from exc
    except ReadError as exc:
        raise UploadRejected(str(exc)) from exc
    return kind, upload, size


def display_name(name: str) -> str:
    """The client's file name for display only: its last component, printable, short."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(c for c in base if c.isprintable()).strip() or "upload"
    return clean[:120]


@dataclass
class Session:
    id: str
    model_id: str
    backend: str
    name: str
    folder: Path
    created: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.time)
    status: str = "receiving"
    """receiving | queued | running | done | failed"""
    error: str = ""
    kind: str = ""
    total: int = 0
    height: int = 0
    width: int = 0
    geometry: Geometry = field(default_factory=Geometry)
    classes: list[str] = field(default_factory=list)
    task_type: str = "seg"
    jpegs: list[bytes] = field(default_factory=list)
    probs: list[bytes] = field(default_factory=list)
    """Foreground probability per frame, 8-bit PNG at the frame's size (segmentation)."""
    labels: list[bytes] = field(default_factory=list)
    """Most probable foreground class per pixel, PNG (multi-class segmentation only)."""
    rows: list[dict] = field(default_factory=list)
    """Per frame: index, time, size, class probabilities, latency (no areas: they depend on
    the threshold the user picks)."""
    timing: dict = field(default_factory=dict)
    closed: bool = False
    """Set when the user (or the idle timeout) closes it: a running job stops."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self, since: int = 0) -> dict:
        g = self.geometry
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "error": self.error,
            "kind": self.kind,
            "task_type": self.task_type,
            "classes": self.classes,
            "model": self.model_id,
            "backend": self.backend,
            "total": self.total,
            "done": len(self.rows),
            "width": self.width,
            "height": self.height,
            "spacing_mm": list(g.spacing_mm) if g.spacing_mm else None,
            "spacing_from": g.spacing_from,
            "source_fps": 1.0 / g.interval_s if g.interval_s else None,
            "timing": self.timing,
            "frames": self.rows[since:],
        }


class MemorySink:
    """Keeps each frame (JPEG) and its foreground probabilities (PNG) for the viewer; their
    encoding is transport, not pipeline: its time is excluded from the latency figures."""

    def __init__(self, session: Session, spec: HeadSpec):
        self.session, self.spec = session, spec

    def __call__(self, result: FrameResult) -> float:
        s, pred, frame = self.session, result.prediction, result.frame
        if s.closed:
            raise SessionClosed("session closed")
        h, w = frame.shape[:2]
        fields = prob_fields(self.spec, s.classes, pred.probs)
        excluded = 0.0
        if self.spec.task_type == "seg":
            up = upsample(pred.probs, h, w)  # what a live viewer needs before drawing
            t0 = time.perf_counter()
            fg = up[0] if len(up) == 1 else 1.0 - up[0]
            s.probs.append(_png(np.clip(fg * 255.0 + 0.5, 0, 255).astype(np.uint8)))
            if len(up) > 1:
                s.labels.append(_png((up[1:].argmax(axis=0) + 1).astype(np.uint8)))
            excluded = time.perf_counter() - t0
        t0 = time.perf_counter()
        rgb = frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        s.jpegs.append(_jpeg(rgb))
        excluded += time.perf_counter() - t0
        t = result.timings_ms
        latency = t["preprocess"] + t["model"]  # + this sink's upsampling, added by the caller
        row = {"frame": result.index, "time_s": _round(result.time_s), "height": h, "width": w}
        row.update(fields)
        row["model_ms"] = round(t["model"], 3)
        row["_latency_ms"] = latency
        s.height, s.width = h, w
        with s.lock:
            s.rows.append(row)
        return excluded


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def run_session(
    session: Session, upload: Path, predictor: FramePredictor, spec: HeadSpec, max_frames: int
) -> str:
    """Decode the upload and run the model over it (in the app's worker thread); returns the
    final status, done or failed (with `session.error`), for the caller to publish once the
    upload is deleted."""
    session.status = "running"
    try:
        session.geometry = read_geometry(upload, session.kind)
        session.total = min(frame_count(upload, session.kind), max_frames)
        sink = MemorySink(session, spec)
        stats = StreamStats()

        def finish(result: FrameResult) -> None:
            with session.lock:
                row = session.rows[-1]
                row["latency_ms"] = round(
                    row.pop("_latency_ms") + result.timings_ms["postprocess"], 3
                )

        frames = first_frames(read_frames(upload, session.kind), max_frames)
        stream(frames, predictor, session.geometry, sink, stats, finish)
        if not session.rows:
            raise ReadError("no frame could be decoded")
        session.timing = stats.summary()
        session.total = len(session.rows)
        return "done"
    except TruncatedFile as exc:  # a cut upload: named as the user knows it, with its counts
        session.error = f"{session.name} {exc.what}"[:300]
        return "failed"
    except Exception as exc:  # shown to the user in the page; the server keeps running
        session.error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return "failed"


def threshold_labels(session: Session, i: int, threshold: float) -> np.ndarray:
    prob = cv2.imdecode(np.frombuffer(session.probs[i], np.uint8), cv2.IMREAD_UNCHANGED)
    fg = prob >= int(round(threshold * 255))
    if session.labels:
        labels = cv2.imdecode(np.frombuffer(session.labels[i], np.uint8), cv2.IMREAD_UNCHANGED)
        return np.where(fg, labels, 0).astype(np.uint8)
    return fg.astype(np.uint8)


def session_rows(session: Session, threshold: float) -> list[dict]:
    """The CSV rows at a threshold (areas from the stored probabilities)."""
    rows = []
    for i, row in enumerate(list(session.rows)):
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        if session.task_type == "seg" and i < len(session.probs):
            labels = threshold_labels(session, i, threshold)
            fields = area_fields(session.classes, labels, session.geometry)
            out = {**{k: out[k] for k in ("frame", "time_s", "height", "width")}, **fields, **out}
        rows.append(out)
    return rows


def session_csv(session: Session, threshold: float) -> str:
    rows = session_rows(session, threshold)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def session_video(session: Session, threshold: float, opacity: float) -> bytes:
    """The overlay video (H.264 MP4) at the user's threshold and opacity."""
    buffer = io.BytesIO()
    writer = VideoWriter(buffer, video_fps(session.geometry), session.width, session.height)
    for i in range(len(session.jpegs)):
        bgr = cv2.imdecode(np.frombuffer(session.jpegs[i], np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if session.task_type == "seg":
            image = overlay(rgb, threshold_labels(session, i, threshold), opacity)
        else:
            row = session.rows[i]
            text = f"{row['predicted']} {row['p_' + row['predicted']]:.2f}"
            image = overlay(rgb, None, opacity, text)
        writer.write(image)
    writer.close()
    return buffer.getvalue()


def keep_session(session: Session, upload: Path, keep: Path, threshold: float = 0.5) -> Path:
    """Save a finished session (upload, CSV, overlay video, summary) to keep/<id>/, written
    to a staging folder first so that a kept session is always complete."""
    stage = keep / f".{session.id}.partial"
    stage.mkdir(parents=True, exist_ok=True)
    shutil.move(upload, stage / f"input{upload.suffix}")
    write_text(stage / "predictions.csv", session_csv(session, threshold))
    if session.jpegs:
        write_bytes(stage / "overlay.mp4", session_video(session, threshold, OPACITY))
    summary = {k: v for k, v in session.info().items() if k not in ("frames", "name")}
    summary["status"] = "done"
    write_json(stage / "summary.json", summary)
    folder = keep / session.id
    stage.rename(folder)
    return folder


def new_id() -> str:
    return secrets.token_hex(12)
