"""`sonodistill demo`: the whole method in minutes on a laptop CPU, in a simulated world.

simulated corpus -> a teacher that knows the simulated world -> distillation -> linear probe and
fine-tune on presets the teacher never saw (random init vs distilled vs the teacher, through the
evaluation suite) -> embeddings + t-SNE -> deployment bench -> report.html. No download, no
weights, no dataset.

The teacher, unless you pass real DINOv3 weights, is `models.simulated_teacher`: a small DINOv3
ViT trained with labels on the presets of its pretraining world (muscle, abdomen), loaded from
Meta's official file layout like any DINOv3 file. The downstream tasks (lesion segmentation,
lesion type) use the other presets (breast, thyroid), whose frames the teacher never saw.

Run folder (default runs/demo):
    demo.yaml, demo.json     resolved config; summary (teacher, per-step status and seconds)
    corpus/<preset>/*.png    unlabeled simulated frames of every preset (distillation, t-SNE)
    labelled/                held-out presets: seg/{images,masks}/, cls/<lesion type>/, labels.csv
    distill/                 the distillation run (config.yaml, metrics.csv, student backbone)
    evaluate/linear/         `sonodistill evaluate` suite: linear probes at 5-100 % of the labels
    evaluate/finetune/       `sonodistill evaluate` suite: full fine-tuning (its models kept)
    embeddings/, analysis/   embeddings of the corpus; t-SNE figure and separation metrics
    bench/                   teacher vs student cost table (paper Table 5)
    samples/                 test frames with ground-truth and predicted masks
    report.html              everything above on one page (`sonodistill report`)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from sonodistill.config import (
    ImageSize,
    LeftOpenUnitInterval,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Renamed,
    TrainingPrecision,
    check_fields,
    save_config,
)
from sonodistill.deploy.runtimes import BackendName
from sonodistill.errors import Interrupted, UserError
from sonodistill.io import atomic_path, write_json
from sonodistill.models.specs import WEIGHTS_ENV, SimTeacherConfig, TeacherConfig
from sonodistill.utils.rundir import Layout, RunDir

log = logging.getLogger(__name__)

StepName = Literal[
    "corpus", "labelled", "teacher", "distill", "evaluate", "samples", "analysis", "bench"
]
"""The demo's steps, in order (`--skip` names some of them)."""


@dataclass
class DemoConfig:
    """The whole method in a simulated world, on a CPU: simulated frames, a small DINOv3 ViT
    teacher that learned the world from labels on some presets, distillation into a CNN, linear
    probes and fine-tuning on presets the teacher never saw (random vs distilled vs teacher,
    with intervals and paired tests), t-SNE, a deployment bench and report.html. The defaults
    take a few minutes on two idle CPU cores."""

    out: str = "runs/demo"
    """Run folder (a demo already there needs --overwrite true)."""
    seed: NonNegativeInt = 0
    """Seed of the simulated frames, the splits and the distillation."""
    corpus_frames: PositiveInt = 400
    """Unlabeled simulated frames of every preset, for distillation (and the t-SNE)."""
    labelled_frames: PositiveInt = 160
    """Labelled frames of the held-out presets (lesion masks + lesion type), for the downstream
    tasks: split 40/10/50 % train/val/test, so that the test set makes narrow intervals."""
    image_size: ImageSize = 128
    """Frame size and distillation input size (224 with a real ViT-B/16 teacher)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher: the simulated pretrained teacher, unless weights are given (then the real
    ViT-B/16 of that file) or random_init is set (a random tiny DINOv3: mechanics only)."""
    simulated_teacher: SimTeacherConfig = field(default_factory=SimTeacherConfig)
    """How the simulated teacher is made (cached: built once per machine and settings)."""
    student: str = "resnet18"
    """Student architecture (any timm CNN)."""
    distill_steps: PositiveInt = 50
    """Distillation steps."""
    batch_size: PositiveInt = 32
    """Distillation batch (frames per step)."""
    distill_lr: PositiveFloat = 1e-3
    """AdamW lr of the distillation: 10x the paper's 1e-4, which is tuned for 1000 epochs."""
    fractions: list[LeftOpenUnitInterval] = field(
        default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0]
    )
    """Label fractions of the linear probes (nested subsets of the training split)."""
    linear_epochs: PositiveInt = 20
    """Epochs of each linear probe."""
    linear_lr: PositiveFloat = 1e-2
    """AdamW lr of the linear probes (a head on frozen features, a few steps per epoch)."""
    linear_seeds: list[NonNegativeInt] = field(default_factory=lambda: [0, 1])
    """Seeds of the linear probes (a random encoder is drawn anew for each)."""
    finetune_epochs: PositiveInt = 3
    """Epochs of each fine-tuning run (every weight trains: the costly part)."""
    finetune_lr: PositiveFloat = 1e-3
    """Downstream AdamW lr: 10x the paper's 1e-4, which is tuned for 50 epochs, not a few."""
    finetune_seeds: list[NonNegativeInt] = field(default_factory=lambda: [0])
    """Seeds of the fine-tuning runs."""
    tsne_frames: PositiveInt = 200
    """Corpus frames embedded for the t-SNE."""
    bench_image_size: ImageSize = 112
    """Bench input size (the paper: 224)."""
    bench_runs: PositiveInt = 5
    """Timed forward passes per model in the bench."""
    bench_backends: list[BackendName] = field(default_factory=lambda: ["torch", "ort_fp32"])
    """Bench backends: torch, torch_bf16, ort_fp32, ort_int8 (`sonodistill registry backends`)."""
    precision: TrainingPrecision = "auto"
    """Distillation precision; auto: bf16 on a GPU, fp32 on a CPU (CPU bf16 autocast
    pays off only with AMX, and is slower than fp32 on most laptops)."""
    threads: PositiveInt | None = None
    """torch CPU threads (default: torch's)."""
    skip: list[StepName] = field(default_factory=list)
    """Steps to skip, e.g. [bench, analysis]."""
    overwrite: bool = False
    """Replace a demo already in `out` (its own files and folders, nothing else)."""

    deprecated: ClassVar = (
        Renamed("img_size", "image_size"),
        Renamed("bench_size", "bench_image_size"),
        Renamed("threads", values={"0": "null", 0: None}),  # 0 meant "torch's default"
        Renamed("precision", values={"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}),
    )


DEMO = Layout(
    "demo",
    owned=(
        "demo.yaml",
        "demo.json",
        "corpus",
        "labelled",
        "distill",
        "evaluate",
        "embeddings",
        "analysis",
        "bench",
        "samples",
        "report.html",
    ),
    markers=("demo.yaml", "demo.json"),
    config="demo.yaml",
)
"""A demo folder: `--overwrite` removes these and nothing else."""
SPLIT = [0.4, 0.1, 0.5]
"""Train/val/test shares of the labelled set: a large test set for narrow intervals."""
TEACHER_KINDS = {
    "simulated": "Teacher (simulated DINOv3 ViT)",
    "random": "Teacher (random DINOv3 ViT)",
    "weights": "Teacher (DINOv3 ViT-B/16)",
}
"""How tables and plots name the teacher of each kind."""


@dataclass
class Step:
    name: str
    run: Callable[[DemoConfig, Path, dict], str]
    """(config, run folder, state shared between steps) -> one-line detail for the summary."""
    about: str


def teacher_kind(cfg: DemoConfig) -> str:
    """simulated (the default), weights (a DINOv3 file: --teacher.weights or the environment
    variable) or random (--teacher.random_init true)."""
    if cfg.teacher.weights or os.environ.get(WEIGHTS_ENV):
        return "weights"
    return "random" if cfg.teacher.random_init else "simulated"


def held_out_presets(cfg: DemoConfig) -> list[str]:
    """The presets of the downstream tasks: those whose labels the simulated teacher never saw."""
    from sonodistill.data.simulator import PRESETS

    return [p for p in PRESETS if p not in cfg.simulated_teacher.presets]


def check_demo(cfg: DemoConfig) -> None:
    """The options that would stop the demo minutes in, checked before anything is written."""
    from sonodistill.models.simulated_teacher import check

    check_fields(cfg)
    kind = teacher_kind(cfg)
    weights = cfg.teacher.weights or os.environ.get(WEIGHTS_ENV)
    if kind == "weights" and not Path(weights).is_file():
        raise FileNotFoundError(f"teacher weights not found: {weights}")
    try:
        check(cfg.simulated_teacher)
    except ValueError as err:
        raise UserError(f"--simulated_teacher: {err}") from err
    if not held_out_presets(cfg):
        raise UserError(
            f"--simulated_teacher.presets {cfg.simulated_teacher.presets}: leave at least one "
            "preset out for the downstream tasks"
        )
    if kind == "simulated" and cfg.image_size % cfg.simulated_teacher.patch_size:
        raise UserError(
            f"--image_size {cfg.image_size}: not a multiple of the teacher's patch size "
            f"{cfg.simulated_teacher.patch_size}"
        )


def resolve_teacher(cfg: DemoConfig) -> tuple[TeacherConfig | None, int]:
    """(teacher, image size): the real ViT-B/16 at 224 px when weights exist; a random teacher
    when asked for; None for the simulated teacher, which the `teacher` step builds or reads
    from the cache."""
    kind = teacher_kind(cfg)
    if kind == "simulated":
        return None, cfg.image_size
    if kind == "random":
        return cfg.teacher, cfg.image_size
    weights = cfg.teacher.weights or os.environ.get(WEIGHTS_ENV)
    teacher = dataclasses.replace(cfg.teacher, weights=str(weights), random_init=False)
    return teacher, max(cfg.image_size, 224)


# --- steps ----------------------------------------------------------------------------------------


def step_corpus(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.data.simulator import write_corpus

    with _bar("simulate corpus", cfg.corpus_frames) as advance:
        write_corpus(run / "corpus", cfg.corpus_frames, state["image_size"], cfg.seed, advance)
    return f"{cfg.corpus_frames} unlabeled frames of every preset, {state['image_size']} px"


def step_labelled(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.data.simulator import write_labelled

    presets = held_out_presets(cfg)
    with _bar("simulate labelled set", cfg.labelled_frames) as advance:
        write_labelled(
            run / "labelled",
            cfg.labelled_frames,
            state["image_size"],
            cfg.seed + 1,
            advance,
            presets,
        )
    return f"{cfg.labelled_frames} frames of {' and '.join(presets)}: lesion masks, 4 lesion types"


def step_teacher(cfg: DemoConfig, run: Path, state: dict) -> str:
    """The simulated teacher from the cache, else trained (minutes, once per machine), cached."""
    from sonodistill.models.simulated_teacher import cache_path, simulated_teacher, teacher_config

    if state["teacher"] is not None:
        return f"given: {state['teacher'].weights or 'random initialisation'}"
    sim = cfg.simulated_teacher
    path = cache_path(sim)
    how = "read from the cache"
    if not path.is_file():
        with _bar("train the simulated teacher", sim.steps) as advance:
            simulated_teacher(sim, lambda step, steps, loss: advance(info=f"loss {loss:.3f}"))
        how = f"trained ({sim.steps} steps) and cached"
    state["teacher"] = teacher_config(path, sim, n_blocks=cfg.teacher.n_blocks)
    return f"{how}: {path}"


def step_distill(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.distill import DistillConfig, OptimConfig, distill
    from sonodistill.models import StudentConfig

    dcfg = DistillConfig(
        data=str(run / "corpus"),
        out=str(run / "distill"),
        teacher=_teacher(state),
        student=StudentConfig(name=cfg.student),
        optim=OptimConfig(lr=cfg.distill_lr),
        image_size=state["image_size"],
        batch_size=cfg.batch_size,
        max_steps=cfg.distill_steps,
        seed=cfg.seed,
        accelerator="auto",
        precision=cfg.precision,
        num_workers=0,
        log_every=5,
        checkpoint_every=10**9,
    )
    state["distill_dir"] = Path(distill(dcfg))
    return f"{cfg.distill_steps} steps of batch {cfg.batch_size}, {cfg.student} student"


def _teacher(state: dict) -> TeacherConfig:
    if state.get("teacher") is None:
        raise RuntimeError("no teacher: the teacher step did not run")
    return state["teacher"]


def encoders(cfg: DemoConfig, state: dict) -> dict[str, str | dict]:
    """Downstream encoder specs: the student architecture at random and distilled
    initialisation, and the teacher itself."""
    if "distill_dir" not in state:
        raise RuntimeError("no distilled student: the distill step did not run")
    short = _short(cfg.student)
    teacher = {**dataclasses.asdict(_teacher(state).spec()), "label": TEACHER_KINDS[state["kind"]]}
    return {
        "random": f"random:{cfg.student}@{short}-Rand",
        "distilled": f"student:{state['distill_dir']}@{short}-Distill",
        "teacher": teacher,
    }


def suite_config(cfg: DemoConfig, run: Path, state: dict, protocol: str):
    """The `sonodistill evaluate` suite of one protocol over the demo's labelled set: linear
    probes at every label fraction, or full fine-tuning on all labels (its models kept for the
    sample figure). The two differ in epochs and lr, hence two suites."""
    from sonodistill.evaluate.splits import SplitConfig
    from sonodistill.evaluate.suite import SuiteConfig
    from sonodistill.evaluate.train import TrainSettings

    linear = protocol == "linear"
    epochs = cfg.linear_epochs if linear else cfg.finetune_epochs
    lab = run / "labelled"
    specs = encoders(cfg, state)
    return SuiteConfig(
        out=str(run / "evaluate" / protocol),
        encoders=list(specs.values()),
        datasets={
            "sim_lesion_seg": {"format": "seg_folder", "root": str(lab / "seg")},
            "sim_lesion_type": {
                "format": "cls_folder",
                "root": str(lab / "cls"),
                "task_type": "cls",
            },
        },
        tasks=["sim_lesion_seg", "sim_lesion_type"],
        protocols=[protocol],
        fractions=list(cfg.fractions) if linear else [1.0],
        fraction_protocols=["linear"],
        seeds=list(cfg.linear_seeds if linear else cfg.finetune_seeds),
        reference=specs["random"].split("@")[-1],
        split=SplitConfig(seed=cfg.seed, proportions=list(SPLIT)),
        train=TrainSettings(
            seg_image_size=state["image_size"],
            cls_image_size=state["image_size"],
            epochs=epochs,
            seg_batch=16 if linear else 8,  # fine-tuning: more, smaller steps in few epochs
            cls_batch=16 if linear else 8,
            lr=cfg.linear_lr if linear else cfg.finetune_lr,
            restart_epochs=epochs,
            empty_mask="ignore",  # segmentation Dice over the frames with a lesion
            device="auto",
        ),
        save_models=not linear,
    )


def step_evaluate(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Linear probes (every label fraction) and fine-tuning, random vs distilled vs teacher,
    through `sonodistill evaluate`: tables with intervals, paired tests (comparisons.md)."""
    from sonodistill.evaluate.suite import check_options, run_suite

    counts = []
    for protocol in ("linear", "finetune"):
        suite = suite_config(cfg, run, state, protocol)
        counts.append(f"{len(check_options(suite))} {protocol}")
        run_suite(suite)
    return f"{' + '.join(counts)} runs at {state['image_size']} px"


def step_samples(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Test frames (one per lesion type) with ground truth and each fine-tuned model's mask."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from sonodistill.evaluate.datasets import SegDataset, load_seg_folder
    from sonodistill.evaluate.head_checkpoint import load_head
    from sonodistill.evaluate.metrics import predict_mask

    suite = run / "evaluate" / "finetune"
    runs = [json.loads(p.read_text()) for p in sorted((suite / "runs").glob("*.json"))]
    runs = [r for r in runs if r["task_type"] == "seg" and r["seed"] == min(cfg.finetune_seeds)]
    if not runs:
        raise RuntimeError(f"{suite}: no fine-tuned segmentation run")
    labels = dict(_read_labels(run / "labelled" / "labels.csv"))
    index = load_seg_folder(run / "labelled" / "seg")
    test = index.subset(runs[0]["per_image"]["id"])
    picked = []
    for lesion in ("hypoechoic", "hyperechoic", "cyst", "none"):
        picked += [r for r in test if labels.get(r.image.name) == lesion][:1]
    data = SegDataset.of(index, picked, state["image_size"])
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    preds = {}
    with torch.no_grad():
        for r in runs:
            model, _ = load_head(suite / "models" / r["id"])
            preds[r["encoder"]] = predict_mask(model(x)).numpy()
    cols = ["frame", "ground truth", *preds]
    fig, axes = plt.subplots(
        len(picked), len(cols), figsize=(2.3 * len(cols), 2.3 * len(picked)), squeeze=False
    )
    for i, rec in enumerate(picked):
        img = x[i, 0].numpy()
        masks = [None, y[i].numpy(), *(p[i] for p in preds.values())]
        for j, mask in enumerate(masks):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.45)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(labels.get(rec.image.name, ""), fontsize=9)
    fig.tight_layout()
    out = run / "samples"
    out.mkdir(exist_ok=True)
    with atomic_path(out / "segmentation_samples.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return f"{len(picked)} test frames, {len(preds)} fine-tuned models"


def _read_labels(path: Path) -> list[tuple[str, str]]:
    import csv

    return [(r["file"], r["lesion"]) for r in csv.DictReader(path.open())]


def step_analysis(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Embeddings of the corpus by random, distilled and teacher encoders; t-SNE + metrics."""
    from sonodistill.evaluate.analyze import AnalyzeConfig, analyze
    from sonodistill.evaluate.embed import EmbedConfig, embed

    presets = sorted(p for p in (run / "corpus").iterdir() if p.is_dir())
    per_source = max(1, cfg.tsne_frames // max(len(presets), 1))
    specs = list(encoders(cfg, state).values())
    ecfg = EmbedConfig(
        sources=[f"{p.name}={p}" for p in presets],
        encoders=specs,
        out=str(run / "embeddings"),
        image_size=state["image_size"],
        batch_size=32,
        max_per_source=per_source,
        seed=cfg.seed,
    )
    folder = embed(ecfg)
    n = per_source * len(presets)
    analyze(
        AnalyzeConfig(
            embeddings=str(folder),
            out=str(run / "analysis"),
            perplexity=min(30.0, max(5.0, n / 10)),
            folds=5,
            seed=cfg.seed,
        )
    )
    return f"{n} corpus frames, {len(specs)} encoders, coloured by simulated anatomy"


def step_bench(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Table 5 at a small input size: the real ViT-B/16 architecture vs the distilled student."""
    from sonodistill.deploy.bench import BenchConfig, bench

    size = cfg.bench_image_size
    bench(
        BenchConfig(
            teacher="teacher:random@ViT-B/16 (DINOv3 architecture)",
            student=encoders(cfg, state)["distilled"],
            image_size=size,
            warmup=2,
            runs=cfg.bench_runs,
            backends=list(cfg.bench_backends),
            device="auto",
            gpu_runs=cfg.bench_runs,
            out=str(run / "bench"),
        )
    )
    return f"batch 1, {size} px, {cfg.bench_runs} runs, {', '.join(cfg.bench_backends)}"


def _short(name: str) -> str:
    """resnet18 -> R18, resnet50 -> R50 (the paper's names), else the timm name."""
    return "R" + name[len("resnet") :] if name.startswith("resnet") else name


STEPS = [
    Step("corpus", step_corpus, "simulate the unlabeled corpus (every preset)"),
    Step("labelled", step_labelled, "simulate the labelled set (held-out presets)"),
    Step("teacher", step_teacher, "the pretrained teacher of the simulated world"),
    Step("distill", step_distill, "distil the teacher into the student"),
    Step("evaluate", step_evaluate, "linear probes and fine-tuning: random, distilled, teacher"),
    Step("samples", step_samples, "test frames with each fine-tuned model's mask"),
    Step("analysis", step_analysis, "embeddings and t-SNE of the corpus"),
    Step("bench", step_bench, "teacher vs student deployment cost (Table 5)"),
]


# --- driver ---------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> Path:
    """Run every step, record its status and time in demo.json, write report.html; the run dir."""
    import torch

    from sonodistill.report import build_report

    check_demo(cfg)  # fail before minutes of work
    run = RunDir(cfg.out, DEMO, overwrite=cfg.overwrite)
    run.precheck()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher, image_size = resolve_teacher(cfg)
    with run.claim():
        run.clear()
        save_config(cfg, run / DEMO.config)
        state = {"teacher": teacher, "image_size": image_size, "kind": teacher_kind(cfg)}
        _run_steps(cfg, run.path, state)
        report = build_report(run.path)
    print(f"\nreport: {report}\nopen file://{report.resolve()} in a browser", flush=True)
    return run.path


def main(cfg: DemoConfig) -> int:
    """`sonodistill demo`: exit code 1 when a step failed (the others still run and the report
    is written)."""
    import json

    run = run_demo(cfg)
    summary = json.loads((run / "demo.json").read_text())
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    if failed:
        print(f"steps failed: {', '.join(failed)} (see the log above)")
    return 1 if failed else 0


def _run_steps(cfg: DemoConfig, run: Path, state: dict) -> None:
    import traceback

    summary = _summary(cfg, state)
    print(NOTES[state["kind"]], flush=True)
    steps = [s for s in STEPS if s.name not in cfg.skip]
    for i, step in enumerate(steps):
        print(f"\n[{i + 1}/{len(steps)}] {step.name}: {step.about}", flush=True)
        start = time.perf_counter()
        record = {"name": step.name, "status": "ok", "detail": ""}
        try:
            record["detail"] = step.run(cfg, run, state)
        except Interrupted as err:  # a stop signal stops the demo, not just this step
            record.update(status="stopped", detail=str(err))
            summary["steps"].append(record)
            write_json(run / "demo.json", summary)
            raise
        except Exception as err:  # one failing step must not hide the others' results
            record.update(status="failed", detail=f"{type(err).__name__}: {err}")
            log.error("step %s failed:\n%s", step.name, traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"    {step.name}: {record['status']} in {record['seconds']:.1f} s  {record['detail']}",
            flush=True,
        )
        summary["steps"].append(record)
        if state.get("teacher") is not None:
            summary["teacher"]["source"] = state["teacher"].weights or "random"
        write_json(run / "demo.json", summary)


NOTES = {
    "simulated": (
        "A simulated world: the teacher is a small DINOv3 ViT trained with labels on simulated "
        "frames of some presets (its 'natural images'); the downstream tasks use presets it "
        "never saw. The numbers show whether distillation carries what a teacher knows into the "
        "student, in this world; they are not results on real ultrasound. For the real "
        f"ViT-B/16 pass --teacher.weights FILE or set {WEIGHTS_ENV}."
    ),
    "random": (
        "Teacher randomly initialised: the numbers show the mechanics only (it knows nothing "
        "to transfer)."
    ),
    "weights": (
        "Teacher: real DINOv3 weights (at 224 px; on a CPU this run is much slower than the "
        "simulated-teacher demo). The data is still the simulated world."
    ),
}
"""What the run's numbers mean, by kind of teacher: printed first, kept in demo.json."""


def _summary(cfg: DemoConfig, state: dict) -> dict:
    import platform

    import torch

    teacher = state["teacher"]
    kind = state["kind"]
    return {
        "teacher": {
            "kind": kind,
            "random": kind == "random",
            "source": teacher.weights if teacher else "",
            "name": TEACHER_KINDS[kind],
            "pretraining_presets": cfg.simulated_teacher.presets if kind == "simulated" else [],
        },
        "downstream_presets": held_out_presets(cfg),
        "note": NOTES[kind],
        "student": cfg.student,
        "image_size": state["image_size"],
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cuda {torch.cuda.is_available()}",
        "steps": [],
    }


class _bar:
    """A progress bar with ETA; `with _bar(text, total) as advance: advance()`."""

    def __init__(self, description: str, total: int):
        from sonodistill.progress import progress_bar

        self.progress = progress_bar()
        self.task = self.progress.add_task(description, total=total, info="")

    def __enter__(self) -> Callable[..., None]:
        self.progress.start()
        return lambda info="": self.progress.update(self.task, advance=1, info=info)

    def __exit__(self, *exc) -> None:
        self.progress.stop()
