"""Images/s of the full distillation loop vs the models alone, measured side by side.

Full loop: `sonodistill.distill.distill` on real frames (decode, batched augmentation, mixup,
teacher forward, student forward/backward, AdamW). Models alone: teacher forward + student
forward/backward + AdamW on ready tensors of the same batch. Their ratio shows what the data
pipeline costs. Usage:
    python benchmarks/distill_step.py [--teacher vitb|tiny] [--student resnet50] [--img-size 224]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import av
import torch

from sonodistill.distill import DistillConfig, distill, read_metrics, token_mse
from sonodistill.distill.recipe import resolve_precision
from sonodistill.models import Student, StudentConfig, Teacher, TeacherConfig, to_model_input

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "covid_blues"


def extract_frames(out: Path, n_clips: int = 8, every: int = 4) -> Path:
    for clip in sorted((DATA / "lus_videos").glob("*.mp4"))[:n_clips]:
        with av.open(str(clip)) as video:
            for i, frame in enumerate(video.decode(video=0)):
                if i % every == 0:
                    frame.to_image().convert("L").save(out / f"{clip.stem}_{i:03d}.png")
    return out


def teacher_config(kind: str) -> TeacherConfig:
    kwargs = {} if kind == "vitb" else {"embed_dim": 192, "depth": 4, "num_heads": 3}
    return TeacherConfig(random_init=True, model_kwargs=kwargs)  # speed does not need weights


def models_alone(args, steps: int, precision: str) -> float:
    torch.manual_seed(0)
    teacher = Teacher(teacher_config(args.teacher))
    student = Student(StudentConfig(name=args.student), teacher.out_channels)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)
    x = to_model_input(torch.rand(args.batch, 1, args.img_size, args.img_size))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, student = teacher.to(device), student.to(device)
    x = x.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            target = teacher(x)
            pred = student(x, target.shape[-2:])
        token_mse(pred, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * args.batch / (time.perf_counter() - start)


def full_loop(args, data: Path, out: Path, steps: int) -> float:
    cfg = DistillConfig(
        data=str(data),
        out=str(out),
        teacher=teacher_config(args.teacher),
        student=StudentConfig(name=args.student),
        image_size=args.img_size,
        batch_size=args.batch,
        max_steps=2 * steps,
        log_every=steps,
        checkpoint_every=10**9,
        num_workers=args.workers,
        precision=args.precision,
    )
    distill(cfg)
    rows = read_metrics(out).dropna(subset=["images_per_s"])
    return float(rows[rows.step == 2 * steps].images_per_s.iloc[0])  # 2nd window: warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", choices=["vitb", "tiny"], default="tiny")
    parser.add_argument("--student", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = (
            extract_frames(Path(tmp) / "frames") if (Path(tmp) / "frames").mkdir() is None else None
        )
        loop = full_loop(args, data, Path(tmp) / "run", args.steps)
        precision = resolve_precision(args.precision)
        alone = models_alone(args, args.steps, precision)
        other = "bf16-mixed" if precision == "32-true" else "32-true"
        alone_other = models_alone(args, args.steps, other)
    print(
        f"\nteacher {args.teacher}, student {args.student}, {args.img_size}px, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, {args.workers} workers"
    )
    print("| measurement | precision | images/s |\n|---|---|---|")
    print(f"| full loop (real frames, augmentation, mixup) | {precision} | {loop:.2f} |")
    print(f"| models alone (ready tensors) | {precision} | {alone:.2f} |")
    print(f"| models alone (ready tensors) | {other} | {alone_other:.2f} |")
    print(f"| ratio full loop / models alone | {precision} | {loop / alone:.2f} |")
    print(f"| ratio {other} / {precision}, models alone | | {alone_other / alone:.2f} |")


if __name__ == "__main__":
    main()
