"""`sonodistill predict`: a fine-tuned head over images, folders, cine loops, DICOM and 2D+t
volumes, frame by frame as a point-of-care scanner runs it.

The model is a model folder: a head checkpoint (`sonodistill evaluate --save_models true`), an
export folder (`sonodistill export --model`) or one of its files (`model_int8.onnx`); `--backend`
picks the runtime (`deploy.runtimes.BACKENDS`): torch, torch_bf16, ort_fp32, ort_int8,
executorch_fp32, executorch_int8 (default: that of the file named, else PyTorch when the folder
has the model itself). Only the runtime asked is imported: `--backend ort_int8` loads no torch.
Inputs are read by the corpus readers (images, mp4/avi/mov, DICOM single-frame or cine incl.
YBR/JPEG, NIfTI/MetaImage sequences and volumes).

Outputs in `out/` (written to a staging folder and moved into place when complete):
- `predictions.csv`: one row per frame: source, frame, time_s, frame size, mask area in pixels
  and in mm^2 (when the file has a pixel spacing), class probabilities, model milliseconds,
  Dice with the previous frame's mask (and, `--check_torch true`, PyTorch's mask area and the
  Dice between its mask and the backend's);
- `masks/NAME.png` (stills) or `masks/NAME/FRAME.png` (clips): 1-bit masks (read as 0/255
  grey), class indices for multi-class heads;
- `overlays/NAME.png` or `overlays/NAME.mp4` (H.264): the frames with the mask drawn in;
- `summary.{json,md}`: per-stage time (decode, preprocess, model, postprocess incl. writing),
  end-to-end and model-only frames per second, frame-to-frame stability with and without
  temporal smoothing, agreement with PyTorch, per-source spacing, frame rate, counts and status;
- `config.yaml`.
The folder is locked while the run writes; masks and overlays are written to `OUT/.partial/`
and moved into place, then the CSV, config and summary (each atomically; `summary.json` last).

Per source, the frames declared by the header (up to --max_frames), decoded, CSV rows, masks and
overlay frames (read back from the closed video) must be equal; a source whose counts differ, or
that ends before its declared frames (`readers.TruncatedFile`) or stops decoding, is failed
(its frames read are written) and the exit code is 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from sonodistill.config import check_fields, save_config
from sonodistill.data.geometry import Geometry, read_geometry
from sonodistill.data.masks import is_mask
from sonodistill.data.readers import (
    ReadError,
    TruncatedFile,
    detect_kind,
    frame_count,
    read_frames,
    video_frame_count,
)
from sonodistill.deploy.config import PREDICT, PredictConfig
from sonodistill.deploy.environment import default_threads, environment
from sonodistill.deploy.pipeline import (
    STAGES,
    WARMUP_RUNS,
    FramePredictor,
    FrameResult,
    StreamStats,
    VideoWriter,
    Worker,
    area_fields,
    class_names,
    dice_pair,
    first_frames,
    label_map,
    overlay,
    prob_fields,
    save_png,
    stream,
    upsample,
    video_fps,
    warm_up,
)
from sonodistill.deploy.runtimes import (
    BACKENDS,
    ModelFolder,
    backend_of_file,
    default_backend,
    open_model_folder,
    open_runner,
)
from sonodistill.errors import UserError
from sonodistill.io import markdown_table, sync_files, write_csv, write_json, write_text
from sonodistill.progress import progress_bar
from sonodistill.utils.rundir import RunDir, remove_owned

log = logging.getLogger(__name__)

__all__ = ["PredictConfig", "predict"]


@dataclass
class Source:
    path: Path
    name: str
    """Output name: the path under the input folder (or the file stem), without suffix."""
    kind: str
    count: int
    """Frames in the file's header (0 when the header does not say)."""
    geometry: Geometry

    @property
    def still(self) -> bool:
        return self.count == 1


# --- validation and listing (nothing is written before both pass) ------------------------------


def _spacing(cfg: PredictConfig) -> tuple[float, float] | None:
    values = cfg.pixel_spacing_mm
    if not values:
        return None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise UserError(f"--pixel_spacing_mm takes one or two positive numbers, not {values}")
    return (float(values[0]), float(values[-1]))


def check_options(cfg: PredictConfig) -> None:
    """The options, checked before the model or any input is read: nothing written yet."""
    if not cfg.inputs:
        raise UserError("give --inputs (files or folders)")
    if not cfg.model:
        raise UserError("give --model (a head checkpoint or an export folder)")
    check_fields(cfg)
    if cfg.backend is not None:
        cfg.backend = BACKENDS.canonical(cfg.backend)
    named = backend_of_file(cfg.model) if Path(cfg.model).is_file() else None
    if named and cfg.backend and cfg.backend != named:
        raise UserError(f"--model {cfg.model} is the {named} file, not {cfg.backend}'s")
    _spacing(cfg)
    RunDir(cfg.out, PREDICT, overwrite=cfg.overwrite).precheck()  # again under the lock


def list_sources(cfg: PredictConfig) -> tuple[list[Source], list[dict]]:
    """Sources in input order (folders sorted), and the files of folders that cannot be read.

    A file named on the command line must be readable; inside a folder, files that are no
    image, video, DICOM or volume are ignored, and unreadable ones are listed and skipped."""
    sources: list[Source] = []
    skipped: list[dict] = []
    spacing = _spacing(cfg)
    taken: set[str] = set()
    for text in cfg.inputs:
        root = Path(text)
        if not root.exists():
            raise FileNotFoundError(f"input {root} does not exist")
        if root.is_dir():
            files = [p for p in sorted(root.rglob("*")) if p.is_file() and not is_mask(p)]
            files = [p for p in files if detect_kind(p)]
            if not files:
                raise FileNotFoundError(f"input folder {root}: no images, videos, DICOM or volumes")
            names = [str(Path(root.name) / p.relative_to(root).parent / _stem(p)) for p in files]
        else:
            if detect_kind(root) is None:
                raise UserError(f"input {root}: not an image, video, DICOM or volume file")
            files, names = [root], [_stem(root)]
        for path, name in zip(files, names, strict=True):
            kind = detect_kind(path)
            try:
                count = frame_count(path, kind, cfg.layout, cfg.axis)
                geometry = read_geometry(path, kind, cfg.layout, cfg.axis)
            except Exception as exc:  # a header the readers refuse
                if not root.is_dir():
                    raise UserError(f"input {path}: cannot be read ({exc})") from exc
                skipped.append({"file": str(path), "reason": str(exc)})
                continue
            unique, k = name, 2
            while unique in taken:
                unique, k = f"{name}-{k}", k + 1
            taken.add(unique)
            geometry = geometry.with_overrides(spacing, cfg.fps)
            sources.append(Source(path, unique, kind, count, geometry))
    return sources, skipped


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


# --- writing -------------------------------------------------------------------------------------


@dataclass
class SourceOutput:
    """One source's outputs and what they hold: masks, the overlay (a PNG, or one video
    container from the source's first frame to its last, closed by `finish`), rows, stability
    and agreement. Its frame jobs and `finish` run in order in the sink's worker thread (or, with
    the PyTorch check, the frames on the main thread before `finish` is queued): one object per
    source, so no second writer ever opens its video."""

    source: Source
    folder: Path
    decoded: int = 0
    """Frames handed to the sink (counted on the main thread, as they come)."""
    rows: int = 0
    masks: int = 0
    overlay_frames: int = 0
    """PNG overlays written, or the frames the closed video holds (read back from the file)."""
    video: VideoWriter | None = None
    prev_raw: np.ndarray | None = None
    prev_smooth: np.ndarray | None = None
    stability: dict = field(default_factory=lambda: {"raw": [], "smoothed": []})
    agreement: list[float] = field(default_factory=list)

    @property
    def video_path(self) -> Path:
        return self.folder / "overlays" / f"{self.source.name}.mp4"

    def write_overlay(self, drawn: np.ndarray) -> None:
        if self.source.still:
            save_png(self.folder / "overlays" / f"{self.source.name}.png", drawn, durable=False)
            self.overlay_frames += 1
            return
        if self.video is None:
            fps = video_fps(self.source.geometry)
            h, w = drawn.shape[:2]
            self.video = VideoWriter(self.video_path, fps, w, h, durable=False)
        self.video.write(drawn)

    def finish(self) -> None:
        """Close the video after its last frame and count the frames the file holds."""
        if self.video is not None:
            self.video.close()
            self.overlay_frames = video_frame_count(self.video_path)

    def counts(self, cfg: PredictConfig, seg: bool) -> tuple[dict, list[str]]:
        """Frames in the header (up to --max_frames), decoded, rows, masks and overlay frames;
        and those that differ from the frames decoded."""
        count, n = self.source.count, self.decoded
        declared = min(count, cfg.max_frames or count) or None
        counts = {"declared": declared, "decoded": n, "rows": self.rows, "masks": self.masks}
        counts["overlay_frames"] = self.overlay_frames
        expected = {"declared": declared and n, "decoded": n, "rows": n}
        expected["masks"] = n if cfg.masks and seg else 0
        expected["overlay_frames"] = n if cfg.overlays else 0
        wrong = [f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v != expected[k]]
        return counts, wrong


class FileSink:
    """Post-processing of `predict`: masks, overlays, CSV rows, stability and agreement, one
    `SourceOutput` per source (`begin` ... `end`)."""

    def __init__(self, folder: Path, cfg: PredictConfig, spec, names: list[str], reference=None):
        self.folder, self.cfg, self.spec, self.names = folder, cfg, spec, names
        self.reference = reference  # a FramePredictor on the PyTorch head, or None
        self.rows: list[dict] = []
        self.out: SourceOutput | None = None
        self.worker = Worker()  # post-processes, writes masks, overlays and the video
        self.overlap = [0, 0]  # agreement with PyTorch: 2|A & B|, |A| + |B| over all frames

    @property
    def background_s(self) -> float:
        return self.worker.busy_s

    def drain(self) -> None:
        """Wait for the frames handed over so far."""
        self.worker.drain()

    def close(self) -> None:
        self.worker.close()

    def begin(self, source: Source) -> None:
        self.out = SourceOutput(source, self.folder)

    def __call__(self, result: FrameResult) -> float:
        """Hands the frame's post-processing to the worker thread (the model goes on with the
        next frame); with the PyTorch check, does it here, in order with the check."""
        out = self.out
        out.decoded += 1
        if self.reference is None:
            self.worker.submit(partial(self._post, out, result))
            return 0.0
        labels = self._post(out, result)
        return self._check(out, result, labels is not None)

    def _post(self, out: SourceOutput, result: FrameResult) -> np.ndarray | None:
        """Row, masks and overlay of one frame (in frame order: stability needs the previous
        one); returns its label map (None for classification)."""
        source, cfg, spec = out.source, self.cfg, self.spec
        pred, frame = result.prediction, result.frame
        h, w = frame.shape[:2]
        row = {
            "source": source.name,
            "frame": result.index,
            "time_s": None if result.time_s is None else round(result.time_s, 4),
            "height": h,
            "width": w,
        }
        labels = None
        if spec.task_type == "seg":
            labels = label_map(upsample(pred.probs, h, w), cfg.threshold)
            row.update(area_fields(self.names, labels, source.geometry))
        row.update(prob_fields(spec, self.names, pred.probs))
        row["model_ms"] = round(result.timings_ms["model"], 3)
        if spec.task_type == "seg":
            row["dice_prev"] = self._stability(out, pred)
        if cfg.masks and labels is not None:
            name = f"{source.name}.png" if source.still else f"{source.name}/{result.index:05d}.png"
            binary = len(pred.probs) == 1
            save_png(self.folder / "masks" / name, labels, binary, durable=False)
            out.masks += 1
        if cfg.overlays:
            text = "" if labels is not None else f"{row['predicted']} {pred.probs.max():.2f}"
            out.write_overlay(overlay(frame, labels, cfg.opacity, text))
        self.rows.append(row)
        out.rows += 1
        return labels

    def _stability(self, out: SourceOutput, pred) -> float | None:
        """Dice of this frame's mask with the previous one (model resolution), with and
        without smoothing; returns the one of the masks written."""
        raw = label_map(pred.raw, self.cfg.threshold)
        smooth = label_map(pred.probs, self.cfg.threshold) if self.cfg.smoothing else raw
        value = None
        if out.prev_raw is not None:
            out.stability["raw"].append(dice_pair(out.prev_raw, raw))
            out.stability["smoothed"].append(dice_pair(out.prev_smooth, smooth))
            value = round(out.stability["smoothed"][-1], 5)
        out.prev_raw, out.prev_smooth = raw, smooth
        return value

    def _check(self, out: SourceOutput, result: FrameResult, seg: bool) -> float:
        """Agreement with PyTorch on this frame; returns the seconds it took (not pipeline)."""
        t0 = time.perf_counter()
        ref = self.reference(result.x)
        h, w = result.frame.shape[:2]
        if seg:
            mine = label_map(upsample(result.prediction.raw, h, w), self.cfg.threshold) > 0
            theirs = label_map(upsample(ref.raw, h, w), self.cfg.threshold) > 0
            value = dice_pair(mine, theirs)
            self.overlap[0] += 2 * int(np.count_nonzero(mine & theirs))
            self.overlap[1] += int(np.count_nonzero(mine)) + int(np.count_nonzero(theirs))
            self.rows[-1]["area_px_torch"] = int(np.count_nonzero(theirs))
        else:
            value = float(result.prediction.raw.argmax() == ref.raw.argmax())
        out.agreement.append(value)
        self.rows[-1]["agree_torch"] = round(value, 5)
        return time.perf_counter() - t0

    def end(self, status: str) -> dict:
        """Close the source's files (a source that failed midway keeps what was decoded) and
        check that its frames decoded, rows, masks, overlay frames and the header agree: a
        source whose counts differ has failed."""
        out = self.out
        self.worker.submit(out.finish)  # after the source's last frame job
        self.worker.drain()
        counts, wrong = out.counts(self.cfg, self.spec.task_type == "seg")
        if wrong and status == "ok":
            status = f"failed: {counts['decoded']} frames decoded but {', '.join(wrong)}"
            log.warning("%s: %s", out.source.path, status)
        s, g = out.source, out.source.geometry
        entry = {
            "name": s.name,
            "file": str(s.path),
            "kind": s.kind,
            "frames": out.rows,
            "counts": counts,
            "status": status,
            "spacing_mm": list(g.spacing_mm) if g.spacing_mm else None,
            "spacing_from": g.spacing_from,
            "frame_interval_s": g.interval_s,
        }
        if out.stability["raw"]:
            entry["stability_raw"] = float(np.mean(out.stability["raw"]))
            entry["stability_smoothed"] = float(np.mean(out.stability["smoothed"]))
        if out.agreement:
            entry["agree_torch_mean"] = float(np.mean(out.agreement))
            entry["agree_torch_min"] = float(np.min(out.agreement))
        return entry


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    """fsync the staged masks and overlays (written without, `durable=False`), then move them
    into `out`, after removing an earlier run's files (`--overwrite`) and nothing else: a run
    that fails keeps the earlier one."""
    sync_files(p for p in stage.rglob("*") if p.is_file())
    if overwrite:
        remove_owned(out, PREDICT.owned)
    for part in stage.iterdir():
        os.replace(part, out / part.name)


# --- the command ---------------------------------------------------------------------------------


def predict(cfg: PredictConfig) -> dict:
    """Run the model over every source; returns the summary (also in out/summary.json)."""
    check_options(cfg)
    folder: ModelFolder = open_model_folder(cfg.model)
    named = backend_of_file(cfg.model) if Path(cfg.model).is_file() else None
    cfg.backend = cfg.backend or named or default_backend(folder)  # resolved: config.yaml says
    size = cfg.image_size or folder.image_size
    if not size:
        raise UserError(f"{cfg.model}: the model does not say its input size: give --image_size")
    if cfg.check_torch and "torch" not in folder.files:
        raise UserError(f"--check_torch: {cfg.model} has no PyTorch head to compare with")
    sources, skipped = list_sources(cfg)
    if not sources:
        raise UserError("no readable input")
    threads = cfg.threads or default_threads()  # one count for every runtime
    cv2.setNumThreads(1)  # per-frame image work is small: a pool would contend with the model
    runner = open_runner(folder, cfg.backend, threads)
    predictor = FramePredictor(runner, folder.spec, size, cfg.smoothing)
    names = class_names(folder.spec, warm_up(runner, size).shape[1])
    reference = None
    if cfg.check_torch:
        reference = FramePredictor(open_runner(folder, "torch", threads), folder.spec, size)

    run = RunDir(cfg.out, PREDICT, overwrite=cfg.overwrite)
    with run.claim():
        out, stage = run.path, run / PREDICT.staging
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            summary = _run(cfg, folder, size, names, predictor, reference, sources, skipped, stage)
            summary["environment"] = environment(threads)
            t0 = time.perf_counter()
            _publish(stage, out, cfg.overwrite)
            save_config(cfg, out / "config.yaml")
            write_csv(out / "predictions.csv", pd.DataFrame(summary.pop("_rows")))
            write_text(out / "summary.md", summary_markdown(summary))
            summary["finalize_s"] = round(time.perf_counter() - t0, 3)
            write_json(out / "summary.json", summary, default=str)  # last: the run is complete
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return summary


def _run(cfg, folder, size, names, predictor, reference, sources, skipped, stage) -> dict:
    sink = FileSink(stage, cfg, folder.spec, names, reference)
    try:
        stats, entries = _stream_sources(cfg, sources, predictor, sink)
    finally:
        sink.close()
    summary = {
        "model": str(folder.path),
        "backend": cfg.backend,
        "backend_label": BACKENDS.get(cfg.backend).label,
        "task_type": folder.spec.task_type,
        "classes": names,
        "image_size": size,
        "threshold": cfg.threshold,
        "smoothing": cfg.smoothing,
        "timing": stats.summary() | {"warmup_runs": WARMUP_RUNS},
        "sources": entries,
        "skipped": skipped,
        "failed": [e["name"] for e in entries if e["status"] != "ok"],
    }
    clips = [e for e in entries if "stability_raw" in e]  # sources with consecutive frames
    if clips:
        weights = [e["frames"] - 1 for e in clips]  # each source's frame pairs

        def pooled(key: str) -> float:
            return float(np.average([e[key] for e in clips], weights=weights))

        summary["stability"] = {
            "frame_pairs": int(sum(weights)),
            "raw": pooled("stability_raw"),
            "smoothed": pooled("stability_smoothed") if cfg.smoothing else None,
        }
    if reference is not None:
        values = [r["agree_torch"] for r in sink.rows if "agree_torch" in r]
        summary["agreement_with_torch"] = {
            "metric": "mask Dice" if folder.spec.task_type == "seg" else "same class",
            "frames": len(values),
            "mean": float(np.mean(values)) if values else None,
            "min": float(np.min(values)) if values else None,
        }
        if folder.spec.task_type == "seg":  # one Dice over all pixels: tiny masks weigh little
            both = sink.overlap
            summary["agreement_with_torch"]["pooled"] = both[0] / both[1] if both[1] else 1.0
    summary["_rows"] = sink.rows
    return summary


def _stream_sources(cfg: PredictConfig, sources: list[Source], predictor, sink: FileSink):
    """Every source through the pipeline, with a progress bar; a source that stops decoding
    (a cut file among them) keeps its frames so far and is marked failed, as is one whose
    counts differ (`FileSink.end`)."""
    stats = StreamStats()
    entries = []
    limit = cfg.max_frames or 10**9
    total = sum(min(s.count, limit) for s in sources) or None
    with progress_bar(disable=not cfg.progress) as bar:
        task = bar.add_task("predict", total=total, info="")
        start = time.perf_counter()

        def shown(result: FrameResult) -> None:
            fps = stats.frames / max(1e-9, time.perf_counter() - start - stats.excluded_s)
            bar.update(task, advance=1, info=f"{fps:.1f} frames/s")

        for source in sources:
            bar.update(task, description=f"predict {source.name}"[:60])
            sink.begin(source)
            status = "ok"
            try:
                frames = read_frames(source.path, source.kind, cfg.layout, cfg.axis)
                frames = first_frames(frames, cfg.max_frames)
                stream(frames, predictor, source.geometry, sink, stats, shown)
            except ReadError as exc:  # a cut file too (TruncatedFile): the counts say where
                why = exc.what if isinstance(exc, TruncatedFile) else str(exc)
                status = f"failed: {why}"
                log.warning("%s: %s", source.path, why)
            entries.append(sink.end(status))
    return stats, entries


def summary_markdown(s: dict) -> str:
    t = s["timing"]
    stages = [{"stage": k, "ms / frame": t["ms_per_frame"][k]} for k in STAGES]
    stages.append({"stage": "end to end (wall)", "ms / frame": t["wall_ms_per_frame"]})
    n = len(s["sources"])
    lines = [
        f"# Predictions of {s['model']}",
        "",
        f"{s['backend_label']} ({s['backend']}), {s['task_type']} head, "
        f"input {s['image_size']} px, "
        f"{s['environment']['threads']} threads on {s['environment']['cpu']}; "
        f"{t['frames']} frames from {n} source{'s' if n != 1 else ''}; "
        f"threshold {s['threshold']}, "
        f"smoothing {s['smoothing']}.",
        "",
        markdown_table(stages, floatfmt=".2f"),
        "",
    ]
    if t["frames"]:
        lines += [
            f"End to end: **{t['fps_end_to_end']:.1f} frames/s** (the model's own time alone "
            f"would give {t['fps_model_only']:.1f}); the wall time outside the model is "
            f"{t['outside_model_vs_model']:.1%} of the model's time. Decoding and writing run "
            "in their own threads, overlapping the model: their times are those threads' CPU "
            "time."
        ]
    else:
        lines += ["No frame was decoded: see each source's status below."]
    if "stability" in s:
        st = s["stability"]
        text = f"Frame-to-frame stability (Dice of consecutive masks, {st['frame_pairs']} pairs): "
        text += f"{st['raw']:.4f} without smoothing"
        if st["smoothed"] is not None:
            text += f", {st['smoothed']:.4f} with smoothing {s['smoothing']}"
        lines += ["", text + "."]
    if s.get("agreement_with_torch", {}).get("frames"):
        a = s["agreement_with_torch"]
        pooled = f", pooled over all pixels {a['pooled']:.4f}" if "pooled" in a else ""
        text = f"Agreement with PyTorch ({a['metric']} per frame, {a['frames']} frames, before "
        text += f"smoothing): mean {a['mean']:.4f}, min {a['min']:.4f}{pooled}."
        lines += ["", text]
    sources = [
        {
            "source": e["name"],
            "kind": e["kind"],
            "frames": e["frames"],
            "declared": e["counts"]["declared"] or "",
            "pixel spacing (mm)": " x ".join(f"{v:.4g}" for v in e["spacing_mm"])
            if e["spacing_mm"]
            else f"none ({e['spacing_from']})",
            "frame interval (s)": f"{e['frame_interval_s']:.4g}" if e["frame_interval_s"] else "",
            "status": e["status"],
        }
        for e in s["sources"]
    ]
    lines += ["", markdown_table(sources)]
    lines += [f"\nSkipped {item['file']}: {item['reason']}" for item in s["skipped"]]
    return "\n".join(lines) + "\n"
