"""Two teachers that know different things, one student: does distilling both beat either alone?

    python benchmarks/multi_teacher.py [--out runs/bench_multi_teacher] [--steps 60]
                                       [--seeds 0 1 2] [--threads 2]

The simulated world (`sonodistill.data.simulator`) and two simulated pretrained teachers
(`sonodistill.models.simulated_teacher`, from the cache or trained once, about a minute each):
one that knows lesions (`knows=lesions`), one that knows layers and anatomy (`knows=layers`),
both trained on muscle and abdomen frames only. Three ResNet-18 students are distilled with the
same settings on unlabeled frames of every preset: from the lesion teacher, from the layer
teacher, and from both (`--teachers`, one head each, PHI-S standardisation for all three so
that only the teachers differ). Then linear probes on frozen features (`evaluate.train.run_one`)
on two downstream tasks of the presets no teacher saw (breast, thyroid):

    lesion   segment the lesion (Dice over the test frames)
    layer    segment the second tissue layer under the skin (Dice)

Writes into --out: `multi_teacher.{md,csv}` (Dice, mean [95 % bootstrap interval over test
images], for a random ResNet-18 and each student) and `comparisons.{md,csv}` (both-teacher
student minus each single-teacher student: paired mean difference, its 95 % paired bootstrap
interval, Wilcoxon signed-rank p, Holm-adjusted over the comparisons), and prints the machine.
Re-running reuses the world, the students and nothing else.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sonodistill.data.simulator import SimConfig, simulate_frame, write_corpus, write_png
from sonodistill.distill import DistillConfig, OptimConfig, distill
from sonodistill.distill.run import read_metrics
from sonodistill.evaluate.datasets import load_seg_folder
from sonodistill.evaluate.splits import SplitConfig, load_or_make_splits
from sonodistill.evaluate.stats import holm, interval, paired
from sonodistill.evaluate.train import TrainSettings, run_one
from sonodistill.io import write_table
from sonodistill.models import StudentConfig
from sonodistill.models.simulated_teacher import ARCH, SimTeacherConfig, simulated_teacher

SIZE = SimTeacherConfig().image_size  # the teachers' frame size (128 px, an 8 x 8 token grid)
HELD_OUT = ["breast", "thyroid"]  # presets no teacher saw
LAYER = 1  # the layer the `layer` task segments: the second under the skin
STUDENTS = {
    "R18-Lesion": ["lesions"],
    "R18-Layer": ["layers"],
    "R18-Lesion+Layer": ["lesions", "layers"],
}
RANDOM = "R18-Rand"


def machine() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, load average {load}"
    )


def world(out: Path, frames: int, labelled: int) -> tuple[Path, dict[str, Path]]:
    """Unlabeled frames of every preset; lesion and layer masks of the held-out presets."""
    corpus = out / "corpus"
    if not corpus.is_dir():
        write_corpus(corpus, frames, SIZE, seed=0)
    tasks = {"lesion": out / "lesion", "layer": out / "layer"}
    if not tasks["lesion"].is_dir():
        cfg = SimConfig(size=SIZE)
        for i in range(labelled):
            preset = HELD_OUT[i % len(HELD_OUT)]
            frame = simulate_frame(1_000_003 + 7919 * i, preset, None, cfg)
            name = f"{i:05d}.png"
            for task, mask in (("lesion", frame.mask), ("layer", frame.layers == LAYER)):
                write_png(tasks[task] / "images" / name, frame.image)
                write_png(tasks[task] / "masks" / name, mask.astype(np.uint8) * 255)
    return corpus, tasks


def teacher_term(knows: str) -> dict:
    sim = SimTeacherConfig(knows=knows)
    encoder = {
        "family": "dinov3",
        "name": ARCH,
        "weights": str(simulated_teacher(sim)),
        "model_kwargs": sim.model_kwargs(),
    }
    return {"encoder": encoder, "label": knows}


def distil(out: Path, corpus: Path, label: str, knows: list[str], steps: int) -> Path:
    run = out / "students" / label
    if (run / "student_backbone.safetensors").is_file():
        return run
    cfg = DistillConfig(
        data=str(corpus),
        out=str(run),
        teachers=[teacher_term(k) for k in knows],
        standardize="phi_s",
        student=StudentConfig(name="resnet18"),
        optim=OptimConfig(lr=1e-3),
        image_size=SIZE,
        batch_size=32,
        max_steps=steps,
        seed=0,
        num_workers=0,
        log_every=5,
        checkpoint_every=10**9,
        overwrite=run.exists(),
    )
    return distill(cfg)


def probe(tasks: dict[str, Path], encoders: dict[str, str], seeds, epochs: int) -> dict:
    """{(task, encoder label): [run results over seeds]} of linear probes on frozen features."""
    settings = TrainSettings(
        seg_image_size=SIZE, epochs=epochs, seg_batch=16, lr=1e-3, restart_epochs=epochs
    )
    results = {}
    for task, folder in tasks.items():
        index = load_seg_folder(folder, name=f"sim-{task}-seg")
        splits = load_or_make_splits(
            index,
            folder.parent / f"splits_{task}.json",
            SplitConfig(seed=0, proportions=(0.6, 0.2, 0.2)),
            fractions=(),
        )
        for label, spec in encoders.items():
            results[(task, label)] = [
                run_one(index, splits, spec, "linear", 1.0, seed, settings) for seed in seeds
            ]
            dice = np.mean([r["test"]["dice"] for r in results[(task, label)]])
            print(f"{task} {label}: test Dice {dice:.3f}", flush=True)
    return results


def tables(out: Path, results: dict, runs: dict[str, Path], note: str) -> None:
    models = [RANDOM, *STUDENTS]
    rows = []
    for label in models:
        row = {"Model": label, "distill cosine (last)": "–"}  # a random init has none
        if label in runs:
            last = read_metrics(runs[label]).dropna(subset=["loss"]).iloc[-1]
            row["distill cosine (last)"] = f"{last['cosine']:.3f}"
        for task in ("lesion", "layer"):
            found = results[(task, label)]
            mean = float(np.mean(list(_per_image(found).values())))
            ci = interval(found, "dice")
            row[f"{task} Dice"] = f"{mean:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
        rows.append(row)
    write_table(rows, out / "multi_teacher", "Linear-probe Dice, held-out presets", note)
    both = "R18-Lesion+Layer"
    tests = [
        (task, ref, paired(results[(task, ref)], results[(task, both)], "dice"))
        for task in ("lesion", "layer")
        for ref in ("R18-Lesion", "R18-Layer")
    ]
    adjusted = holm([t[2]["p"] if not np.isnan(t[2]["p"]) else 1.0 for t in tests])
    comparisons = [
        {
            "task": task,
            "comparison": f"{both} - {ref}",
            "Dice difference [95% CI]": f"{r['delta']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]",
            "Wilcoxon p": f"{r['p']:.3g}",
            "Holm p": f"{p:.3g}",
            "test images": r["images"],
        }
        for (task, ref, r), p in zip(tests, adjusted, strict=True)
    ]
    write_table(comparisons, out / "comparisons", "Both teachers vs each alone (paired)", note)


def _per_image(found: list[dict]) -> dict[str, float]:
    from sonodistill.evaluate.stats import per_image_means

    return per_image_means(found, "dice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_multi_teacher")
    parser.add_argument("--steps", type=int, default=60, help="distillation steps per student")
    parser.add_argument("--frames", type=int, default=400, help="unlabeled corpus frames")
    parser.add_argument("--labelled", type=int, default=160, help="labelled frames per task")
    parser.add_argument("--epochs", type=int, default=8, help="linear-probe epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    corpus, tasks = world(out, args.frames, args.labelled)
    runs = {
        label: distil(out, corpus, label, knows, args.steps) for label, knows in STUDENTS.items()
    }
    encoders = {RANDOM: f"random:resnet18@{RANDOM}"}
    encoders |= {label: f"student:{run}@{label}" for label, run in runs.items()}
    results = probe(tasks, encoders, args.seeds, args.epochs)
    note = (
        f"Linear probes on frozen features, {len(args.seeds)} seeds, {args.epochs} epochs, test "
        f"frames of {' and '.join(HELD_OUT)} (presets no teacher saw); Dice mean over test "
        "frames [95% bootstrap interval over test frames]; comparisons: paired over the same "
        f"test frames, Holm over {4} tests. Students: ResNet-18, {args.steps} distillation steps "
        f"of 32 frames at {SIZE} px from {args.frames} unlabeled frames of every preset, PHI-S "
        f"standardised targets. Machine: {machine()}."
    )
    tables(out, results, runs, note)
    print((out / "multi_teacher.md").read_text())
    print((out / "comparisons.md").read_text())
    print(f"{time.perf_counter() - start:.0f} s; {machine()}")


if __name__ == "__main__":
    main()
