"""What distillation transfers in the simulated world: Table 4 and Table 6 in miniature.

    python benchmarks/transfer.py [--out runs/bench_transfer] [--steps 60] [--seeds 0 1]

The demo's world and teacher (`sonodistill.models.simulated_teacher`, from the cache or trained
once): unlabeled frames of every preset to distil from, lesion masks and types of the presets
the teacher never saw to evaluate on. Four students are distilled with the demo's settings,
augmentation `us` or `default` x mixup on or off (Table 6's rows; `us` with mixup is the
demo's student), then the demo's linear-probe suite (`sonodistill evaluate`) probes them,
random initialisation and the teacher with frozen features at 5-100 % of the labels (linear
probes: what the features hold, without fine-tuning noise). Re-running reuses the students.

Writes into --out:
    label_efficiency.{md,csv}   Dice / accuracy vs label fraction, mean [95 % interval] (Table 4)
    ablation.{md,csv}           the four students side by side (Table 6), last logged loss and
                                cosine of each distillation
    transfer.png                the label-efficiency curves with their intervals, and loss and
                                cosine over the distillation steps of the four students
    suite/                      the suite itself (tables, comparisons.md with paired tests)
and prints the machine (CPU model, threads, load) beside the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch

from sonodistill import demo
from sonodistill.data.simulator import write_corpus, write_labelled
from sonodistill.distill import DistillConfig, OptimConfig, distill
from sonodistill.distill.run import read_metrics
from sonodistill.evaluate.suite import run_suite
from sonodistill.io import write_table
from sonodistill.models import StudentConfig
from sonodistill.models.simulated_teacher import simulated_teacher, teacher_config

VARIANTS = {  # label (checked by the suite against each run's config): (augment, mixup)
    "R18-Distill-US-Mixup": ("us", True),
    "R18-Distill-US-NoMixup": ("us", False),
    "R18-Distill-Default-Mixup": ("default", True),
    "R18-Distill-Default-NoMixup": ("default", False),
}
RANDOM, TEACHER = "R18-Rand", demo.TEACHER_KINDS["simulated"]
DEMO = demo.DemoConfig()  # the world, the distillation and the probes are the demo's
TASKS = {"sim_lesion_seg": "dice", "sim_lesion_type": "acc"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


def world(out: Path, args) -> tuple[Path, Path]:
    """The demo's corpus (every preset) and labelled set (the presets the teacher never saw)."""
    corpus, labelled = out / "corpus", out / "labelled"
    if not corpus.is_dir():
        write_corpus(corpus, DEMO.corpus_frames, DEMO.image_size, DEMO.seed)
    if not labelled.is_dir():
        presets = demo.held_out_presets(DEMO)
        write_labelled(
            labelled, DEMO.labelled_frames, DEMO.image_size, DEMO.seed + 1, None, presets
        )
    return corpus, labelled


def distil(out: Path, corpus: Path, teacher, augment: str, mixup: bool, args) -> Path:
    """One student with the demo's distillation settings, `augment` and `mixup` set."""
    run = out / f"distill_{augment}_{'mixup' if mixup else 'nomixup'}"
    if (run / "student_backbone.safetensors").is_file():
        return run  # from an earlier call of this script
    cfg = DistillConfig(
        data=str(corpus),
        out=str(run),
        teacher=teacher,
        student=StudentConfig(name=DEMO.student),
        optim=OptimConfig(lr=DEMO.distill_lr),
        image_size=DEMO.image_size,
        augment=augment,
        mixup=mixup,
        batch_size=DEMO.batch_size,
        max_steps=args.steps,
        seed=DEMO.seed,
        num_workers=0,
        log_every=5,
        checkpoint_every=10**9,
        overwrite=run.exists(),
    )
    return distill(cfg)


def suite(out: Path, runs: dict[str, Path], teacher, args) -> Path:
    """The demo's linear-probe suite over random init, the four students and the teacher."""
    state = {"teacher": teacher, "kind": "simulated", "image_size": DEMO.image_size}
    state["distill_dir"] = runs["R18-Distill-US-Mixup"]
    cfg = dataclasses.replace(DEMO, fractions=args.fractions, linear_seeds=args.seeds)
    specs = demo.encoders(cfg, state)
    encoders = [specs["random"], *(f"student:{run}@{label}" for label, run in runs.items())]
    suite_cfg = demo.suite_config(cfg, out, state, "linear")
    suite_cfg = dataclasses.replace(
        suite_cfg,
        out=str(out / "suite"),
        encoders=[*encoders, specs["teacher"]],
        overwrite=(out / "suite").exists(),
    )
    run_suite(suite_cfg)
    return out / "suite" / "tables"


def cell(row) -> str:
    return f"{row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def cells(summary: pd.DataFrame, model: str, fractions) -> dict[str, str]:
    """A model's cells (mean [interval]) per task and label fraction; "–" where it did not run."""
    out = {}
    for task, metric in TASKS.items():
        for f in fractions:
            found = summary[
                (summary.model == model)
                & (summary.task == task)
                & (summary.metric == metric)
                & ((summary.fraction - f).abs() < 1e-9)
            ]
            out[f"{task} {metric} {f:.0%}"] = cell(found.iloc[0]) if len(found) else "–"
    return out


def label_efficiency(summary: pd.DataFrame, models: list[str], fractions) -> pd.DataFrame:
    rows = []
    for model in models:
        rows.append({"Model": model, **cells(summary, model, fractions)})
    return pd.DataFrame(rows)


def ablation(summary: pd.DataFrame, runs: dict[str, Path], fractions) -> pd.DataFrame:
    rows = []
    for label, run in runs.items():
        augment, mixup = VARIANTS[label]
        logged = read_metrics(run).dropna(subset=["loss"]).iloc[-1]
        row = {
            "Model": label,
            "Augmentation": augment,
            "Mixup": "✓" if mixup else "×",
            "last loss": f"{logged['loss']:.3f}",
            "last cosine": f"{logged['cosine']:.3f}",
        }
        rows.append({**row, **cells(summary, label, (min(fractions), max(fractions)))})
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    shown = {RANDOM: "tab:grey", "R18-Distill-US-Mixup": "tab:blue", TEACHER: "tab:green"}
    for ax, (task, metric) in zip(axes[:2], TASKS.items(), strict=True):
        for model, colour in shown.items():
            rows = summary[
                (summary.model == model) & (summary.task == task) & (summary.metric == metric)
            ].sort_values("fraction")
            ax.plot(rows.fraction, rows["mean"], "o-", color=colour, label=model)
            ax.fill_between(rows.fraction, rows.low, rows.high, color=colour, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction (linear probe)")
        ax.set_title(f"{task}: {metric}, 95% interval")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for ax, key in zip(axes[2:], ("loss", "cosine"), strict=True):
        for label, run in runs.items():
            rows = read_metrics(run).dropna(subset=["loss"])
            ax.plot(rows.step, rows[key], label=label)
        ax.set_xlabel("distillation step")
        ax.set_title(f"distillation {key} (training batches)")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_transfer")
    parser.add_argument("--steps", type=int, default=DEMO.distill_steps, help="distillation steps")
    parser.add_argument("--fractions", type=float, nargs="+", default=DEMO.fractions)
    parser.add_argument("--seeds", type=int, nargs="+", default=DEMO.linear_seeds)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    sim = DEMO.simulated_teacher
    teacher = teacher_config(simulated_teacher(sim), sim)
    corpus, _ = world(out, args)
    runs = {
        label: distil(out, corpus, teacher, augment, mixup, args)
        for label, (augment, mixup) in VARIANTS.items()
    }
    tables = suite(out, runs, teacher, args)
    summary = pd.read_csv(tables / "summary.csv")
    summary = summary[summary.protocol == "linear"]
    note = (
        f"Linear probes on frozen features, {len(args.seeds)} seeds, test images of "
        f"{' and '.join(demo.held_out_presets(DEMO))} (presets the teacher never saw; "
        "segmentation: Dice over the frames with a lesion); mean [95% bootstrap interval over "
        f"test images]. Students: ResNet-18, {args.steps} distillation steps of "
        f"{DEMO.batch_size} frames at {DEMO.image_size} px. Machine: {machine()}."
    )
    models = [RANDOM, "R18-Distill-US-Mixup", TEACHER]
    efficiency = label_efficiency(summary, models, sorted(args.fractions))
    write_table(
        efficiency, out / "label_efficiency", "Label efficiency (Table 4 in miniature)", note
    )
    table6 = ablation(summary, runs, sorted(args.fractions))
    write_table(table6, out / "ablation", "Augmentation and mixup (Table 6 in miniature)", note)
    plot(summary, runs, out / "transfer.png")
    print((out / "label_efficiency.md").read_text())
    print((out / "ablation.md").read_text())
    print((tables / "comparisons.md").read_text())
    print(f"{time.perf_counter() - start:.0f} s; {machine()}; figure: {out / 'transfer.png'}")


if __name__ == "__main__":
    main()
