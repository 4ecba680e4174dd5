"""`sonodistill evaluate --dry_run true`: the runs a suite holds and roughly how long they take
on this machine, without training, loading a weights file or writing anything.

Cost model: the FLOPs of each run's model on one image (torch's FlopCounterMode on the meta
device: neither memory nor compute), times the images it sees. Fine-tuning: epochs x (training
images x forward and backward + validation images x forward) + test images x forward. Linear
probes on cached features: one encoder forward per image per (encoder weights, dataset), plus
the head's epochs; without the cache, as fine-tuning with a frozen encoder. The time is those
FLOPs over the rate this device reaches on a ResNet-18 training step, measured on the spot
(about a second): a rough figure, since models reach different rates and loading is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from sonodistill.errors import UserError
from sonodistill.evaluate.config import PROTOCOLS, SuiteConfig
from sonodistill.evaluate.datasets import load_dataset
from sonodistill.evaluate.heads import build_model
from sonodistill.evaluate.splits import CLS_PROPORTIONS, DDTI_COUNTS
from sonodistill.evaluate.suite import (
    Run,
    check_options,
    finished_result,
    parse_shard,
    shard_runs,
    task_specs,
)
from sonodistill.evaluate.train import autocast_for, pick_device
from sonodistill.models.encoders import RANDOM, Encoder, EncoderSpec, build_encoder, resolve_spec
from sonodistill.models.flops import flops_of
from sonodistill.models.specs import DEFAULT_STUDENT

ASSUMED_STUDENT = DEFAULT_STUDENT
"""The architecture assumed for a student whose run folder does not exist yet (the default of
`sonodistill distill`)."""


@dataclass
class ModelCost:
    """FLOPs of one image through a run's model."""

    train: float
    """forward + backward (a frozen encoder: its forward only)"""
    forward: float
    encode: float
    """the frozen encoder's forward alone (what a probe caches)"""


def architecture(spec: EncoderSpec) -> tuple[EncoderSpec, str]:
    """A randomly initialised twin of the encoder (same family and architecture) and a note;
    a student's architecture comes from its run folder (a run not there yet: the default
    student's)."""
    note = ""
    try:
        spec = resolve_spec(spec)
    except (FileNotFoundError, ValueError, UserError):
        note = f"run folder {spec.weights} not found: assumed {ASSUMED_STUDENT}"
        spec = EncoderSpec(family="timm", name=ASSUMED_STUDENT, label=spec.label)
    return spec.replace(weights=RANDOM), note


def meta_encoder(spec: EncoderSpec) -> Encoder:
    """The encoder on the meta device: shapes only, nothing allocated or computed."""
    with torch.device("meta"):
        return build_encoder(spec)


def model_cost(encoder: Encoder, task: str, protocol: str, classes: int, size: int, decoder):
    """FLOPs of one image through the run's model around `encoder` (on the meta device)."""
    encoder.requires_grad_(True)  # a probe built before froze it
    with torch.device("meta"):
        model = build_model(encoder, task, protocol, classes, decoder)
        x = torch.zeros(1, 1, size, size)
    train, _ = flops_of(lambda: model(x).float().sum().backward())
    with torch.no_grad():
        forward, _ = flops_of(lambda: model(x))
        encode = flops_of(lambda: model.encode(x))[0] if hasattr(model, "encode") else forward
    return ModelCost(float(train), float(forward), float(encode))


def split_sizes(cfg: SuiteConfig, task: str, kind: str, n: int) -> dict[str, int]:
    """Train/val/test counts: from the suite's split file if it exists, else the proportions
    the splitter targets."""
    path = Path(cfg.out) / "splits" / f"{task}.json"
    if path.is_file():
        ids = json.loads(path.read_text())["ids"]
        return {s: len(ids[s]) for s in ("train", "val", "test")}
    if cfg.split.proportions:
        proportions = cfg.split.proportions
    elif kind == "cls":
        proportions = CLS_PROPORTIONS
    else:
        counts = cfg.split.seg_counts or DDTI_COUNTS
        proportions = [c / sum(counts) for c in counts]
    val, test = (round(n * p) for p in proportions[1:])
    return {"train": n - val - test, "val": val, "test": test}


def measured_rate(device: torch.device, precision: str) -> float:
    """FLOP/s of a ResNet-18 training step (128 px, batch 8 on a CPU; 224 px, batch 32 on a
    GPU) on this device."""
    size, batch = (224, 32) if device.type == "cuda" else (128, 8)
    model = timm.create_model("resnet18", pretrained=False).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = autocast_for(device, precision)

    def step() -> None:
        with autocast():
            out = model(x)
        out.float().sum().backward()

    flops, _ = flops_of(step)
    step()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start, steps = time.perf_counter(), 3
    for _ in range(steps):
        step()
    sync()
    return flops * steps / (time.perf_counter() - start)


def run_flops(run: Run, cost: ModelCost, n: dict[str, int], cfg: SuiteConfig) -> float:
    """FLOPs of one run, the encoding of a cached probe excluded (`cache_flops`)."""
    epochs = cfg.train.epochs
    train = min(n["train"], cfg.train.subset or n["train"])
    train = max(1, round(train * run.fraction))
    val, test = (min(n[s], cfg.train.subset or n[s]) for s in ("val", "test"))
    if PROTOCOLS.get(run.protocol).frozen and cfg.train.feature_cache:
        head_train, head_forward = cost.train - cost.encode, cost.forward - cost.encode
        return epochs * (train * head_train + val * head_forward) + test * head_forward
    return epochs * (train * cost.train + val * cost.forward) + test * cost.forward


def dry_run(cfg: SuiteConfig) -> str:
    """The report `sonodistill evaluate --dry_run true` prints."""
    runs = check_options(cfg)
    todo = [run for run in runs if finished_result(Path(cfg.out), run, cfg) is None]
    device = pick_device(cfg.train.device)
    costs = _Costs(cfg)
    flops: dict[str, float] = {}
    encoded = set()  # (weights, dataset, size) a linear probe has cached
    for run in todo:
        index, n, cost = costs.of(run)
        flops[run.id] = run_flops(run, cost, n, cfg)
        size = cfg.train.seg_image_size if index.task_type == "seg" else cfg.train.cls_image_size
        # Probe features: once per (weights, dataset, size); a random encoder's change per seed.
        features = (run.label, run.seed if run.encoder.weights == RANDOM else None, run.task, size)
        if (
            PROTOCOLS.get(run.protocol).frozen
            and cfg.train.feature_cache
            and features not in encoded
        ):
            encoded.add(features)
            flops[run.id] += cost.encode * sum(n.values())
    rate = measured_rate(device, cfg.train.precision) if todo else 0.0
    report = _report(cfg, runs, todo, flops, rate, costs.notes, device)
    shard = parse_shard(cfg.shard)
    if shard is None:
        return report
    n = shard[1]
    times = [
        _duration(sum(flops.get(r.id, 0.0) for r in shard_runs(runs, f"{i}/{n}")) / rate)
        if rate
        else "-"
        for i in range(1, n + 1)
    ]
    shown = ", ".join(f"{i} of {n}: {t}" for i, t in enumerate(times, 1))
    return f"{report}\nEstimated time per shard (--shard I/{n}, one device each): {shown}."


class _Costs:
    """Per run: its dataset, split sizes and model cost; each computed once."""

    def __init__(self, cfg: SuiteConfig):
        self.cfg, self.specs = cfg, task_specs(cfg)
        self.sizes, self.twins, self.encoders, self.costs = {}, {}, {}, {}
        self.notes: dict[str, str] = {}

    def of(self, run: Run) -> tuple:
        cfg = self.cfg
        if run.task not in self.sizes:
            index = load_dataset(self.specs[run.task], run.task)
            n = split_sizes(cfg, run.task, index.task_type, len(index.records))
            self.sizes[run.task] = (index, n)
        index, n = self.sizes[run.task]
        if run.label not in self.twins:
            self.twins[run.label], note = architecture(run.encoder)
            if note:
                self.notes[run.label] = note
        twin = self.twins[run.label]
        arch = json.dumps(dataclasses.asdict(twin.replace(label=None)), sort_keys=True)
        if arch not in self.encoders:
            self.encoders[arch] = meta_encoder(twin)
        size = cfg.train.seg_image_size if index.task_type == "seg" else cfg.train.cls_image_size
        key = (arch, index.task_type, run.protocol, size)
        if key not in self.costs:
            self.costs[key] = model_cost(
                self.encoders[arch],
                index.task_type,
                run.protocol,
                index.num_classes,
                size,
                cfg.train.seg_decoder,
            )
        return index, n, self.costs[key]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _report(cfg, runs, todo, flops, rate, notes, device) -> str:
    total = sum(flops.values())

    def time_of(value: float) -> str:
        return _duration(value / rate) if rate else "-"

    by_group: dict[tuple, list] = {}
    for run in runs:
        group = by_group.setdefault((run.task, run.protocol), [0, set(), 0.0])
        group[0] += 1
        group[1].add(run.fraction)
        group[2] += flops.get(run.id, 0.0)
    by_encoder = Counter()
    for run in todo:
        by_encoder[run.label] += flops[run.id]
    t = cfg.train
    probes = "on cached features" if t.feature_cache else "uncached"
    lines = [
        f"{len(runs)} runs in {cfg.out} ({len(runs) - len(todo)} done, {len(todo)} to run): "
        f"{len({r.label for r in runs})} encoders x {len(cfg.tasks)} tasks x protocols and "
        f"label fractions x {len(cfg.seeds)} seeds; {t.epochs} epochs, {t.seg_image_size}/"
        f"{t.cls_image_size} px, linear probes {probes}.",
        "",
        "| task | protocol | label fractions | runs | estimated time |",
        "|---|---|---|---|---|",
    ]
    for (task, protocol), (count, fractions, value) in by_group.items():
        shown = ", ".join(f"{f:g}" for f in sorted(fractions, reverse=True))
        lines.append(f"| {task} | {protocol} | {shown} | {count} | {time_of(value)} |")
    lines += ["", "| encoder | estimated time |", "|---|---|"]
    lines += [f"| {label} | {time_of(value)} |" for label, value in by_encoder.items()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    lines += [
        "",
        f"Estimated time of the {len(todo)} runs to do on {name}: about {time_of(total)} "
        f"({total / 1e15:.3g} PFLOP at {rate / 1e12:.3g} TFLOP/s, the rate of a ResNet-18 "
        "training step measured now; data loading not included).",
    ]
    lines += [f"Note: {label}: {note}." for label, note in notes.items()]
    return "\n".join(lines)
