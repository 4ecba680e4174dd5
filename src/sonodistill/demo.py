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

import json
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sonodistill.models.teacher import WEIGHTS_ENV, TeacherConfig

log = logging.getLogger(__name__)

# A DINOv3 architecture (RoPE, registers, q/v biases) small enough to distil from on a laptop CPU.
TINY_TEACHER = {"embed_dim": 192, "depth": 4, "num_heads": 3}


def _tiny_teacher() -> TeacherConfig:
    return TeacherConfig(random_init=True, model_kwargs=dict(TINY_TEACHER))


@dataclass
class DemoConfig:
    """The demo's knobs; defaults fit about five minutes on two CPU cores."""

    out: str = "runs/demo"
    """Run folder (overwritten step by step)."""
    seed: int = 0
    corpus_frames: int = 480
    """Unlabeled simulated frames for distillation (and the t-SNE)."""
    labelled_frames: int = 200
    """Labelled frames (lesion masks + lesion type) for the downstream tasks."""
    img_size: int = 96
    """Frame size and distillation input size (224 with a real ViT-B/16 teacher)."""
    teacher: TeacherConfig = field(default_factory=_tiny_teacher)
    """Teacher: a random tiny DINOv3 unless weights are given (then the real ViT-B/16)."""
    student: str = "resnet18"
    """Student architecture (any timm CNN)."""
    distill_steps: int = 150
    batch_size: int = 32
    eval_epochs: int = 6
    """Epochs of each downstream run (linear probe and fine-tune)."""
    tsne_frames: int = 240
    """Corpus frames embedded for the t-SNE."""
    bench_runs: int = 10
    """Timed forward passes per model in the bench."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    skip: list[str] = field(default_factory=list)
    """Steps to skip, e.g. [bench, analysis]."""


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
    teacher = TeacherConfig(**{**cfg.teacher.__dict__, "weights": str(weights),
                               "random_init": False, "model_kwargs": kwargs})
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
        write_labelled(run / "labelled", cfg.labelled_frames, state["img_size"], cfg.seed + 1,
                       advance)
    return f"{cfg.labelled_frames} frames with lesion masks and 4 lesion types"


def step_distill(cfg: DemoConfig, run: Path, state: dict) -> str:
    from sonodistill.distill import DistillConfig, distill
    from sonodistill.models import StudentConfig

    dcfg = DistillConfig(
        data=str(run / "corpus"), out=str(run / "distill"), teacher=state["teacher"],
        student=StudentConfig(name=cfg.student), img_size=state["img_size"],
        batch_size=cfg.batch_size, max_steps=cfg.distill_steps, seed=cfg.seed,
        accelerator="auto", num_workers=0, log_every=5, checkpoint_every=10**9,
    )
    state["distill_dir"] = Path(distill(dcfg))
    return f"{cfg.distill_steps} steps of batch {cfg.batch_size}, {cfg.student} student"


STEPS = [
    Step("corpus", step_corpus, "simulate the unlabeled corpus"),
    Step("labelled", step_labelled, "simulate the labelled set"),
    Step("distill", step_distill, "distil the teacher into the student"),
]


# --- driver ---------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig) -> Path:
    """Run every step, record its status and time in demo.json, write report.html; the run dir."""
    import torch

    from sonodistill.config import save_config
    from sonodistill.report import build_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "demo.yaml")
    teacher, img_size, random_teacher = resolve_teacher(cfg)
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
        print(f"    {step.name}: {record['status']} in {record['seconds']:.1f} s  "
              f"{record['detail']}", flush=True)
        summary["steps"].append(record)
        (run / "demo.json").write_text(json.dumps(summary, indent=2))
    report = build_report(run)
    print(f"\nreport: {report}\nopen file://{report.resolve()} in a browser", flush=True)
    return run


def _summary(cfg: DemoConfig, teacher: TeacherConfig, img_size: int, random_teacher: bool) -> dict:
    import torch

    note = (
        "Teacher randomly initialised: the numbers show the mechanics only."
        if random_teacher else "Teacher: real DINOv3 weights."
    )
    return {
        "teacher": {"random": random_teacher, "source": teacher.weights or "random",
                    "name": teacher.name, "model_kwargs": teacher.model_kwargs},
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
        print(f"teacher: randomly initialised small DINOv3 ({teacher.model_kwargs}); the numbers "
              f"will show the mechanics only. For the real ViT-B/16 pass --teacher.weights FILE "
              f"or set {WEIGHTS_ENV}.", flush=True)
    else:
        print(f"teacher: DINOv3 {teacher.name} from {teacher.weights} at 224 px; on a CPU this "
              "run is much slower than the random-teacher demo.", flush=True)


class _bar:
    """A progress bar with ETA; `with _bar(text, total) as advance: advance()`."""

    def __init__(self, description: str, total: int):
        from sonodistill.progress import progress_bar

        self.progress = progress_bar()
        self.task = self.progress.add_task(description, total=total, info="")

    def __enter__(self) -> Callable[[], None]:
        self.progress.start()
        return lambda: self.progress.advance(self.task)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def main(argv: list[str] | None = None) -> int:
    from sonodistill.config import parse_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(DemoConfig, list(argv or []), prog="sonodistill demo",
                       description=__doc__.splitlines()[0])
    run = run_demo(cfg)
    summary = json.loads((run / "demo.json").read_text())
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    if failed:
        print(f"steps failed: {', '.join(failed)} (see the log above)")
    return 1 if failed else 0
