"""`sonodistill demo`: the whole method in minutes on a laptop CPU, on an embedded simulated corpus.

corpus (simulated B-mode) -> distillation -> linear probe + fine-tune (random vs distilled) ->
embeddings + t-SNE -> deployment bench -> report.html. No download, no weights, no dataset.

Run folder (default runs/demo):
    demo.yaml, demo.json     resolved config; summary (teacher, per-step status and seconds)
    corpus/<preset>/*.png    unlabeled simulated frames; the preset names the 'dataset'
    labelled/                seg/{images,masks}/, cls/<lesion type>/, labels.csv
    distill/                 the distillation run (config.yaml, metrics.csv, student backbone)
    evaluate/                linear-probe and fine-tune tables (random vs distilled)
    analysis/                t-SNE figure and embedding table
    bench/                   teacher vs student cost table (paper Table 5)
    samples/                 frames with ground-truth and predicted masks
    report.html              everything above on one page (`sonodistill report`)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sonodistill.config import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    TrainingPrecision,
    check_fields,
    save_config,
)
from sonodistill.errors import unknown_name
from sonodistill.io import atomic_path, claim_run_dir, remove_owned, write_json
from sonodistill.models.teacher import WEIGHTS_ENV, TeacherConfig

log = logging.getLogger(__name__)

# A DINOv3 architecture (RoPE, registers, q/v biases) small enough to distil from on a laptop CPU.
TINY_TEACHER = {"embed_dim": 192, "depth": 4, "num_heads": 3}


def _tiny_teacher() -> TeacherConfig:
    return TeacherConfig(random_init=True, model_kwargs=dict(TINY_TEACHER))


@dataclass
class DemoConfig:
    """The demo's knobs; defaults take about five minutes on two CPU cores."""

    out: str = "runs/demo"
    """Run folder (a demo already there needs --overwrite true)."""
    seed: NonNegativeInt = 0
    corpus_frames: PositiveInt = 400
    """Unlabeled simulated frames for distillation (and the t-SNE)."""
    labelled_frames: PositiveInt = 160
    """Labelled frames (lesion masks + lesion type) for the downstream tasks."""
    img_size: PositiveInt = 64
    """Frame size and distillation input size (224 with a real ViT-B/16 teacher)."""
    teacher: TeacherConfig = field(default_factory=_tiny_teacher)
    """Teacher: a random tiny DINOv3 unless weights are given (then the real ViT-B/16)."""
    student: str = "resnet18"
    """Student architecture (any timm CNN)."""
    distill_steps: PositiveInt = 60
    batch_size: PositiveInt = 32
    eval_epochs: PositiveInt = 4
    """Epochs of each downstream run (linear probe and fine-tune)."""
    eval_lr: PositiveFloat = 1e-3
    """Downstream AdamW lr: 10x the paper's 1e-4, which is tuned for 50 epochs, not a few."""
    tsne_frames: PositiveInt = 240
    """Corpus frames embedded for the t-SNE."""
    bench_size: PositiveInt = 112
    """Bench input size (the paper: 224)."""
    bench_runs: PositiveInt = 10
    """Timed forward passes per model in the bench."""
    bench_backends: list[str] = field(default_factory=lambda: ["torch", "ort_fp32"])
    """Bench backends: torch, torch_bf16, ort_fp32, ort_int8 (`sonodistill registry backends`)."""
    precision: TrainingPrecision = "auto"
    """Distillation precision; auto: bf16 on a GPU, fp32 on a CPU (CPU bf16 autocast
    pays off only with AMX, and is slower than fp32 on most laptops)."""
    threads: NonNegativeInt = 0
    """torch CPU threads (0: torch's default)."""
    skip: list[str] = field(default_factory=list)
    """Steps to skip, e.g. [bench, analysis]."""
    overwrite: bool = False
    """Replace a demo already in `out`."""


MARKERS = ("demo.yaml", "demo.json")
OWNED = (
    *MARKERS,
    "corpus",
    "labelled",
    "distill",
    "evaluate",
    "analysis",
    "bench",
    "samples",
    "report.html",
)
"""What a demo folder holds: `--overwrite` removes these and nothing else."""


@dataclass
class Step:
    name: str
    run: Callable[[DemoConfig, Path, dict], str]
    """(config, run folder, state shared between steps) -> one-line detail for the summary."""
    about: str


def resolve_teacher(cfg: DemoConfig) -> tuple[TeacherConfig, int, bool]:
    """(teacher, image size, teacher is random): the real ViT-B/16 at 224 px when weights exist."""
    weights = cfg.teacher.weights or os.environ.get(WEIGHTS_ENV)
    if not weights:
        t = cfg.teacher
        return TeacherConfig(**{**t.__dict__, "random_init": True}), cfg.img_size, True
    kwargs = {} if cfg.teacher.model_kwargs == TINY_TEACHER else cfg.teacher.model_kwargs
    teacher = TeacherConfig(
        **{
            **cfg.teacher.__dict__,
            "weights": str(weights),
            "random_init": False,
            "model_kwargs": kwargs,
        }
    )
    return teacher, max(cfg.img_size, 224), False


# --- steps ----------------------------------------------------------------------------------------


def step_corpus(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.data.simulator import write_corpus

    with _bar("simulate corpus", cfg.corpus_frames) as advance:
        write_corpus(run / "corpus", cfg.corpus_frames, state["img_size"], cfg.seed, advance)
    return f"{cfg.corpus_frames} frames, {state['img_size']} px"


def step_labelled(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.data.simulator import write_labelled

    with _bar("simulate labelled set", cfg.labelled_frames) as advance:
        write_labelled(
            run / "labelled", cfg.labelled_frames, state["img_size"], cfg.seed + 1, advance
        )
    return f"{cfg.labelled_frames} frames with lesion masks and 4 lesion types"


def step_distill(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.distill import DistillConfig, distill
    from sonodistill.models import StudentConfig

    dcfg = DistillConfig(
        data=str(run / "corpus"),
        out=str(run / "distill"),
        teacher=state["teacher"],
        student=StudentConfig(name=cfg.student),
        image_size=state["img_size"],
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


def _encoders(cfg: DemoConfig, state: dict) -> dict[str, str]:
    """Downstream encoder specs: the same architecture, random vs distilled initialisation."""
    if "distill_dir" not in state:
        raise RuntimeError("no distilled student: the distill step did not run")
    short = _short(cfg.student)
    return {
        "random": f"random:{cfg.student}@{short}-Rand",
        "distilled": f"student:{state['distill_dir']}@{short}-Distill",
    }


def step_evaluate(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Linear probe and fine-tune, segmentation and classification, random vs distilled."""
    from sonodistill.evaluate.datasets import load_cls_folder, load_seg_folder
    from sonodistill.evaluate.splits import SplitConfig, load_or_make_splits
    from sonodistill.evaluate.train import TrainSettings

    out = run / "evaluate"
    lab = run / "labelled"
    tasks = {
        "seg": load_seg_folder(lab / "seg", name="sim-lesion-seg"),
        "cls": load_cls_folder(lab / "cls", name="sim-lesion-type"),
    }
    splits = {
        t: load_or_make_splits(
            index,
            out / f"splits_{t}.json",
            SplitConfig(seed=cfg.seed, proportions=(0.6, 0.2, 0.2)),
            fractions=(),
        )
        for t, index in tasks.items()
    }
    size = state["img_size"]
    settings = TrainSettings(
        seg_size=size,
        cls_size=size,
        epochs=cfg.eval_epochs,
        seg_batch=8,
        cls_batch=16,
        lr=cfg.eval_lr,
        restart_epochs=cfg.eval_epochs,
        device="auto",
    )
    encoders = _encoders(cfg, state)
    runs = [(p, t, e) for p in ("linear", "finetune") for t in tasks for e in encoders]
    results: dict[tuple[str, str, str], dict] = {}
    seg_models = {}
    with _bar("evaluate (epochs)", len(runs) * cfg.eval_epochs) as advance:
        for protocol, task, enc in runs:

            def on_epoch(epoch: int, row: dict, what=f"{protocol} {task} {enc}") -> None:
                advance(info=what)

            keep = protocol == "finetune" and task == "seg"
            result, model = _run_one(
                tasks[task],
                splits[task],
                encoders[enc],
                protocol,
                cfg.seed,
                settings,
                on_epoch,
                keep,
            )
            results[(protocol, task, enc)] = result
            if keep:
                seg_models[enc] = model
    _write_eval_tables(out, results, encoders, cfg.seed)
    runs_json = [
        {"protocol": p, "task": t, "encoder": encoders[e], **r} for (p, t, e), r in results.items()
    ]
    write_json(out / "runs.json", runs_json, indent=1, default=str)
    _sample_figure(run, tasks["seg"], splits["seg"], seg_models, encoders, size)
    return f"{len(runs)} runs x {cfg.eval_epochs} epochs at {size} px"


def _run_one(index, splits, spec, protocol, seed, settings, on_epoch, keep_model: bool):
    """evaluate.train.run_one; with keep_model, also the trained model (best-val checkpoint)."""
    from sonodistill.evaluate.train import run_one

    kept: list = []
    result = run_one(
        index,
        splits,
        spec,
        protocol,
        1.0,
        seed,
        settings,
        on_epoch,
        on_end=kept.append if keep_model else None,
    )
    return result, (kept[0].eval().cpu() if kept else None)


def _write_eval_tables(out: Path, results: dict, encoders: dict[str, str], seed: int) -> None:
    """Paper-style tables (those of `sonodistill evaluate`): one per protocol, a row per encoder,
    Dice/IoU and accuracy/macro-F1."""
    from sonodistill.evaluate.tables import HEAD, METRICS, STATS_NOTE, Results, metric_table
    from sonodistill.io import write_table

    labels = {enc: spec.split("@")[-1] for enc, spec in encoders.items()}
    runs = [
        {"task": t, "task_type": t, "protocol": p, "encoder": labels[e], "fraction": 1.0, **r}
        for (p, t, e), r in results.items()
    ]
    res = Results([{**r, "seed": seed} for r in runs])
    n = results[("linear", "seg", "random")]["n"]
    note = (
        "Simulated lesions: segmentation (Dice/IoU per image, averaged) and 4-class lesion type "
        "(accuracy, macro-F1); test metrics of the best-validation epoch; splits "
        f"train/val/test = {n['train']}/{n['val']}/{n['test']}. {STATS_NOTE}"
    )
    tables = {
        "linear": ("table2_linear_probe", "Linear probe, frozen encoder (cf. paper Table 2)"),
        "finetune": ("table3_finetune", "Full fine-tuning (cf. paper Table 3)"),
    }
    for protocol, (stem, title) in tables.items():
        columns = [
            (f"{task} {HEAD[m]}", task, task, m, 1.0, protocol)
            for task in METRICS
            for m in METRICS[task]
        ]
        table, _ = metric_table(res, list(labels.values()), columns)
        write_table(table, out / stem, title, note)


def _sample_figure(run: Path, index, splits: dict, models: dict, encoders: dict, size: int) -> None:
    """Test frames (one per lesion type) with ground truth and each fine-tuned model's mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from sonodistill.evaluate.datasets import SegDataset
    from sonodistill.evaluate.metrics import predict_mask

    labels = dict(_read_labels(run / "labelled" / "labels.csv"))
    test = index.subset(splits["ids"]["test"])
    picked = []
    for lesion in ("hypoechoic", "hyperechoic", "cyst", "none"):
        picked += [r for r in test if labels.get(r.image.name) == lesion][:1]
    data = SegDataset(picked, size)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.stack([data[i][1] for i in range(len(data))])
    preds = {}
    with torch.no_grad():
        for enc, model in models.items():
            preds[enc] = predict_mask(model(x)).numpy()
    cols = ["frame", "ground truth", *(encoders[e].split("@")[-1] for e in models)]
    fig, axes = plt.subplots(
        len(picked), len(cols), figsize=(2.3 * len(cols), 2.3 * len(picked)), squeeze=False
    )
    for i, rec in enumerate(picked):
        img = x[i, 0].numpy()
        masks = [None, y[i].numpy(), *(preds[e][i] for e in models)]
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


def _read_labels(path: Path) -> list[tuple[str, str]]:
    import csv

    return [(r["file"], r["lesion"]) for r in csv.DictReader(path.open())]


def step_analysis(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Embeddings of the corpus by random, distilled and teacher encoders; t-SNE + metrics."""
    from sonodistill.evaluate.analyze import AnalyzeConfig, analyze
    from sonodistill.evaluate.embed import EmbedConfig, embed

    teacher: TeacherConfig = state["teacher"]
    label = "DINOv3-random" if state["random_teacher"] else "DINOv3-ViT-B16"
    teacher_spec = {**dataclasses.asdict(teacher.spec()), "label": label}
    presets = sorted(p for p in (run / "corpus").iterdir() if p.is_dir())
    per_source = max(1, cfg.tsne_frames // max(len(presets), 1))
    encoders = [*_encoders(cfg, state).values(), teacher_spec]
    ecfg = EmbedConfig(
        sources=[f"{p.name}={p}" for p in presets],
        encoders=encoders,
        out=str(run / "embeddings"),
        image_size=state["img_size"],
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
    return f"{n} corpus frames, {len(encoders)} encoders, coloured by simulated anatomy"


def step_bench(cfg: DemoConfig, run: Path, state: dict) -> str:
    """Table 5 at a small input size: the real ViT-B/16 architecture vs the distilled student."""
    from sonodistill.deploy.bench import BenchConfig, bench

    encoders = _encoders(cfg, state)
    size = cfg.bench_size
    bench(
        BenchConfig(
            teacher="teacher:random@ViT-B/16 (DINOv3 architecture)",
            student=encoders["distilled"],
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
    Step("corpus", step_corpus, "simulate the unlabeled corpus"),
    Step("labelled", step_labelled, "simulate the labelled set"),
    Step("distill", step_distill, "distil the teacher into the student"),
    Step("evaluate", step_evaluate, "linear probe + fine-tune, random vs distilled"),
    Step("analysis", step_analysis, "embeddings and t-SNE of the corpus"),
    Step("bench", step_bench, "teacher vs student deployment cost (Table 5)"),
]


# --- driver ---------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> Path:
    """Run every step, record its status and time in demo.json, write report.html; the run dir."""
    import torch

    from sonodistill.report import build_report

    check_fields(cfg)
    for name in cfg.skip:
        if name not in [s.name for s in STEPS]:
            raise unknown_name("step", name, [s.name for s in STEPS], "--skip")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    teacher, img_size, random_teacher = resolve_teacher(cfg)
    if teacher.weights and not Path(teacher.weights).is_file():  # fail before minutes of work
        raise FileNotFoundError(f"teacher weights not found: {teacher.weights}")
    with claim_run_dir(run, "demo", MARKERS, overwrite=cfg.overwrite):
        if cfg.overwrite:
            remove_owned(run, OWNED)
        save_config(cfg, run / "demo.yaml")
        _run_steps(cfg, run, teacher, img_size, random_teacher)
        report = build_report(run)
    print(f"\nreport: {report}\nopen file://{report.resolve()} in a browser", flush=True)
    return run


def _run_steps(cfg: DemoConfig, run: Path, teacher, img_size: int, random_teacher: bool) -> None:
    state: dict = {"teacher": teacher, "img_size": img_size, "random_teacher": random_teacher}
    summary = _summary(cfg, teacher, img_size, random_teacher)
    _banner(random_teacher, teacher)
    for i, step in enumerate(s for s in STEPS if s.name not in cfg.skip):
        print(f"\n[{i + 1}/{len(STEPS) - len(cfg.skip)}] {step.name}: {step.about}", flush=True)
        start = time.perf_counter()
        record = {"name": step.name, "status": "ok", "detail": ""}
        try:
            record["detail"] = step.run(cfg, run, state)
        except Exception as err:  # one failing step must not hide the others' results
            record.update(status="failed", detail=f"{type(err).__name__}: {err}")
            log.error("step %s failed:\n%s", step.name, traceback.format_exc())
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"    {step.name}: {record['status']} in {record['seconds']:.1f} s  {record['detail']}",
            flush=True,
        )
        summary["steps"].append(record)
        write_json(run / "demo.json", summary)


def _summary(cfg: DemoConfig, teacher: TeacherConfig, img_size: int, random_teacher: bool) -> dict:
    import torch

    note = (
        "Teacher randomly initialised: the numbers show the mechanics only."
        if random_teacher
        else "Teacher: real DINOv3 weights."
    )
    return {
        "teacher": {
            "random": random_teacher,
            "source": teacher.weights or "random",
            "name": teacher.name,
            "model_kwargs": teacher.model_kwargs,
        },
        "note": note,
        "student": cfg.student,
        "img_size": img_size,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"cuda {torch.cuda.is_available()}",
        "steps": [],
    }


def _banner(random_teacher: bool, teacher: TeacherConfig) -> None:
    if random_teacher:
        print(
            f"teacher: randomly initialised small DINOv3 ({teacher.model_kwargs}); the numbers "
            f"will show the mechanics only. For the real ViT-B/16 pass --teacher.weights FILE "
            f"or set {WEIGHTS_ENV}.",
            flush=True,
        )
    else:
        print(
            f"teacher: DINOv3 {teacher.name} from {teacher.weights} at 224 px; on a CPU this "
            "run is much slower than the random-teacher demo.",
            flush=True,
        )


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
