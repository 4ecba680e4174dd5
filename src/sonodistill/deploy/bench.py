"""`sonodistill bench`: the paper's Table 5, teacher and student side by side in one run.

For each model: parameters (backbone; backbone + head), forward FLOPs at the input size
(torch.utils.flop_counter, attention included, 1 MAC = 2 FLOPs), CPU latency (mean +- std over
`runs` timed batch-1 forwards after `warmup`, at a stated thread count) and throughput for
PyTorch fp32, PyTorch bf16 (autocast, where the CPU has native bf16), ONNX Runtime fp32 and
int8 (static QDQ); on a CUDA GPU also latency, throughput and peak memory. Timings cover the
backbone (the deployed encoder: frames -> last feature map), not the heads.

CPU timing measures what a deployed model sees, a steady state: every model and backend runs in
blocks of `block` consecutive runs, after one untimed run that brings its weights back into the
caches; blocks take turns, in an order reversed every round, so that a shared machine's load
drifts onto all of them alike and every ratio (the deployed int8 student against the eager fp32
teacher included) is measured in one run. Timing teacher and student run by run instead would
make each student run start with caches full of the teacher's 343 MB.

"Head" in the parameter row: teacher = ViT + a linear classifier on the CLS token
(`teacher_head_classes` outputs, a downstream head: the teacher needs no distillation head);
student = CNN + its distillation projection head (1x1 conv to n_blocks x the teacher's width).

Writes `table5.{md,csv,json}` (and `config.yaml`) to `out`; the JSON keeps raw numbers and the
environment (CPU, threads, versions).
"""

from __future__ import annotations

import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from sonodistill.config import NonNegativeInt, PositiveInt, check_fields, save_config
from sonodistill.deploy.onnx_utils import export_onnx, quantize_int8, session
from sonodistill.distill.run import load_encoder
from sonodistill.errors import UserError, unknown_name
from sonodistill.evaluate.heads import WithPreprocess
from sonodistill.io import write_json, write_table
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, EncoderSpec, parse_spec
from sonodistill.models.flops import count_flops, count_params
from sonodistill.models.student import StudentConfig, projection_head

log = logging.getLogger(__name__)

BACKENDS = ("torch_fp32", "torch_bf16", "ort_fp32", "ort_int8")
LABELS = {
    "torch_fp32": "PyTorch fp32",
    "torch_bf16": "PyTorch bf16",
    "ort_fp32": "ONNX Runtime fp32",
    "ort_int8": "ONNX Runtime int8",
    "executorch_int8": "ExecuTorch XNNPACK int8",
}
OPPOSITE = {"smaller": "larger", "less": "more", "faster": "slower", "higher": "lower"}


@dataclass
class BenchConfig:
    """Teacher vs student deployment cost (paper Table 5)."""

    teacher: str | dict = "teacher:random@ViT-B/16 (DINOv3)"
    """Encoder spec of any family (string or EncoderSpec mapping); weights do not change the
    cost, so a random init is the default."""
    student: str = f"random:{StudentConfig.name}@{StudentConfig.name} student"
    teacher_n_blocks: PositiveInt = 2
    """Distillation target = this many teacher blocks: width of the student's projection."""
    student_head: Literal["linear", "mlp"] = "linear"
    teacher_head_classes: PositiveInt = 3
    image_size: PositiveInt = 224
    warmup: NonNegativeInt = 5
    runs: PositiveInt = 50
    block: PositiveInt = 5
    """Timed runs in a row per model and backend (after an untimed one); blocks take turns."""
    threads: PositiveInt | None = None
    """CPU threads for PyTorch and ONNX Runtime (default: torch's current count)."""
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    """Any of torch_fp32, torch_bf16, ort_fp32, ort_int8 and executorch_int8 (on-device)."""
    ondevice_teacher: bool = False
    """executorch_int8 for the teacher too: DINOv3's int8 graph does not lower to XNNPACK
    (ExecuTorch 1.5 leaves per-channel dequantisation outside the delegate and has no portable
    kernel for it), and finding out costs a minute; the on-device model is the student."""
    calib_frames: list[str] = field(default_factory=list)
    """Real frames for int8 calibration (`NAME=PATH` as in `embed`); none: random noise."""
    n_calib: PositiveInt = 8
    gpu: Literal["auto", "on", "off"] = "auto"
    gpu_runs: PositiveInt = 100
    exporter: Literal["legacy", "dynamo"] = "legacy"
    out: str = "runs/bench"


# --- measurement ---------------------------------------------------------------------------------


def time_fn(fn: Callable[[], object], warmup: int, runs: int, sync=None) -> dict[str, float]:
    """Latency mean/std (ms) of `runs` calls after `warmup`; throughput = 1000 / mean."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return _stats(times)


def _stats(times: list[float]) -> dict[str, float]:
    mean = statistics.fmean(times)
    std = statistics.stdev(times) if len(times) > 1 else 0.0
    # The median resists the outliers of a shared machine; the table shows it beside mean +- std.
    return {
        "latency_ms": mean,
        "latency_std_ms": std,
        "latency_median_ms": statistics.median(times),
        "throughput": 1000.0 / mean,
    }


def bf16_supported() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); emulated bf16 would be a misleading row."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def teacher_head(encoder: Encoder, classes: int) -> nn.Module:
    return nn.Linear(encoder.out_channels, classes)


def student_head(encoder: Encoder, cfg: BenchConfig, teacher_dim: int) -> nn.Module:
    """The distillation projection head exactly as `Student` builds it, on this backbone."""
    return projection_head(
        encoder.out_channels, cfg.teacher_n_blocks * teacher_dim, cfg.student_head
    )


def static_costs(name: str, encoder: Encoder, head: nn.Module, x: torch.Tensor) -> dict:
    result: dict = {
        "model": name,
        "params_backbone": count_params(encoder.backbone),
        "params_head": count_params(head),
    }
    result["params_total"] = result["params_backbone"] + result["params_head"]
    result["flops"], result["flops_by_op"] = count_flops(encoder, x)
    log.info(
        "%s: %.2fM params, %.2f GFLOPs",
        name,
        result["params_backbone"] / 1e6,
        result["flops"] / 1e9,
    )
    return result


def cpu_runners(
    name: str, encoder: Encoder, cfg: BenchConfig, calib: np.ndarray, tmp: Path
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """One batch-1 forward per backend, ready to time; and the ONNX file sizes (MB)."""
    frames = torch.rand(1, 1, cfg.image_size, cfg.image_size)
    x = to_model_input(frames)
    runners: dict[str, Callable[[], object]] = {}
    sizes: dict[str, float] = {}
    if "torch_fp32" in cfg.backends:
        runners["torch_fp32"] = lambda: encoder(x)
    if "torch_bf16" in cfg.backends and bf16_supported():

        def bf16() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return encoder(x)

        runners["torch_bf16"] = bf16
    wanted = [b for b in ("ort_fp32", "ort_int8") if b in cfg.backends]
    if wanted:
        fp32 = export_onnx(
            WithPreprocess(encoder),
            tmp / f"{name}_fp32.onnx",
            cfg.image_size,
            exporter=cfg.exporter,
        )
        paths = {"ort_fp32": fp32}
        if "ort_int8" in wanted:
            paths["ort_int8"] = quantize_int8(fp32, tmp / f"{name}_int8.onnx", calib)
        feed = {"frames": frames.numpy()}
        for backend in wanted:
            sess = session(paths[backend], cfg.threads)
            runners[backend] = lambda s=sess: s.run(None, feed)
            sizes[backend] = paths[backend].stat().st_size / 2**20
    if "executorch_int8" in cfg.backends and (name == "student" or cfg.ondevice_teacher):
        from sonodistill.deploy.ondevice import PteRunner, export_pte

        path = tmp / f"{name}_int8.pte"
        try:
            export_pte(WithPreprocess(encoder), path, cfg.image_size, calib, quantize=True)
        except Exception as exc:  # an architecture XNNPACK cannot take: say so in the table
            log.warning("%s: no ExecuTorch int8 program (%s)", name, str(exc).splitlines()[0])
            sizes["executorch_int8_error"] = str(exc).splitlines()[0][:200]
        else:
            pte = PteRunner(path, cfg.threads)
            x_np = frames.numpy()
            runners["executorch_int8"] = lambda: pte(x_np)
            sizes["executorch_int8"] = path.stat().st_size / 2**20
    return runners, sizes


def time_blocks(
    runners: dict[str, Callable[[], object]], warmup: int, runs: int, block: int
) -> dict[str, dict[str, float]]:
    """time_fn's statistics of each callable in its steady state: `runs` timed calls in blocks
    of `block` consecutive calls, each block after one untimed call (the caches refill with
    this model's weights); the blocks of all callables take turns, in an order reversed every
    round, so that load from other processes drifts onto all of them alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for round_ in range(-(-runs // block)):
        for key in keys if round_ % 2 == 0 else keys[::-1]:
            runners[key]()
            for _ in range(min(block, runs - len(times[key]))):
                t0 = time.perf_counter()
                runners[key]()
                times[key].append((time.perf_counter() - t0) * 1000.0)
    return {k: _stats(v) for k, v in times.items()}


def _use_gpu(cfg: BenchConfig) -> bool:
    if cfg.gpu == "on" and not torch.cuda.is_available():
        raise UserError("--gpu on: CUDA is not available here; use --gpu auto or off")
    return cfg.gpu == "on" or (cfg.gpu == "auto" and torch.cuda.is_available())


def measure_gpu(encoder: Encoder, x: torch.Tensor, cfg: BenchConfig) -> dict:
    """fp32 batch-1 latency/throughput and peak allocated memory (weights + activations)."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model, xg = encoder.to(device), x.to(device)
    with torch.inference_mode():
        stats = time_fn(lambda: model(xg), cfg.warmup, cfg.gpu_runs, torch.cuda.synchronize)
    stats["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    stats["device"] = torch.cuda.get_device_name(device)
    encoder.to("cpu")
    return stats


# --- table ---------------------------------------------------------------------------------------


def _ratio(teacher: float, student: float, higher_is_better: bool, word: str) -> str:
    if not teacher or not student:
        return ""
    r = student / teacher if higher_is_better else teacher / student
    change = (student - teacher) / teacher * 100.0
    if r < 1.0:  # the student is worse on this row: say so rather than "0.5x faster"
        r, word = 1.0 / r, OPPOSITE[word]
    return f"{r:.2f}x {word} ({change:+.1f}%)"


def table_rows(t: dict, s: dict, threads: int) -> list[dict]:
    rows = []

    def add(
        metric: str,
        tv: float,
        sv: float,
        fmt: str,
        word: str,
        higher=False,
        tstd=None,
        sstd=None,
        tmed=None,
        smed=None,
    ):
        def cell(v, std, median=None):
            if v is None:  # a backend this model could not be exported to
                return "n/a"
            text = format(v, fmt) + (f" ± {std:{fmt}}" if std is not None else "")
            return text + (f" (median {median:{fmt}})" if median is not None else "")

        rows.append(
            {
                "metric": metric,
                "teacher": cell(tv, tstd, tmed),
                "student": cell(sv, sstd, smed),
                # Latency rows compare medians (robust to a shared machine's outliers).
                "student vs teacher": _ratio(
                    tv if tmed is None else tmed, sv if smed is None else smed, higher, word
                ),
            }
        )

    def add_latency(metric: str, tt: dict, ss: dict) -> None:
        """A latency row: means with their std, compared by medians."""
        add(
            metric,
            tt["latency_ms"],
            ss["latency_ms"],
            ".2f",
            "faster",
            tstd=tt["latency_std_ms"],
            sstd=ss["latency_std_ms"],
            tmed=tt["latency_median_ms"],
            smed=ss["latency_median_ms"],
        )

    add(
        "Parameters, backbone only (M)",
        t["params_backbone"] / 1e6,
        s["params_backbone"] / 1e6,
        ".2f",
        "smaller",
    )
    add(
        "Parameters, backbone + head (M)",
        t["params_total"] / 1e6,
        s["params_total"] / 1e6,
        ".2f",
        "smaller",
    )
    add("FLOPs (GFLOPs, 1 MAC = 2 FLOPs)", t["flops"] / 1e9, s["flops"] / 1e9, ".2f", "less")
    missing = dict.fromkeys(("latency_ms", "latency_std_ms", "latency_median_ms", "throughput"))
    for key, label in LABELS.items():
        if key in t or key in s:
            tt, ss = t.get(key, missing), s.get(key, missing)
            add_latency(f"CPU latency, {label}, {threads} threads (ms, mean ± std)", tt, ss)
            add(
                f"CPU throughput, {label} (img/s)",
                tt["throughput"],
                ss["throughput"],
                ".2f",
                "higher",
                higher=True,
            )
    if "torch_fp32" in t and "ort_int8" in s:
        tt, ss = t["torch_fp32"], s["ort_int8"]
        add_latency(
            f"CPU latency, deployed student (ONNX Runtime int8) vs teacher (PyTorch fp32), "
            f"{threads} threads (ms, mean ± std)",
            tt,
            ss,
        )
    if "gpu" in t and "gpu" in s:
        tg, sg = t["gpu"], s["gpu"]
        add(
            "GPU latency, fp32 (ms, mean ± std)",
            tg["latency_ms"],
            sg["latency_ms"],
            ".2f",
            "faster",
            tstd=tg["latency_std_ms"],
            sstd=sg["latency_std_ms"],
        )
        add(
            "GPU throughput, fp32 (img/s)",
            tg["throughput"],
            sg["throughput"],
            ".2f",
            "higher",
            higher=True,
        )
        add("Peak GPU memory (MB)", tg["peak_mb"], sg["peak_mb"], ".1f", "less")
    return rows


def environment(threads: int) -> dict:
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": threads,
        "bf16_native": bf16_supported(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _calibration(cfg: BenchConfig) -> tuple[np.ndarray, str]:
    if cfg.calib_frames:
        from sonodistill.data.listing import collect_frames, frames_tensor

        per = max(1, -(-cfg.n_calib // len(cfg.calib_frames)))
        frames = collect_frames(cfg.calib_frames, per)[: cfg.n_calib]
        return frames_tensor(frames, cfg.image_size).numpy(), f"{len(frames)} real frames"
    rng = np.random.default_rng(0)
    noise = rng.random((cfg.n_calib, 1, cfg.image_size, cfg.image_size), dtype=np.float32)
    return noise, f"{cfg.n_calib} random-noise frames (no --calib_frames given)"


def check_config(cfg: BenchConfig) -> bool:
    """The options, checked before any model is built or file written; returns whether the
    GPU is timed (`--gpu on` without CUDA fails here, not after the CPU timings)."""
    for name in cfg.backends:
        if name not in LABELS:
            raise unknown_name("backend", name, LABELS, "--backends")
    check_fields(cfg)
    return _use_gpu(cfg)


def bench(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns {'rows', 'teacher', 'student', 'env'} and writes the tables."""
    use_gpu = check_config(cfg)
    spec = parse_spec(cfg.teacher) if isinstance(cfg.teacher, str) else EncoderSpec(**cfg.teacher)
    teacher = load_encoder(spec).eval()
    student = load_encoder(cfg.student).eval()
    for encoder in (teacher, student):
        encoder.check_input_size(cfg.image_size, cfg.image_size, "--image_size")
    out = Path(cfg.out)  # models and size are valid: now write (config.yaml makes the folder)
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg.threads = threads  # the resolved count goes into config.yaml and the table
    save_config(cfg, out / "config.yaml")
    calib, calib_note = _calibration(cfg)
    x = to_model_input(torch.rand(1, 1, cfg.image_size, cfg.image_size))
    t = static_costs("teacher", teacher, teacher_head(teacher, cfg.teacher_head_classes), x)
    s = static_costs("student", student, student_head(student, cfg, teacher.out_channels), x)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        t_run, t_mb = cpu_runners("teacher", teacher, cfg, calib, Path(tmp))
        s_run, s_mb = cpu_runners("student", student, cfg, calib, Path(tmp))
        log.info("timing %s for teacher and student", ", ".join(dict.fromkeys([*t_run, *s_run])))
        runners = {("t", b): fn for b, fn in t_run.items()}
        runners |= {("s", b): fn for b, fn in s_run.items()}
        timed = time_blocks(runners, cfg.warmup, cfg.runs, cfg.block)
        for key, result, run, sizes in (("t", t, t_run, t_mb), ("s", s, s_run, s_mb)):
            for backend in run:
                result[backend] = timed[(key, backend)]
                if backend in sizes:
                    result[backend]["file_mb"] = sizes[backend]
            if "executorch_int8_error" in sizes:  # a model XNNPACK could not take
                result["executorch_int8_error"] = sizes["executorch_int8_error"]
    if use_gpu:
        t["gpu"] = measure_gpu(teacher, x, cfg)
        s["gpu"] = measure_gpu(student, x, cfg)
    t["label"], s["label"] = teacher.name, student.name
    env = environment(threads) | {
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "image_size": cfg.image_size,
        "calibration": calib_note,
    }
    rows = table_rows(t, s, threads)
    result = {"rows": rows, "teacher": t, "student": s, "env": env}
    write_outputs(result, cfg, out)
    return result


def write_outputs(result: dict, cfg: BenchConfig, out: Path) -> None:
    rows, env = result["rows"], result["env"]
    t, s = result["teacher"], result["student"]
    table = [
        {
            "metric": r["metric"],
            f"teacher: {t['label']}": r["teacher"],
            f"student: {s['label']}": r["student"],
            "student vs teacher": r["student vs teacher"],
        }
        for r in rows
    ]
    note = (
        f"Batch 1, {cfg.image_size}x{cfg.image_size} input, {env['warmup']} warm-up + "
        f"{env['runs']} timed runs, {env['threads']} CPU threads on {env['cpu']}; "
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}; int8 = static QDQ, "
        f"per-channel, calibrated on {env['calibration']}. Steady state: each model and backend "
        f"runs in blocks of {cfg.block} (after an untimed run), blocks taking turns; latency "
        "ratios compare medians. "
        + ("" if env["bf16_native"] else "No bf16 row: this CPU has no native bf16. ")
        + "Head: teacher = linear classifier on the CLS token "
        f"({cfg.teacher_head_classes} classes); student = distillation projection head "
        f"({cfg.student_head}, to {cfg.teacher_n_blocks} x teacher width). Timings cover the "
        "backbone only."
    )
    if "executorch_int8" in cfg.backends:
        note += (
            " ExecuTorch int8: PyTorch export quantisation (XNNPACK quantizer, per-channel, the "
            "same calibration frames), run in ExecuTorch's runtime."
        )
        if not cfg.ondevice_teacher:
            note += " No ExecuTorch row for the teacher: the on-device model is the student."
        for who, m in (("teacher", t), ("student", s)):
            if "executorch_int8_error" in m:
                note += f" No ExecuTorch int8 program for the {who}: {m['executorch_int8_error']}."
    write_table(table, out / "table5", note=note)
    write_json(out / "table5.json", result, default=str)
