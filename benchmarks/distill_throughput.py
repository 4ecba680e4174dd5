"""Where a distillation step's time goes, its model FLOP utilisation (MFU), and the projected
wall time of the paper's recipe (162,000 frames x 1000 epochs) on N devices.

    python benchmarks/distill_throughput.py                    # CPU-sized: tiny teacher, ResNet-18
    python benchmarks/distill_throughput.py --paper --device cuda --gpus 32  # the paper's settings
    python benchmarks/distill_throughput.py --paper --teachers 2   # two ViT-B teachers (--teachers)

`--paper` is ViT-B/16 (DINOv3 layout, random weights: speed does not need them) -> ResNet-50 at
224 px, 16 images per device (the global batch of 512 over 32 GPUs), bf16 autocast, on real
lung-ultrasound frames (or `--data PACK` from `sonodistill corpus pack`). The models, data
loader, augmentation and step are the recipe's own (`sonodistill.distill.recipe`).

Measured in one process, the parts in turn, round after round (medians over rounds, so that a
drifting machine load falls on every part alike):
  data      one batch decoded by one core as a loader worker does it (the recipe's dataset:
            pack, corpus or folder), pinned and copied to the device: workers x this = the feed
  augment   augmentation, mixup and normalisation on the device
  teacher   teacher forward (no gradients); with --teachers N, all N one after the other, and
            each alone (teacher_1 ... teacher_N): the cost per teacher
  student   student forward + backward + AdamW (teacher targets ready); also in NCHW, to show
            what channels_last buys on this device
  step      the recipe's train_step + AdamW on a batch already on the device
  loop      data + step, as the recipe runs them: its DataLoader with --workers persistent
            workers, timed after the prefetched batches are used up
Host syncs per step (`sonodistill.distill.host_sync`: torch's sync debug mode on CUDA, a count
of the calls that read a tensor's values on a CPU) in a step between log steps and at a log
step; and the ops one step launches from Python, part by part (aten calls: each is a kernel
launch, or more, on a GPU), which set the host time per step whatever the batch size.
MFU = the FLOPs of one step (torch's FlopCounterMode: teacher forward, student forward and
backward; 1 MAC = 2 FLOPs) / its time / the device's peak (known GPUs below; CPUs estimated from
cores x clock x FLOPs per cycle of their vector units; `--peak-tflops` overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from distill_step import extract_frames  # the same real lung frames as distill_step.py
from lightning_fabric import Fabric
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

from sonodistill.data.images import open_training_images
from sonodistill.distill import DistillConfig
from sonodistill.distill.augment import mixup
from sonodistill.distill.config import LOSSES
from sonodistill.distill.host_sync import count_host_syncs
from sonodistill.distill.recipe import (
    build_data,
    build_models,
    build_student,
    grid_of,
    read_back,
    resolve_precision,
    train_step,
    update,
)
from sonodistill.distill.teachers import TeacherSet, build_teachers, combined
from sonodistill.models import StudentConfig, TeacherConfig, to_model_input
from sonodistill.models.flops import flops_of

PAPER_IMAGES = 162_000 * 1000  # Sec. 3.1 and 3.5: ~162k frames, 1000 epochs

# Dense peak TFLOP/s per GPU from the vendors' data sheets: (bf16/fp16 tensor cores, fp32).
# Matched in order against torch.cuda.get_device_name(); more specific names first.
GPU_PEAKS = [
    ("B200", 2250.0, 80.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.0, 82.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]


def peak_tflops(device: torch.device, precision: str, threads: int) -> tuple[float, str]:
    """The device's peak for this precision and where the figure comes from."""
    low = precision.startswith(("bf16", "16"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tensor, fp32 in GPU_PEAKS:
            if key in name:
                return (tensor, f"{key} bf16 dense") if low else (fp32, f"{key} fp32")
        raise SystemExit(f"no known peak for {name}: pass --peak-tflops")
    flags = _cpu_flags()
    if low and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif low and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX-512 bf16"
    elif "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 fp32, 2 FMA units"
    elif "avx2" in flags:
        per_cycle, unit = 32, "AVX2 fp32, 2 FMA units"
    else:
        per_cycle, unit = 8, "SSE fp32"
    ghz = _cpu_ghz()
    note = f"estimated: {threads} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({unit})"
    return threads * ghz * per_cycle / 1e3, note


def _cpuinfo(field: str) -> list[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith(field)]


def _cpu_flags() -> set[str]:
    flags = _cpuinfo("flags")
    return set(flags[0].split()) if flags else set()


def _cpu_ghz() -> float:
    mhz = [float(v) for v in _cpuinfo("cpu MHz")]
    return max(mhz) / 1e3 if mhz else 2.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = _cpuinfo("model name")
    return f"{names[0] if names else platform.processor()}, {torch.get_num_threads()} threads"


class Parts:
    """The recipe's models and data on one device, and one callable per part."""

    def __init__(self, fabric: Fabric, cfg: DistillConfig):
        self.fabric, self.cfg = fabric, cfg
        torch.manual_seed(0)
        self.teacher = build_teachers(cfg)
        student = build_student(cfg, self.teacher.out_channels)
        self.dataset = open_training_images(cfg.data, cfg.image_size)
        self.data = build_data(fabric, cfg, self.dataset)
        self.m = build_models(fabric, cfg, self.teacher, student, total_steps=10**9)
        several = isinstance(self.teacher, TeacherSet)
        self.objective = combined(cfg, self.teacher) if several else LOSSES.get(cfg.loss)
        self._batches = iter(self.data.loader)
        self.images = self.next_batch()
        self.x = self.augmented(self.images)
        with fabric.autocast():
            self.target = self.m.teacher(self.x)
        self.grid = grid_of(self.target)

    def next_batch(self) -> torch.Tensor:
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.data.loader)
            return next(self._batches)

    def decode_batch(self) -> torch.Tensor:
        """What a worker, the pinning thread and the copy do for one batch, on one core."""
        picks = torch.randint(len(self.dataset), (self.cfg.batch_size,)).tolist()
        images = default_collate([self.dataset[i] for i in picks])
        if self.fabric.device.type == "cuda":
            images = images.pin_memory()
        return images.to(self.fabric.device, non_blocking=True)

    def drain(self) -> None:
        """Use up the batches the workers prefetched, so that `loop` times the sustained feed."""
        for _ in range(max(1, self.cfg.num_workers) * self.cfg.prefetch_factor):
            self.step(self.next_batch())

    def augmented(self, images: torch.Tensor) -> torch.Tensor:
        x = self.m.augment(images.float().div_(255))
        if self.cfg.mixup:
            x, _, _ = mixup(x)
        return to_model_input(x)

    def teacher_forward(self) -> None:
        with self.fabric.autocast():
            self.m.teacher(self.x)

    def one_teacher(self, i: int) -> None:
        """The i-th teacher of a TeacherSet alone (its cost in the step)."""
        with self.fabric.autocast():
            self.m.teacher.teachers[i](self.x)

    def student_update(self, student=None, optimizer=None, memory_format=None) -> None:
        student, optimizer = student or self.m.student, optimizer or self.m.optimizer
        x = self.x.contiguous(memory_format=memory_format or self.m.memory_format)
        with self.fabric.autocast():
            pred = student(x, self.grid)
        loss, _ = self.objective(pred, self.target)
        self.fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(self, images: torch.Tensor | None = None) -> None:
        m = self.m
        train_step(
            self.fabric,
            m.teacher,
            m.student,
            m.augment,
            self.objective,
            self.images if images is None else images,
            self.cfg.mixup,
            m.memory_format,
        )
        update(self.fabric, m, self.cfg.optim.grad_clip)

    def log_step(self) -> None:
        """A step followed by what the loop does at a log step (`read_back`)."""
        m = self.m
        loss, metrics = train_step(
            self.fabric,
            m.teacher,
            m.student,
            m.augment,
            self.objective,
            self.images,
            self.cfg.mixup,
            m.memory_format,
        )
        update(self.fabric, m, self.cfg.optim.grad_clip)
        first_bad = torch.tensor(-1, device=self.fabric.device)
        read_back(self.fabric, first_bad, 1, 0, self.cfg, {"loss": loss, **metrics})

    def step_flops(self) -> tuple[int, int]:
        """FLOPs of one step (teacher forward + student forward and backward) and of the
        teacher forward alone."""
        total, _ = flops_of(
            lambda: train_step(
                self.fabric,
                self.m.teacher,
                self.m.student,
                self.m.augment,
                self.objective,
                self.images,
                self.cfg.mixup,
                self.m.memory_format,
            )
        )
        self.m.optimizer.zero_grad(set_to_none=True)
        teacher, _ = flops_of(self.teacher_forward)
        return total, teacher


def nchw_student(parts: Parts):
    """A second student in contiguous (NCHW) layout with its own AdamW, same weights."""
    cfg = replace(parts.cfg, channels_last=False)
    student = build_student(cfg, parts.teacher.out_channels)
    m = build_models(parts.fabric, cfg, parts.teacher, student, total_steps=10**9)
    m.student.module.load_state_dict(parts.m.student.module.state_dict())
    return m.student, m.optimizer


def time_rounds(
    parts: dict, preludes: dict, sync, rounds: int, iters: int, warmup: int
) -> dict[str, list]:
    """ms per call of each part: `rounds` rounds, each part timed over `iters` calls in turn
    (parts alternate within a round, so that load drifts onto all of them alike), after its
    prelude (untimed) if it has one."""
    for fn in parts.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            if name in preludes:
                preludes[name]()
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3 / iters)
    return times


class OpCount(TorchDispatchMode):
    """aten ops called within the block (what reaches the device from Python)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    with OpCount() as ops:
        fn()
    return ops.count


def config(args, data: Path) -> DistillConfig:
    if args.paper:
        teacher = TeacherConfig(random_init=True)
        student, size, batch = "resnet50", 224, 16
    else:
        teacher = TeacherConfig(
            random_init=True, model_kwargs={"embed_dim": 192, "depth": 4, "num_heads": 3}
        )
        student, size, batch = "resnet18", 64, 16
    # --teachers N: N teachers of the same architecture (random weights), through --teachers.
    term = {"family": teacher.family, "weights": "random", "model_kwargs": teacher.model_kwargs}
    teachers = [{"encoder": dict(term)} for _ in range(args.teachers)] if args.teachers > 1 else []
    return DistillConfig(
        data=str(data),
        out=str(data.parent / "unused-run"),
        teacher=teacher,
        teachers=teachers,
        student=StudentConfig(name=args.student or student),
        image_size=args.img_size or size,
        batch_size=args.batch or batch,
        num_workers=args.workers,
        accelerator=args.device,
        precision=args.precision,
        compile=args.compile,
    )


def hours(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true", help="ViT-B/16 -> ResNet-50, 224 px")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--student", help="timm CNN (default resnet18; --paper: resnet50)")
    parser.add_argument("--img-size", type=int, help="default 64 (--paper: 224)")
    parser.add_argument("--batch", type=int, help="images per device (default 16)")
    parser.add_argument("--data", help="pack, corpus or image folder (default: lung frames)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--teachers", type=int, default=1, help="teachers of the same size")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="calls per part and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=32, help="devices for the projection")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, overriding")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames"
        frames.mkdir()
        data = Path(args.data) if args.data else extract_frames(frames, 8)
        cfg = config(args, data)
        precision = resolve_precision(cfg.precision, args.device)
        fabric = Fabric(accelerator=args.device, devices=1, precision=precision)
        parts = Parts(fabric, cfg)
        cuda = fabric.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else lambda: None
        nchw, nchw_opt = nchw_student(parts)
        flops_step, flops_teacher = parts.step_flops()
        timed = {
            "data": parts.decode_batch,
            "augment": lambda: parts.augmented(parts.images),
            "teacher": parts.teacher_forward,
            **{
                f"teacher_{i + 1}": (lambda i=i: parts.one_teacher(i))
                for i in range(args.teachers if args.teachers > 1 else 0)
            },
            "student": parts.student_update,
            "student_nchw": lambda: parts.student_update(nchw, nchw_opt, torch.contiguous_format),
            "step": parts.step,
            "loop": lambda: parts.step(parts.next_batch()),
        }
        preludes = {"loop": parts.drain}
        times = time_rounds(timed, preludes, sync, args.rounds, args.iters, args.warmup)
        optimizers = [parts.m.optimizer]
        syncs = (
            count_host_syncs(parts.step, fabric.device, optimizers),
            count_host_syncs(parts.log_step, fabric.device, optimizers),
        )
        ops = {
            "augment": count_ops(lambda: parts.augmented(parts.images)),
            "teacher": count_ops(parts.teacher_forward),
            "student": count_ops(parts.student_update),
            "step": count_ops(parts.step),
        }

    ms = {name: statistics.median(t) for name, t in times.items()}
    batch = cfg.batch_size
    peak, peak_note = (
        (args.peak_tflops, "given")
        if args.peak_tflops
        else peak_tflops(fabric.device, precision, torch.get_num_threads())
    )
    flops_student = flops_step - flops_teacher
    mfu = {
        "teacher": flops_teacher / (ms["teacher"] / 1e3) / (peak * 1e12),
        "student": flops_student / (ms["student"] / 1e3) / (peak * 1e12),
        "step": flops_step / (ms["step"] / 1e3) / (peak * 1e12),
        "loop": flops_step / (ms["loop"] / 1e3) / (peak * 1e12),
    }
    t_cfg = cfg.teacher.model_kwargs or {"embed_dim": 768, "depth": 12}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\n{device_name(fabric.device)}; {precision}; torch {torch.__version__}; "
        f"load average {load}\n{args.teachers} x teacher ViT (dim {t_cfg['embed_dim']}, "
        f"depth {t_cfg['depth']}) "
        f"-> student {cfg.student.name}, {cfg.image_size} px, batch {batch} per device, "
        f"{cfg.num_workers} workers, channels_last {cfg.channels_last}, compile {cfg.compile}, "
        f"data {'the given ' + str(args.data) if args.data else 'real lung frames (PNG)'}; "
        f"medians of {args.rounds} rounds x {args.iters} calls\n"
    )
    n_alone = args.teachers if args.teachers > 1 else 0  # teachers timed alone
    rows = [
        ("data", "decode + pin + copy, one core"),
        ("augment", "augmentation + mixup + normalisation"),
        ("teacher", "teacher forward" + (f"s, all {args.teachers}" if args.teachers > 1 else "")),
        *((f"teacher_{i + 1}", f"teacher {i + 1} alone") for i in range(n_alone)),
        ("student", "student forward + backward + AdamW (channels_last)"),
        ("student_nchw", "the same in NCHW"),
        ("step", "train_step + AdamW, batch on the device"),
        ("loop", "data + step, as the recipe runs"),
    ]
    print("| part | what | ms / batch | images/s | MFU |\n|---|---|---|---|---|")
    for key, what in rows:
        share = f"{mfu[key]:.1%}" if key in mfu else ""
        print(f"| {key} | {what} | {ms[key]:.1f} | {batch / ms[key] * 1e3:.1f} | {share} |")
    print(
        f"\nFLOPs per image: teacher forward {flops_teacher / batch / 1e9:.3f} G, student "
        f"forward + backward {flops_student / batch / 1e9:.3f} G (FlopCounterMode); peak "
        f"{peak:.2f} TFLOP/s ({peak_note})."
    )
    print(
        f"student update speed, channels_last / NCHW: {ms['student_nchw'] / ms['student']:.2f}x; "
        f"one decoding core feeds {ms['step'] / ms['data']:.2f}x the step's images/s "
        f"(cores for the step: {ms['data'] / ms['step']:.2f})."
    )
    how = "CUDA sync debug mode" if fabric.device.type == "cuda" else "reads counted on the CPU"
    print(f"host syncs per step ({how}): {syncs[0]} between log steps, {syncs[1]} at a log step.")
    print(
        f"ops launched per step: {ops['step']} (augmentation + mixup + normalisation "
        f"{ops['augment']}, teacher forward {ops['teacher']}, student forward + backward + "
        f"AdamW {ops['student']}); {ms['step'] / ops['step'] * 1e3:.1f} us of step time per op."
    )
    per_device = batch / ms["loop"] * 1e3
    total_flops = PAPER_IMAGES * flops_step / batch
    print(
        f"\nPaper recipe (162,000 frames x 1000 epochs = {PAPER_IMAGES:.3g} images, "
        f"{total_flops:.2g} FLOPs with these models) at {per_device:.1f} images/s per device, "
        "scaling linearly (gradient all-reduce not measured):"
    )
    for n in sorted({1, 8, args.gpus}):
        print(f"  {n:>3} devices: {hours(PAPER_IMAGES / (per_device * n))}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
