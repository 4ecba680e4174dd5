"""The per-frame point-of-care pipeline shared by `sonodistill predict` and `sonodistill app`.

decode (the corpus readers) -> preprocess (grey, resize to the model's square input, [0, 1])
-> model (any runtime of `deploy.runtimes`) -> probabilities (+ optional temporal smoothing)
-> post-processing (upsampling to the frame, threshold, areas, overlay; the caller's sink).
`stream` runs it over sources and times each stage per frame.

Probabilities: a segmentation head with one logit (binary) gives sigmoid(logit); with C logits,
softmax over classes. The *foreground* probability is 1 - p(background); a pixel is foreground
when it reaches the threshold, and its class is the most probable foreground class. A
classification head gives softmax over its classes. Temporal smoothing is an exponential moving
average of these probabilities along a clip, restarted for each source:
p'_t = (1 - s) p_t + s p'_{t-1}. Frame-to-frame stability is the Dice between consecutive masks
(at the model's resolution; both empty = 1, the project's rule).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sonodistill.data.frames import to_grey
from sonodistill.data.geometry import Geometry
from sonodistill.data.greys import resize_square
from sonodistill.io import atomic_path, write_bytes
from sonodistill.utils.fields import RightOpenUnitInterval, check

if TYPE_CHECKING:
    from sonodistill.evaluate.head_checkpoint import HeadSpec

STAGES = ("decode", "preprocess", "model", "postprocess")
# Overlay colours per foreground class (RGB), chosen to stand out on grey B-mode images.
PALETTE = np.array(
    [[0, 0, 0], [255, 196, 0], [0, 200, 255], [255, 64, 160], [120, 255, 80], [180, 120, 255]],
    dtype=np.uint8,
)


def class_names(spec: HeadSpec, n_outputs: int) -> list[str]:
    """Names of the model's classes (background first for segmentation)."""
    if spec.task_type == "seg":
        n = max(2, n_outputs)
        default = ["background", "foreground"] if n == 2 else [f"class{i}" for i in range(n)]
    else:
        n, default = n_outputs, [f"class{i}" for i in range(n_outputs)]
    names = list(spec.class_names) if len(spec.class_names) == n else default
    return [str(c) for c in names]


@dataclass
class Prediction:
    """What the model says about one frame, at the model's resolution."""

    probs: np.ndarray
    """Segmentation: (C, S, S) class probabilities (C = 1 for a binary head: foreground);
    classification: (K,). Smoothed when smoothing is on."""
    raw: np.ndarray
    """The same before temporal smoothing."""


class FramePredictor:
    """Preprocessing, the model and the probabilities for one source at a time (`reset`)."""

    def __init__(
        self,
        runner: Callable[[np.ndarray], np.ndarray],
        spec: HeadSpec,
        image_size: int,
        smoothing: float = 0.0,
    ):
        smoothing = check(RightOpenUnitInterval, smoothing, "smoothing")  # --smoothing's rule
        self.runner, self.spec, self.size, self.smoothing = runner, spec, image_size, smoothing
        self.state: np.ndarray | None = None

    def reset(self) -> None:
        self.state = None

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """(1, 1, S, S) float32 in [0, 1]: grey and resized by the project's one image path
        (`data.greys`, as distill, evaluate and export), so the model sees what it was
        trained on."""
        grey = resize_square(to_grey(frame), self.size)
        return (grey.astype(np.float32) * (1.0 / 255.0))[None, None]

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(outputs[0], dtype=np.float32)
        if self.spec.task_type == "seg" and out.shape[0] == 1:
            return (1.0 / (1.0 + cv2.exp(-out[0])))[None]  # cv2.exp: SIMD, ~5x numpy's
        shifted = np.exp(out - out.max(axis=0, keepdims=True))
        return shifted / shifted.sum(axis=0, keepdims=True)

    def smooth(self, probs: np.ndarray) -> np.ndarray:
        if self.smoothing and self.state is not None:
            probs = (1.0 - self.smoothing) * probs + self.smoothing * self.state
        self.state = probs
        return probs

    def __call__(self, x: np.ndarray) -> Prediction:
        """Prediction of a preprocessed frame."""
        raw = self.probabilities(self.runner(x))
        return Prediction(self.smooth(raw), raw)


# --- post-processing -----------------------------------------------------------------------------


def upsample(probs: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, S, S) probabilities -> (C, H, W) (bilinear)."""
    if probs.shape[-2:] == (height, width):
        return probs
    stacked = np.ascontiguousarray(np.moveaxis(probs, 0, -1))
    up = cv2.resize(stacked, (width, height), interpolation=cv2.INTER_LINEAR)
    return up[None] if up.ndim == 2 else np.moveaxis(up, -1, 0)


def label_map(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(C, H, W) probabilities -> uint8 labels: 0 background, k the k-th foreground class."""
    if len(probs) == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    fg = 1.0 - probs[0]
    labels = (probs[1:].argmax(axis=0) + 1).astype(np.uint8)
    labels[fg < threshold] = 0
    return labels


def dice_pair(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground of two label maps (both empty = 1)."""
    fa, fb = a > 0, b > 0
    total = int(np.count_nonzero(fa)) + int(np.count_nonzero(fb))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(fa & fb)) / total


DEFAULT_FPS = 10.0  # overlay videos of files without a frame rate (volumes, image stacks)


def video_fps(geometry: Geometry) -> float:
    """Frame rate of an overlay video: the file's, else `DEFAULT_FPS`."""
    return 1.0 / geometry.interval_s if geometry.interval_s else DEFAULT_FPS


def overlay(
    frame: np.ndarray, labels: np.ndarray | None, opacity: float, text: str = ""
) -> np.ndarray:
    """RGB frame with the mask tinted in (per-class colour, `opacity`) and outlined; `text`
    (classification) written in the top-left corner."""
    base = frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    out = base.copy()
    if labels is not None and labels.any():
        classes = (1,) if labels.max() == 1 else [int(k) for k in np.unique(labels) if k]
        for k in classes:
            mask = labels if len(classes) == 1 and k == 1 else (labels == k).view(np.uint8)
            colour = tuple(int(c) for c in PALETTE[min(k, len(PALETTE) - 1)])
            x, y, w, h = cv2.boundingRect(mask)  # blend only where the mask is
            roi = (slice(y, y + h), slice(x, x + w))
            tint = np.empty((h, w, 3), np.uint8)
            tint[:] = colour
            blended = cv2.addWeighted(base[roi], 1.0 - opacity, tint, opacity, 0.0)
            out[roi] = cv2.copyTo(blended, mask[roi], out[roi])
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, colour, 1, cv2.LINE_AA)
    if text:
        scale = max(0.4, min(out.shape[:2]) / 500)
        cv2.putText(
            out,
            text,
            (6, int(22 * scale) + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 196, 0),
            max(1, int(2 * scale)),
            cv2.LINE_AA,
        )
    return out


def area_fields(names: list[str], labels: np.ndarray, geometry: Geometry) -> dict:
    """Mask area in pixels and mm^2 (None without a pixel spacing), per class when there are
    several foreground classes."""
    pixel_mm2 = geometry.pixel_area_mm2
    area = int(cv2.countNonZero(labels))
    row = {"area_px": area, "area_mm2": round(area * pixel_mm2, 3) if pixel_mm2 else None}
    if len(names) > 2:
        for k, name in enumerate(names[1:], start=1):
            n = int(np.count_nonzero(labels == k))
            row[f"area_px_{name}"] = n
            row[f"area_mm2_{name}"] = round(n * pixel_mm2, 3) if pixel_mm2 else None
    return row


def prob_fields(spec: HeadSpec, names: list[str], probs: np.ndarray) -> dict:
    """Class probabilities of a frame. Segmentation: each foreground class's peak pixel
    probability (`p_CLASS`: how sure the model is that it is in the frame); classification:
    the predicted class and every class's probability."""
    if spec.task_type != "seg":
        row = {"predicted": names[int(probs.argmax())]}
        row.update({f"p_{n}": round(float(p), 5) for n, p in zip(names, probs, strict=True)})
        return row
    peaks = probs.reshape(len(probs), -1).max(axis=1)
    peaks = peaks if len(probs) == 1 else peaks[1:]
    return {f"p_{n}": round(float(p), 5) for n, p in zip(names[1:], peaks, strict=True)}


# --- video output --------------------------------------------------------------------------------


class VideoWriter:
    """H.264 MP4 (PyAV/libx264, yuv420p, plays in browsers); odd sizes are padded by a pixel.
    `target`: a file object, or a path written atomically (a temporary file beside it, renamed
    over it by `close`; `abort` removes it). `durable=False`: no fsync (the caller syncs)."""

    def __init__(self, target, fps: float, width: int, height: int, durable: bool = True):
        import av

        self.files = contextlib.ExitStack()
        if isinstance(target, str | Path):
            target = str(self.files.enter_context(atomic_path(target, durable)))
        self.container = av.open(target, mode="w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        rate = max(1, round(fps * 1000))
        self.stream = self.container.add_stream(codec, rate=Fraction(rate, 1000))
        self.width, self.height = width + width % 2, height + height % 2
        self.stream.width, self.stream.height = self.width, self.height
        self.stream.pix_fmt = "yuv420p"
        # ultrafast, one thread: ~1 ms a 350 x 350 frame here, not competing with the model.
        self.stream.codec_context.thread_count = 1
        if codec == "libx264":
            self.stream.options = {"preset": "ultrafast", "crf": "20"}

    def write(self, rgb: np.ndarray) -> None:
        import av

        h, w = rgb.shape[:2]
        if (h, w) != (self.height, self.width):
            rgb = cv2.copyMakeBorder(
                rgb, 0, self.height - h, 0, self.width - w, cv2.BORDER_REPLICATE
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
        except BaseException:
            self.abort()
            raise
        self.files.close()  # the temporary file becomes the target

    def abort(self) -> None:
        """Drop the video (an error midway): nothing is left behind at the target."""
        with contextlib.suppress(Exception):
            self.container.close()
        self.files.__exit__(RuntimeError, RuntimeError("video aborted"), None)


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class FrameResult:
    """One processed frame handed to a sink (its post-processing is timed as `postprocess`)."""

    index: int
    time_s: float | None
    frame: np.ndarray
    prediction: Prediction
    x: np.ndarray
    """The preprocessed model input (reference runs, e.g. PyTorch beside int8)."""
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class StreamStats:
    """Seconds per stage summed over frames, frame count and the pipeline's wall time.
    Decoding and writing run in their own threads, overlapping the model: their seconds are
    those threads' CPU time; preprocess, model and the main thread's post-processing are wall
    time."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    frames: int = 0
    wall_s: float = 0.0
    excluded_s: float = 0.0
    """Time spent on work that is not part of the pipeline (reference checks, progress)."""

    def summary(self) -> dict:
        n = max(1, self.frames)
        wall = max(1e-9, self.wall_s - self.excluded_s)
        model = self.seconds["model"]
        return {
            "frames": self.frames,
            "ms_per_frame": {k: round(v / n * 1000, 3) for k, v in self.seconds.items()},
            "wall_ms_per_frame": round(wall / n * 1000, 3),
            "wall_s": round(wall, 3),
            "fps_end_to_end": round(self.frames / wall, 2),
            "fps_model_only": round(self.frames / model, 2) if model else None,
            "outside_model_vs_model": round((wall - model) / model, 4) if model else None,
        }


_END = object()


def first_frames(
    frames: Iterator[tuple[int, np.ndarray]], limit: int | None
) -> Iterator[tuple[int, np.ndarray]]:
    """The frames of index below `limit` (None: all); the reader is closed on the way out,
    without decoding a frame past the limit (a file cut after it is not asked for more)."""
    try:
        for index, frame in frames:
            if limit is not None and index >= limit:
                return
            yield index, frame
            if limit is not None and index + 1 >= limit:
                return
    finally:
        close = getattr(frames, "close", None)
        if close:
            close()


def yield_to_the_model(niceness: int = 10) -> None:
    """Lower the calling thread's scheduling priority (Linux: per thread), so that decoding and
    writing take the cores when the model's threads leave them, instead of slowing the model;
    the queues absorb the delay."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch:
    """Iterates `frames` in a thread, `depth` frames ahead, and applies `prepare` to each
    there, so that decoding and preprocessing overlap the model; yields (index, frame,
    prepared, decode seconds, prepare seconds). Errors surface in the consumer."""

    def __init__(
        self,
        frames: Iterator[tuple[int, np.ndarray]],
        prepare: Callable[[np.ndarray], np.ndarray],
        depth: int = 4,
    ):
        self.prepare = prepare
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(frames,), daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, frames) -> None:
        yield_to_the_model()
        iterator = iter(frames)
        try:
            while True:
                t0 = time.thread_time()  # CPU time: what decoding costs, waits excluded
                try:
                    index, frame = next(iterator)
                except StopIteration:
                    break
                t1 = time.thread_time()
                x = self.prepare(frame)
                item = (index, frame, x, t1 - t0, time.thread_time() - t1)
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failed(exc))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close:
                close()
        self._put(_END)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        self.thread.join()


class Worker:
    """One background thread running submitted jobs in order (writing files, encoding video);
    `busy_s` is its CPU time; a job's error is raised at the next submit or `drain`."""

    def __init__(self, depth: int = 8):
        self.queue: queue.Queue = queue.Queue(depth)
        self.busy_s = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        yield_to_the_model()
        while True:
            job = self.queue.get()
            if job is _END:
                return
            t0 = time.thread_time()  # CPU time: what the job costs, waits excluded
            try:
                if self.error is None:
                    job()
            except BaseException as exc:
                self.error = exc
            finally:
                self.busy_s += time.thread_time() - t0
                self.queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, job: Callable[[], object]) -> None:
        self._raise()
        self.queue.put(job)

    def drain(self) -> None:
        self.queue.join()
        self._raise()

    def close(self) -> None:
        self.queue.put(_END)
        self.thread.join()


def stream(
    frames: Iterator[tuple[int, np.ndarray]],
    predictor: FramePredictor,
    geometry: Geometry,
    sink: Callable[[FrameResult], float | None],
    stats: StreamStats,
    on_frame: Callable[[FrameResult], None] | None = None,
) -> None:
    """Run one source through the pipeline: decoding and preprocessing in a `Prefetch` thread,
    the model here, then `sink(result)` (which may return seconds spent on work to exclude
    from the timings, and may hand work to a background thread: its `drain()` is waited for
    and its `background_s` counted as post-processing); counts go to `stats`."""
    predictor.reset()
    clock = time.perf_counter
    start = clock()
    background = getattr(sink, "background_s", 0.0)
    reader = Prefetch(frames, predictor.preprocess)
    try:
        for index, frame, x, decode_s, preprocess_s in reader:
            t2 = clock()
            prediction = predictor(x)
            t3 = clock()
            result = FrameResult(index, geometry.time_of(index), frame, prediction, x)
            result.timings_ms = {
                "decode": decode_s * 1000,
                "preprocess": preprocess_s * 1000,
                "model": (t3 - t2) * 1000,
            }
            excluded = sink(result) or 0.0
            t4 = clock()
            result.timings_ms["postprocess"] = (t4 - t3 - excluded) * 1000
            for stage in STAGES:
                stats.seconds[stage] += result.timings_ms[stage] / 1000
            stats.excluded_s += excluded
            stats.frames += 1
            if on_frame:
                on_frame(result)
            stats.excluded_s += clock() - t4  # progress display is not part of the pipeline
        if hasattr(sink, "drain"):
            sink.drain()
    finally:
        reader.close()
        stats.wall_s += clock() - start
        stats.seconds["postprocess"] += getattr(sink, "background_s", 0.0) - background


WARMUP_RUNS = 3


def warm_up(
    runner: Callable[[np.ndarray], np.ndarray], size: int, runs: int = WARMUP_RUNS
) -> np.ndarray:
    """First calls allocate (ONNX Runtime, ExecuTorch, oneDNN): keep them out of the timings.
    Returns the model's outputs for a blank frame (their shape tells the classes)."""
    x = np.zeros((1, 1, size, size), np.float32)
    for _ in range(runs):
        outputs = runner(x)
    return outputs


def save_png(path: Path, image: np.ndarray, binary: bool = False, durable: bool = True) -> Path:
    """A grey or RGB image as PNG, fast (frames are written as they stream), atomically
    (`durable=False`: without fsync, for batches the caller syncs with `io.sync_files`);
    `binary`: a 1-bit PNG of image > 0 (reads back as 0/255 grey, 4x faster than 8-bit)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_BILEVEL, 1] if binary else []
    ok, data = cv2.imencode(".png", image, [*params, cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    return write_bytes(path, data.tobytes(), durable)
