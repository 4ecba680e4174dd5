"""The options of `sonodistill export`, `bench`, `predict` and `app`, and their run folders.

Light (the standard library, jsonargparse and the registries' light modules), so that each
command's `--help` answers without importing torch. Every field's type carries its check
(`sonodistill.utils.fields`, backend names from `deploy.runtimes.BACKENDS`); the hand-written checks
left in the commands are the cross-field ones. Old option names (docs/glossary.md) are accepted
with a deprecation line until 0.3: `export --head` (now `--model`), `--int8` and `--executorch`
(now `--backends`), bench `--gpu` (`--device`), `--student_head` (`--student_projection`),
`--teacher_head_classes` (`--teacher_classes`) and the backend id `torch_fp32` (`torch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from sonodistill.config import Renamed, Replaced
from sonodistill.deploy.runtimes import BACKENDS, HEAD_DIR, BackendName
from sonodistill.models.specs import DEFAULT_STUDENT
from sonodistill.utils.fields import (
    Axis3D,
    ClosedUnitInterval,
    ImageSize,
    NonNegativeInt,
    OpenUnitInterval,
    Opset,
    Port,
    PositiveFloat,
    PositiveInt,
    RightOpenUnitInterval,
)
from sonodistill.utils.rundir import Layout

OPACITY = 0.45
"""Of the mask colour in overlays, unless the user picks another."""
EXPORT_BACKENDS = ["ort_fp32", "ort_int8"]
BENCH_BACKENDS = ["torch", "torch_bf16", "ort_fp32", "ort_int8"]


# --- export ------------------------------------------------------------------------------------


def _int8(value, values: dict) -> dict:
    """`--int8 true|false` (before 0.2): ort_int8 in --backends or not."""
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    backends = [b for b in values.get("backends", EXPORT_BACKENDS) if b != "ort_int8"]
    return {**values, "backends": backends + ["ort_int8"] * value}


def _executorch(value, values: dict) -> dict:
    """`--executorch [fp32,int8]` (before 0.2): executorch_fp32/_int8 added to --backends."""
    if not isinstance(value, list) or not set(value) <= {"fp32", "int8"}:
        raise ValueError("expected a list of fp32, int8")
    backends = list(values.get("backends", EXPORT_BACKENDS))
    backends += [f"executorch_{p}" for p in value if f"executorch_{p}" not in backends]
    return {**values, "backends": backends}


@dataclass
class ExportConfig:
    """Export an encoder or a fine-tuned model to every runtime asked (ONNX fp32 and int8 by
    default, ExecuTorch on request), each checked against PyTorch on real frames."""

    encoder: str = ""
    """Encoder spec of a backbone to export, e.g. student:RUN_DIR or timm:resnet50=W.safetensors
    (or give --model)."""
    model: str | None = None
    """A model folder to export instead (a head checkpoint: head.yaml + model.safetensors, from
    evaluate --save_models); the export folder then serves predict and app in every backend."""
    frames: list[str] = field(default_factory=list)
    """Real frames for calibration and checks: `NAME=PATH` sources as in `sonodistill embed`."""
    out: str = "runs/export"
    """Output folder; an export already there needs --overwrite."""
    backends: list[BackendName] = field(default_factory=lambda: list(EXPORT_BACKENDS))
    """Runtimes to write (registry order), each checked against PyTorch: ort_fp32, ort_int8,
    executorch_fp32, executorch_int8 (ExecuTorch XNNPACK, on-device) or a plugin's."""
    image_size: ImageSize = 224
    """Side of the square input the graphs take, in pixels."""
    opset: Opset = 18
    """ONNX opset of the graphs."""
    exporter: Literal["legacy", "dynamo"] = "legacy"
    """torch.onnx exporter: legacy (TorchScript, robust for CNNs and timm ViTs) or dynamo."""
    per_channel: bool = True
    """int8 ONNX: per-channel weight scales (else per tensor)."""
    calib_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    """int8 ONNX: how activation ranges are calibrated."""
    n_calib: PositiveInt = 32
    """Calibration frames for int8 backends (disjoint from the check frames)."""
    n_check: PositiveInt = 16
    """Frames each written model is compared with PyTorch on."""
    test_set: str | None = None
    """Model only: a labelled folder (segmentation: images with masks, BUSI or image/+mask/
    layout; classification: one subfolder per class name) for the metric change."""
    n_test: PositiveInt = 64
    """At most this many images of --test_set."""
    tolerance: PositiveFloat = 1e-3
    """Maximum abs difference allowed between an fp32 backend and PyTorch (exit code 1 above)."""
    threads: PositiveInt | None = None
    """CPU threads of PyTorch and the runtimes (default: PyTorch's)."""
    seed: NonNegativeInt = 0
    """Seed of the frame sampling."""
    overwrite: bool = False
    """Replace an export already in --out (its models, report and config)."""

    deprecated: ClassVar = (
        Renamed("head", "model"),
        Replaced("int8", "backends", _int8),
        Replaced("executorch", "backends", _executorch),
    )


def export_layout() -> Layout:
    """An export folder: config, report and every registered backend's file (plugins' too)."""
    files = dict.fromkeys(e.obj.file for e in BACKENDS.list() if not e.obj.runs_the_model)
    return Layout("export", owned=("config.yaml", *files, HEAD_DIR, "report.json", "report.md"))


# --- bench -------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Teacher vs student deployment cost (paper Table 5), measured side by side in one run."""

    teacher: str | dict = "teacher:random@ViT-B/16 (DINOv3)"
    """Encoder spec of any family (string or EncoderSpec mapping); weights do not change the
    cost, so a random init is the default."""
    student: str = f"random:{DEFAULT_STUDENT}@{DEFAULT_STUDENT} student"
    """Encoder spec of the student (student:RUN_DIR for a distilled one)."""
    teacher_n_blocks: PositiveInt = 2
    """Distillation target = this many teacher blocks: width of the student's projection."""
    student_projection: Literal["linear", "mlp"] = "linear"
    """The student's projection head g_phi counted in "backbone + head" parameters."""
    teacher_classes: PositiveInt = 3
    """Outputs of the teacher's linear classifier on the CLS token (its "head" parameters)."""
    image_size: ImageSize = 224
    """Side of the square input in pixels."""
    warmup: NonNegativeInt = 5
    """Untimed runs per model and backend before timing."""
    runs: PositiveInt = 50
    """Timed batch-1 runs per model and backend."""
    block: PositiveInt = 5
    """Timed runs in a row per model and backend (after an untimed one); blocks take turns."""
    threads: PositiveInt | None = None
    """CPU threads for PyTorch and the runtimes (default: PyTorch's current count)."""
    backends: list[BackendName] = field(default_factory=lambda: list(BENCH_BACKENDS))
    """Runtimes to time: torch, torch_bf16 (where the CPU has native bf16), ort_fp32, ort_int8,
    executorch_fp32, executorch_int8 (on-device) or a plugin's."""
    ondevice_teacher: bool = False
    """ExecuTorch backends for the teacher too: DINOv3's int8 graph does not lower to XNNPACK
    (ExecuTorch 1.5 leaves per-channel dequantisation outside the delegate and has no portable
    kernel for it), and finding out costs a minute; the on-device model is the student."""
    calib_frames: list[str] = field(default_factory=list)
    """Real frames for int8 calibration (`NAME=PATH` as in `embed`); none: random noise."""
    n_calib: PositiveInt = 8
    """Calibration frames for int8 backends."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the GPU rows come from: cuda (required), auto (when there is one) or cpu (none);
    the CPU rows are always measured."""
    gpu_runs: PositiveInt = 100
    """Timed runs on the GPU."""
    exporter: Literal["legacy", "dynamo"] = "legacy"
    """torch.onnx exporter of the ONNX backends."""
    students: list[str | dict] = field(default_factory=list)
    """Candidate students to choose from for the device, instead of teacher vs student: timm
    names (resnet18, mobilenetv3_large_100, ...: random weights, the architecture's latency),
    encoder specs, or distilled runs (student:RUN, which add their validation loss/cosine).
    Writes students.{md,csv,json} and pareto.png."""
    budget_ms: PositiveFloat | None = None
    """Latency budget (ms, batch 1): the students table marks the backends each candidate
    fits on."""
    scores: str | None = None
    """An evaluate suite's output folder: each candidate's downstream score (by its label)."""
    score_metric: str = "dice"
    """The test metric of --scores that is the candidates' quality (dice, auroc, ...)."""
    out: str = "runs/bench"
    """Output folder (table5.md/csv/json, or students.md/csv/json and pareto.png; config.yaml)."""
    overwrite: bool = False
    """Replace a benchmark already in --out."""

    deprecated: ClassVar = (
        Renamed("student_head", "student_projection"),
        Renamed("teacher_head_classes", "teacher_classes"),
        Renamed("gpu", "device", values={"on": "cuda", "off": "cpu"}),
    )


BENCH = Layout(
    "bench",
    owned=(
        "config.yaml",
        "table5.md",
        "table5.csv",
        "table5.json",
        "students.md",
        "students.csv",
        "students.json",
        "pareto.png",
    ),
)


# --- predict -----------------------------------------------------------------------------------


@dataclass
class PredictConfig:
    """Run a fine-tuned model over images, videos, DICOM cines and 2D+t volumes."""

    inputs: list[str] = field(default_factory=list)
    """Files or folders (searched recursively; masks such as `*_mask.png` are skipped)."""
    model: str = ""
    """A model folder (head checkpoint from evaluate --save_models, or an export folder from
    export --model) or one of an export's files (model_int8.onnx)."""
    backend: BackendName | None = None
    """torch | torch_bf16 | ort_fp32 | ort_int8 | executorch_fp32 | executorch_int8 (default:
    that of the file named, else PyTorch when the folder has the model itself)."""
    out: str = "runs/predict"
    """Output folder (predictions.csv, masks, overlays, summary); a run there needs --overwrite."""
    image_size: ImageSize | None = None
    """Model input side; default: the model's own (head.yaml, or the exported graph)."""
    threshold: OpenUnitInterval = 0.5
    """Foreground probability at which a pixel belongs to the mask."""
    opacity: ClosedUnitInterval = OPACITY
    """Of the mask colour in overlays."""
    smoothing: RightOpenUnitInterval = 0.0
    """Temporal EMA along a clip, p'_t = (1 - s) p_t + s p'_{t-1}; 0 = off (e.g. 0.5)."""
    check_torch: bool = False
    """Also run the PyTorch model on every frame and report the Dice between its masks and the
    backend's (before smoothing); the extra time is kept out of the timings."""
    masks: bool = True
    """Write the masks (masks/NAME.png, masks/NAME/FRAME.png)."""
    overlays: bool = True
    """Write the overlays (overlays/NAME.png or .mp4)."""
    max_frames: PositiveInt | None = None
    """At most this many frames of each source (the first ones)."""
    layout: Literal["auto", "sequence", "volume"] = "auto"
    """3D files: 2D+t sequence (frames along z) or volume (slices along `axis`)."""
    axis: Axis3D = 0
    """Volumes: the axis slices are taken along."""
    pixel_spacing_mm: list[PositiveFloat] = field(default_factory=list)
    """[row, column] or [both] mm per pixel, replacing what the files say."""
    fps: PositiveFloat | None = None
    """Frame rate for the time column and overlay videos, replacing what the files say."""
    threads: PositiveInt | None = None
    """CPU threads of the runtime (default: the CPUs this process may use)."""
    overwrite: bool = False
    """Replace the predictions already in --out (their files only)."""
    progress: bool = True
    """Show a progress bar with the frame rate and ETA."""


PREDICT = Layout(
    "predict",
    owned=("predictions.csv", "summary.json", "summary.md", "config.yaml", "masks", "overlays"),
    staging=".partial",
)


# --- app ---------------------------------------------------------------------------------------


@dataclass
class AppConfig:
    """A local web viewer: pick a model, drop a file, watch the overlay at the measured speed."""

    models: list[str] = field(default_factory=list)
    """Model folders (head checkpoints, export folders) or folders holding them (searched two
    levels deep, e.g. `sonodistill evaluate`'s OUT/models)."""
    host: str = "127.0.0.1"
    """Address to bind; anything but this machine exposes the page to the network."""
    port: Port = 8765
    """Port to listen on (0: any free port, printed at start)."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host names (or addresses, or *.domain) the page may be opened under besides localhost,
    127.0.0.1, [::1] and the --host it binds: for a deliberate network deployment. Requests
    addressed to any other name are refused (a DNS-rebinding page would use its own)."""
    max_upload_mb: PositiveFloat = 200.0
    """Largest upload accepted, in MB (2**20 bytes)."""
    max_frames: PositiveInt = 2000
    """Frames decoded per upload (the first ones); frames are kept in memory."""
    max_frame_pixels: PositiveInt = 2**24
    """Pixels of one frame (width x height), read from the header before decoding: 2**24 is
    a 4096 x 4096 frame, twice a 4K screen and far above any scanner's; a 16384 x 16384
    frame (268 M pixels, a 3 MB JPEG in a DICOM) would take GBs of memory to decode."""
    max_pixels: PositiveInt = 2**30
    """Pixels decoded per upload (width x height x frames, the frames capped by --max_frames),
    read from the header before decoding: 2**30 admits a 1024 x 1024 cine of 1000 frames and
    bounds the time one upload holds the only model worker."""
    max_sessions: PositiveInt = 8
    """Open sessions kept in memory; the least recently used is closed beyond this."""
    session_ttl_s: PositiveFloat = 1800.0
    """A session untouched this long is closed."""
    threads: PositiveInt | None = None
    """CPU threads of the runtimes (default: the runtime's own)."""
    work_dir: str | None = None
    """Where the app makes its private folder for the uploads being decoded (default: the
    system's temporary folder); folders left there by apps no longer running are removed."""
    keep: str | None = None
    """Save every finished session (upload, CSV, overlay video, summary) here; default: nothing
    uploaded stays on disk."""
    smoothing: RightOpenUnitInterval = 0.5
    """Temporal smoothing used when the page's smoothing box is ticked."""
