"""`sonodistill bench`: the paper's Table 5, teacher and student side by side in one run.

For each model: parameters (backbone; backbone + head), forward FLOPs at the input size
(torch.utils.flop_counter, attention included, 1 MAC = 2 FLOPs), CPU latency (mean +- std over
`runs` timed batch-1 forwards after `warmup`, at a stated thread count) and throughput in each
backend asked (`deploy.runtimes.BACKENDS`: PyTorch fp32, PyTorch bf16 (autocast, where the CPU
has native bf16), ONNX Runtime fp32 and int8 (static QDQ), ExecuTorch, a plugin's), each
written and opened exactly as `export` and `predict` do; on a CUDA GPU also latency,
throughput and peak memory. Timings cover the backbone (the deployed encoder: grey frames ->
last feature map, normalisation included), not the heads.

CPU timing measures what a deployed model sees, a steady state: every model and backend runs in
blocks of `block` consecutive runs, after one untimed run that brings its weights back into the
caches; blocks take turns, in an order reversed every round, so that a shared machine's load
drifts onto all of them alike and every ratio (the deployed int8 student against the eager fp32
teacher included) is measured in one run. Timing teacher and student run by run instead would
make each student run start with caches full of the teacher's 343 MB.

"Head" in the parameter row: teacher = ViT + a linear classifier on the CLS token
(`teacher_classes` outputs, a downstream head: the teacher needs no distillation head);
student = CNN + its distillation projection head (`student_projection`, to n_blocks x the
teacher's width).

Writes `table5.{md,csv,json}` (and `config.yaml`) to `out`; the JSON keeps raw numbers and the
environment (CPU, threads, versions). A backend a model cannot be written to (DINOv3's int8
graph on XNNPACK) is an n/a cell, and the table says why.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sonodistill.config import check_fields
from sonodistill.deploy.config import BENCH, BenchConfig
from sonodistill.deploy.environment import environment
from sonodistill.deploy.runtimes import BACKENDS, WriteJob
from sonodistill.deploy.torch_runtime import bf16_native
from sonodistill.errors import UserError
from sonodistill.evaluate.heads import WithPreprocess
from sonodistill.io import write_json, write_table
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, EncoderSpec, build_encoder, encoder_label
from sonodistill.models.flops import count_flops, count_params
from sonodistill.models.student import projection_head
from sonodistill.utils.rundir import RunDir

log = logging.getLogger(__name__)

__all__ = ["BenchConfig", "bench", "time_blocks", "time_fn"]

OPPOSITE = {"smaller": "larger", "less": "more", "faster": "slower", "higher": "lower"}
REFERENCE, DEPLOYED = "torch", "ort_int8"
"""The headline row: the deployed student (ONNX Runtime int8) vs the teacher (PyTorch fp32)."""


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


def teacher_head(encoder: Encoder, classes: int) -> nn.Module:
    return nn.Linear(encoder.out_channels, classes)


def student_head(encoder: Encoder, cfg: BenchConfig, teacher_dim: int) -> nn.Module:
    """The distillation projection head exactly as `Student` builds it, on this backbone."""
    return projection_head(
        encoder.out_channels, cfg.teacher_n_blocks * teacher_dim, cfg.student_projection
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


def backend_runners(
    who: str, encoder: Encoder, cfg: BenchConfig, names: list[str], calib: np.ndarray, tmp: Path
) -> tuple[dict[str, Callable[[], object]], dict[str, dict]]:
    """One batch-1 forward per backend, ready to time: each backend writes its file into
    `tmp` (the PyTorch ones run the module) and opens it as predict does. Also, per backend,
    its file size (MB) or why the model has no row in it."""
    model = WithPreprocess(encoder).eval()  # grey [0, 1] frames, as every backend takes them
    frames = np.random.default_rng(0).random((1, 1, cfg.image_size, cfg.image_size), np.float32)
    folder = tmp / who
    folder.mkdir()
    job = WriteJob(model, folder, cfg.image_size, calib, exporter=cfg.exporter)
    runners: dict[str, Callable[[], object]] = {}
    info: dict[str, dict] = {}
    for name in names:
        record = BACKENDS.get(name)
        if record.precision == "bf16" and not bf16_native():
            info[name] = {"skipped": "this CPU has no native bf16 (emulated bf16 would mislead)"}
            continue
        if record.ondevice and who == "teacher" and not cfg.ondevice_teacher:
            info[name] = {"skipped": "the on-device model is the student"}
            continue
        try:
            source = model
            if not record.runs_the_model:
                source = record.writer()(replace(job, path=folder / record.file))
                job.written[name] = source
            runner = record.opener()(source, cfg.threads)
        except Exception as exc:  # a model this runtime cannot take: say so in the table
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            log.warning("%s: no %s model (%s)", who, record.label, why)
            info[name] = {"error": why}
            continue
        runners[name] = lambda run=runner: run(frames)
        info[name] = {"file_mb": source.stat().st_size / 2**20} if source is not model else {}
    return runners, info


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
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here; time the CPU alone with auto")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


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


def table_rows(t: dict, s: dict, threads: int, names: list[str]) -> list[dict]:
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
    for key in names:
        label = BACKENDS.get(key).label
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
    if REFERENCE in t and DEPLOYED in s:
        tt, ss = t[REFERENCE], s[DEPLOYED]
        deployed, reference = BACKENDS.get(DEPLOYED).label, BACKENDS.get(REFERENCE).label
        add_latency(
            f"CPU latency, deployed student ({deployed}) vs teacher ({reference}), "
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


def _calibration(cfg: BenchConfig) -> tuple[np.ndarray, str]:
    if cfg.calib_frames:
        from sonodistill.data.listing import collect_frames, frames_tensor

        per = max(1, -(-cfg.n_calib // len(cfg.calib_frames)))
        frames = collect_frames(cfg.calib_frames, per)[: cfg.n_calib]
        return frames_tensor(frames, cfg.image_size).numpy(), f"{len(frames)} real frames"
    rng = np.random.default_rng(0)
    noise = rng.random((cfg.n_calib, 1, cfg.image_size, cfg.image_size), dtype=np.float32)
    return noise, f"{cfg.n_calib} random-noise frames (no --calib_frames given)"


def check_config(cfg: BenchConfig) -> tuple[list[str], bool]:
    """The options, checked before any model is built or file written; returns the backends
    to time (registry order) and whether the GPU is timed (`--device cuda` without CUDA fails
    here, not after the CPU timings)."""
    check_fields(cfg)
    asked = {BACKENDS.canonical(name) for name in cfg.backends}
    names = [name for name in BACKENDS if name in asked]
    for name in names:
        why = BACKENDS.get(name).missing()
        if why:
            raise UserError(f"--backends {name}: {why}")
    use_gpu = _use_gpu(cfg)
    RunDir(cfg.out, BENCH, overwrite=cfg.overwrite).precheck()
    return names, use_gpu


def bench(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns {'rows', 'teacher', 'student', 'env'} and writes the tables
    (`--students`: `deploy.students.bench_students` instead)."""
    names, use_gpu = check_config(cfg)
    teacher_spec = EncoderSpec.parse(cfg.teacher, "--teacher")
    student_spec = EncoderSpec.parse(cfg.student, "--student")
    teacher = build_encoder(teacher_spec, "--teacher").eval()
    student = build_encoder(student_spec, "--student").eval()
    for encoder in (teacher, student):
        encoder.check_input_size(cfg.image_size, cfg.image_size, "--image_size")
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg.threads = threads  # the resolved count goes into config.yaml and the table
    calib, calib_note = _calibration(cfg)
    run = RunDir(cfg.out, BENCH, overwrite=cfg.overwrite)
    with run.claim():  # models and size are valid: now write
        run.clear()
        run.save_options(cfg)
        x = to_model_input(torch.rand(1, 1, cfg.image_size, cfg.image_size))
        t = static_costs("teacher", teacher, teacher_head(teacher, cfg.teacher_classes), x)
        s = static_costs("student", student, student_head(student, cfg, teacher.out_channels), x)
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            t_run, t_info = backend_runners("teacher", teacher, cfg, names, calib, Path(tmp))
            s_run, s_info = backend_runners("student", student, cfg, names, calib, Path(tmp))
            log.info(
                "timing %s for teacher and student", ", ".join(dict.fromkeys([*t_run, *s_run]))
            )
            runners = {("t", b): fn for b, fn in t_run.items()}
            runners |= {("s", b): fn for b, fn in s_run.items()}
            timed = time_blocks(runners, cfg.warmup, cfg.runs, cfg.block)
        for key, result, info in (("t", t, t_info), ("s", s, s_info)):
            result["not_timed"] = {}
            for backend, about in info.items():
                if (key, backend) in timed:
                    result[backend] = timed[(key, backend)] | about
                else:
                    result["not_timed"][backend] = about.get("error") or about["skipped"]
        if use_gpu:
            t["gpu"] = measure_gpu(teacher, x, cfg)
            s["gpu"] = measure_gpu(student, x, cfg)
        t["label"], s["label"] = encoder_label(teacher_spec), encoder_label(student_spec)
        env = environment(threads) | {
            "warmup": cfg.warmup,
            "runs": cfg.runs,
            "image_size": cfg.image_size,
            "calibration": calib_note,
        }
        rows = table_rows(t, s, threads, names)
        result = {"rows": rows, "teacher": t, "student": s, "env": env}
        write_outputs(result, cfg, run.path)
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
        "ratios compare medians. Every backend takes grey frames (normalisation included). "
        "Head: teacher = linear classifier on the CLS token "
        f"({cfg.teacher_classes} classes); student = distillation projection head "
        f"({cfg.student_projection}, to {cfg.teacher_n_blocks} x teacher width). Timings cover "
        "the backbone only."
    )
    if any(BACKENDS.get(b).ondevice for b in {*t, *s} if b in BACKENDS):
        note += (
            " ExecuTorch: PyTorch export quantisation (XNNPACK quantizer, per-channel, the "
            "same calibration frames), run in ExecuTorch's runtime."
        )
    for who, m in (("teacher", t), ("student", s)):
        for backend, why in m["not_timed"].items():
            note += f" No {BACKENDS.get(backend).label} row for the {who}: {why}."
    write_table(table, out / "table5", note=note)
    write_json(out / "table5.json", result, default=str)
