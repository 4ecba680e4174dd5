"""Start-up time of the CLI, this tree beside a baseline tree, side by side in one run.

Two measures, each in fresh processes, alternating the two trees round by round so that both
see the same machine load:
- `sonodistill CMD --help`, wall seconds per command;
- first frame: `sonodistill predict --max_frames 1` on one real PNG (BUSI) with a tiny U-Net
  (ResNet-18 at 64 px, random weights) exported once by this script, with the `ort_int8` and
  the `torch` backend: the whole command, from the interpreter's start to the written CSV.

The baseline is another checkout's `src` folder (e.g. a `git worktree` of main):

    git worktree add /tmp/main-tree main
    python benchmarks/startup.py --baseline /tmp/main-tree/src [--rounds 3]

Prints a Markdown table of medians and the ratio baseline / this tree (no timed assertion:
speed is measured here, not in tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGE = DATA / "busi" / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"
COMMANDS = [
    "",
    "corpus build",
    "distill",
    "evaluate",
    "embed",
    "analyze",
    "export",
    "bench",
    "predict",
    "app",
    "demo",
    "report",
]


def run(src: Path, argv: list[str], threads: int) -> float:
    """Wall seconds of `python -m sonodistill.cli ARGV` with `src` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sonodistill.cli", *argv], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{src}: sonodistill {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return seconds


def tiny_model(folder: Path, threads: int) -> Path:
    """A U-Net (random ResNet-18) saved as a model folder and exported (fp32 + int8 ONNX) with
    this tree; both trees read the same files."""
    code = f"""
from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, save_head
spec = HeadSpec(task_type="seg", encoder="random:resnet18", num_classes=2,
                class_names=["background", "lesion"], image_size=64)
save_head(build_head_model(spec).eval(), spec, {str(folder / "head")!r})
"""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    frames = f"busi={IMAGE.parent}"
    argv = ["export", "--model", str(folder / "head"), "--frames+", frames, "--image_size", "64"]
    argv += ["--n_calib", "4", "--n_check", "2", "--out", str(folder / "export")]
    run(HERE, argv, threads)
    return folder / "export"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another tree's src folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--commands", nargs="*", default=COMMANDS)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": HERE}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp, args.threads)
        cases = {
            f"`sonodistill {c} --help`".replace("  ", " "): [*c.split(), "--help"]
            for c in args.commands
        }
        for backend in ("ort_int8", "torch"):
            out = tmp / "predict"
            cases[f"first frame: `predict --backend {backend}`"] = [
                *("predict", "--inputs+", str(IMAGE), "--model", str(model)),
                *("--backend", backend, "--max_frames", "1", "--overwrite", "true"),
                *("--out", str(out)),
            ]
        times: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for case, argv in cases.items():
                for tree, src in trees.items() if round_ % 2 == 0 else reversed(trees.items()):
                    times.setdefault((case, tree), []).append(run(src, argv, args.threads))
    load = os.getloadavg()[0]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {load:.1f}, ")
    print(
        f"{args.threads} threads, {args.rounds} rounds; medians, wall seconds of a fresh process\n"
    )
    print("| command | baseline | this tree | baseline / this tree |")
    print("|---|---:|---:|---:|")
    for case in cases:
        a = statistics.median(times[(case, "baseline")])
        b = statistics.median(times[(case, "this tree")])
        print(f"| {case} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
