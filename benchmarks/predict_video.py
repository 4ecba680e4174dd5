"""`sonodistill predict` on one real cine loop: frames per second and the per-stage split for a
ResNet-18 and a ResNet-50 U-Net at 256 px, PyTorch vs ONNX Runtime int8 vs ExecuTorch int8.

Each U-Net is fine-tuned for a few steps on BUSI (so that its masks look like masks and the
post-processing does real work), exported (`sonodistill export --model`, int8 calibrated on
BUSI and lung frames), then for every backend, in alternation over `--rounds` rounds:
- the whole pipeline (`predict`: decode, preprocess, model, post-processing with mask PNGs,
  overlay MP4 and CSV), and
- the model alone on the same preprocessed frames,
so that "outside the model / model" compares the pipeline's wall time with the model's own
time measured under the same load. Then, untimed, each backend once more with `--check_torch
true --smoothing 0.5`: the Dice of its masks with PyTorch's, and frame-to-frame stability
with and without the smoothing. Usage:
    python benchmarks/predict_video.py [--clip FILE] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sonodistill.data.masks import image_mask
from sonodistill.data.readers import read_frames
from sonodistill.deploy.export import ExportConfig, export
from sonodistill.deploy.pipeline import FramePredictor
from sonodistill.deploy.predict import PredictConfig, predict
from sonodistill.deploy.runtimes import BACKENDS, open_model_folder, open_runner
from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, save_head

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUSI = DATA / "busi" / "Dataset_BUSI_with_GT"
CLIP = DATA / "corpus" / "covid_blues" / "lus_videos" / "patient_10_L1.mp4"


def fine_tune(arch: str, size: int, steps: int, folder: Path, train_size: int) -> Path:
    """A U-Net head fine-tuned briefly on BUSI lesions at `train_size` px, saved for `size` px
    input (a CNN learns the scale it is trained at: equal sizes give real masks)."""
    files = [f for f in sorted((BUSI / "benign").glob("*.png")) if "_mask" not in f.name][:64]
    grey = [Image.open(f).convert("L").resize((train_size, train_size)) for f in files]
    x = torch.from_numpy(np.stack([np.asarray(g) for g in grey])).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.stack([image_mask(f, train_size) for f in files])).float()
    y = y.unsqueeze(1)
    spec = HeadSpec(
        task_type="seg",
        encoder=f"random:{arch}",
        num_classes=2,
        class_names=["background", "lesion"],
        image_size=size,
    )
    model = build_head_model(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared cores two OpenMP threads train ~10x slower
    for _ in range(steps):
        idx = torch.randint(0, len(x), (4,))
        logits = model(x[idx])
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y[idx]).sum() + 1) / (p.sum() + y[idx].sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y[idx]) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return save_head(model.eval(), spec, folder)


def model_only(folder, backend: str, size: int, clip: Path, threads: int, n: int) -> float:
    """Seconds per frame of the model alone on the clip's preprocessed frames."""
    runner = open_runner(folder, backend, threads)
    pre = FramePredictor(runner, folder.spec, size)
    xs = [pre.preprocess(f) for i, f in read_frames(clip) if i < n]
    for x in xs[:3]:
        runner(x)
    t0 = time.perf_counter()
    for x in xs:
        runner(x)
    return (time.perf_counter() - t0) / len(xs)


def run(args: argparse.Namespace, model: Path, backend: str, out: Path, **extra) -> dict:
    """`predict` of the clip with `model` on `backend`, replacing `out`."""
    cfg = PredictConfig(
        inputs=[str(args.clip)],
        model=str(model),
        backend=backend,
        out=str(out),
        threads=args.threads,
        max_frames=args.max_frames,
        overwrite=True,
        progress=False,
        **extra,
    )
    return predict(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=CLIP)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--backends", nargs="+", default=["torch", "ort_int8", "executorch_int8"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=None, help="default: --size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep heads/exports here")
    parser.add_argument("--prepare", action="store_true", help="only fine-tune and export")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    rows, checks = [], []
    for arch in args.archs:
        head = work / f"{arch}_head"
        if not (head / "head.yaml").is_file():
            train_size = args.train_size or args.size
            print(f"fine-tuning {arch} U-Net ({args.steps} steps at {train_size} px)")
            fine_tune(arch, args.size, args.steps, head, train_size)
        exp = work / f"{arch}_export"
        if not (exp / "model_int8.pte").is_file():
            print(f"exporting {arch}")
            export(
                ExportConfig(
                    model=str(head),
                    out=str(exp),
                    image_size=args.size,
                    frames=[f"busi={BUSI}", f"lung={args.clip.parent}"],
                    n_calib=32,
                    n_check=8,
                    backends=["ort_fp32", "ort_int8", "executorch_int8"],
                    threads=args.threads,
                )
            )
        if args.prepare:
            continue
        folder = open_model_folder(exp)
        n = args.max_frames or 10**9
        results: dict[str, dict] = {
            b: {"pipe": [], "model": [], "summary": None} for b in args.backends
        }
        for r in range(args.rounds):
            for backend in args.backends if r % 2 == 0 else args.backends[::-1]:
                summary = run(args, exp, backend, work / f"out_{arch}_{backend}")
                t = summary["timing"]
                results[backend]["pipe"].append(t["wall_s"] / t["frames"])
                results[backend]["summary"] = summary
                results[backend]["model"].append(
                    model_only(folder, backend, args.size, args.clip, args.threads, n)
                )
        for backend in args.backends:  # untimed: agreement with PyTorch, stability
            summary = run(
                args,
                exp,
                backend,
                work / f"check_{arch}_{backend}",
                smoothing=0.5,
                check_torch=backend != "torch",
            )
            agree = summary.get("agreement_with_torch", {})
            stability = summary.get("stability", {})
            checks.append(
                f"- {arch} U-Net, {BACKENDS.get(backend).label}: "
                + (
                    f"mask Dice with PyTorch {agree['pooled']:.4f} pooled over "
                    f"{agree['frames']} frames (per frame: mean {agree['mean']:.4f}, "
                    f"min {agree['min']:.4f}); "
                    if agree
                    else ""
                )
                + f"stability (Dice of consecutive masks) {stability.get('raw', float('nan')):.4f}"
                f" raw, {stability.get('smoothed') or float('nan'):.4f} with smoothing 0.5"
            )
        for backend, res in results.items():
            t = res["summary"]["timing"]
            pipe, alone = statistics.median(res["pipe"]), statistics.median(res["model"])
            rows.append(
                {
                    "net": f"{arch} U-Net",
                    "backend": BACKENDS.get(backend).label,
                    "frames": t["frames"],
                    "fps": 1 / pipe,
                    "fps_model": 1 / alone,
                    **{k: v for k, v in t["ms_per_frame"].items()},
                    "outside": pipe / alone - 1,
                    "outside_stages": t["outside_model_vs_model"],
                }
            )
    if args.prepare:
        return
    env = res["summary"]["environment"]
    print(
        f"\n{args.clip.name}, {args.size} px, {args.threads} threads on {env['cpu']}; "
        f"medians of {args.rounds} rounds (pipeline and model alone alternate)\n"
    )
    print(
        "| model | backend | frames/s end to end | frames/s model alone | decode ms | "
        "preprocess ms | model ms | postprocess ms | outside model / model |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['net']} | {r['backend']} | {r['fps']:.1f} | {r['fps_model']:.1f} | "
            f"{r['decode']:.2f} | {r['preprocess']:.2f} | {r['model']:.2f} | "
            f"{r['postprocess']:.2f} | {r['outside']:+.1%} |"
        )
    print("\n" + "\n".join(checks))


if __name__ == "__main__":
    main()
