"""`sonodistill export`: a student backbone (or a fine-tuned model) to every runtime asked,
each checked against PyTorch on real frames.

The written models take grey frames (B, 1, S, S) in [0, 1] (normalisation is inside) and
return the last feature map `features` (backbone) or `logits` (model); the ONNX graphs have a
dynamic batch axis, ExecuTorch programs batch 1. `--backends` picks the runtimes (registry
`deploy.runtimes.BACKENDS`; default ONNX Runtime fp32 and int8: `model_fp32.onnx`,
`model_int8.onnx`, static QDQ with per-channel weights calibrated on real frames; ExecuTorch
XNNPACK `model_{fp32,int8}.pte` on request, see `deploy.ondevice`). For a `--model`, the model
itself goes to `head/` (so that the folder alone serves `sonodistill predict` and `app` in
every backend). Also `report.{md,json}` and `config.yaml`. The exit code is 1 when an fp32
backend differs from PyTorch by more than `tolerance`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sonodistill.config import check_fields
from sonodistill.data.listing import FrameRef, collect_frames, frames_tensor
from sonodistill.data.masks import image_mask, mask_files
from sonodistill.deploy.config import ExportConfig, export_layout
from sonodistill.deploy.onnx_utils import compare
from sonodistill.deploy.runtimes import BACKENDS, HEAD_DIR, WriteJob
from sonodistill.errors import UserError, check
from sonodistill.evaluate.head_checkpoint import HeadSpec, load_head, save_head
from sonodistill.evaluate.heads import WithPreprocess
from sonodistill.evaluate.metrics import dice_iou, predict_mask
from sonodistill.io import markdown_table, write_json, write_text
from sonodistill.models.encoders import Encoder, build_encoder
from sonodistill.utils.rundir import RunDir

log = logging.getLogger(__name__)

__all__ = ["ExportConfig", "check_config", "export", "head_metric", "report_markdown"]


def check_config(cfg: ExportConfig) -> list[str]:
    """The options that need no file, before anything is read or written; returns the
    backends to write, in registry order."""
    if not (cfg.encoder or cfg.model):
        raise UserError("give --encoder SPEC (a backbone) or --model FOLDER (a fine-tuned model)")
    if cfg.encoder and cfg.model:
        raise UserError("--encoder and --model: give one (a backbone or a fine-tuned model)")
    if not cfg.frames:
        raise UserError("--frames: give real frames (--frames+ NAME=PATH) for the checks")
    check_fields(cfg)
    asked = {BACKENDS.canonical(name) for name in cfg.backends}
    names = [name for name in BACKENDS if name in asked]
    if not names:
        raise UserError("--backends []: give at least one backend to write")
    for name in names:
        record = BACKENDS.get(name)
        if record.write is None:
            raise UserError(
                f"--backends {name}: {record.label} runs the model itself, nothing to write "
                f"(an export of a --model keeps it in {HEAD_DIR}/)"
            )
        why = record.missing()  # else found after the other backends were written
        if why:
            raise UserError(f"--backends {name}: {why}")
    if cfg.test_set and not Path(cfg.test_set).exists():
        raise UserError(f"--test_set {cfg.test_set}: no such folder")
    RunDir(cfg.out, export_layout(), overwrite=cfg.overwrite).precheck()
    return names


def _calibrates(names: list[str]) -> bool:
    """Whether a backend asked needs calibration frames (an int8 one)."""
    return any(BACKENDS.get(name).int8 for name in names)


def _split_frames(cfg: ExportConfig, names: list[str]):
    calibrates = _calibrates(names)
    total = cfg.n_check + (cfg.n_calib if calibrates else 0)
    per_source = math.ceil(total / len(cfg.frames))
    frames = collect_frames(cfg.frames, per_source, seed=cfg.seed)
    asked = f"--n_check {cfg.n_check}" + (f" + --n_calib {cfg.n_calib}" if calibrates else "")
    check(len(frames) >= total, "--frames", " ".join(cfg.frames), f"{len(frames)} frames, {asked}")
    order = np.random.default_rng(cfg.seed).permutation(len(frames))
    frames = [frames[i] for i in order]
    return frames[: cfg.n_check], frames[cfg.n_check : total]


def _test_frames(cfg: ExportConfig, task_type: str) -> list[FrameRef]:
    frames = collect_frames([cfg.test_set], None, seed=cfg.seed)
    if task_type == "seg":
        frames = [f for f in frames if mask_files(f.file)]
    if not frames:
        raise UserError(f"--test_set {cfg.test_set}: no labelled images found")
    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(rng.choice(len(frames), min(cfg.n_test, len(frames)), replace=False))
    return [frames[i] for i in keep]


def test_set_targets(frames: list[FrameRef], spec: HeadSpec, size: int) -> np.ndarray:
    """Labels of test frames: class index (by the parent folder's name) or the union of the
    image's masks resized (nearest) to size x size."""
    if spec.task_type == "seg":
        return np.stack([image_mask(f.file, size) for f in frames])
    names = spec.class_names or sorted({Path(f.file).parent.name for f in frames})
    return np.array([names.index(Path(f.file).parent.name) for f in frames])


def head_metric(spec: HeadSpec, outputs: np.ndarray, targets: np.ndarray) -> tuple[str, float]:
    """Dice (`sonodistill evaluate`'s per-image rule) for segmentation, accuracy otherwise."""
    if spec.task_type == "seg":
        dice, _ = dice_iou(
            predict_mask(outputs), targets.astype(np.int64), max(2, outputs.shape[1])
        )
        return "dice", float(dice.mean())
    return "accuracy", float((outputs.argmax(1) == targets).mean())


@torch.inference_mode()
def _torch_outputs(model: nn.Module, frames: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    return np.concatenate(
        [model(frames[i : i + batch_size]).numpy() for i in range(0, len(frames), batch_size)]
    )


def export(cfg: ExportConfig) -> dict:
    """Write every backend asked, check each against PyTorch; returns the report (also
    written to out/report.json).

    The model and every frame are read (decoded), and all options checked, before anything is
    written; OUT is locked while the export runs, and an export already there needs
    --overwrite."""
    names = check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.model:  # models take grey [0, 1] frames already
        model, spec = load_head(cfg.model)
        source, output, exported = cfg.model, "logits", f"{spec.task_type} model"
    else:
        model, spec = WithPreprocess(build_encoder(cfg.encoder, "--encoder")).eval(), None
        source, output, exported = cfg.encoder, "features", "backbone"
    inner = model.model if isinstance(model, WithPreprocess) else model
    encoder = getattr(inner, "encoder", inner)
    if isinstance(encoder, Encoder):  # a library model (timm, smp) has its own size rules
        encoder.check_input_size(cfg.image_size, cfg.image_size, "--image_size")
    checked, calib = _split_frames(cfg, names)
    test = _test_frames(cfg, spec.task_type) if spec is not None and cfg.test_set else []
    decoded = _decode(cfg, spec, checked, calib, test)  # an unreadable frame: nothing written
    run = RunDir(cfg.out, export_layout(), overwrite=cfg.overwrite)
    with run.claim():
        run.clear()
        run.save_options(cfg)
        if spec is not None:  # the model itself, so that the folder serves every backend
            save_head(model, replace(spec, image_size=cfg.image_size), run / HEAD_DIR)
        what = (source, output, exported)
        return _export(cfg, run.path, names, model, spec, what, checked, calib, test, decoded)


def _decode(cfg: ExportConfig, spec, checked, calib, test) -> dict:
    """The check, calibration and test frames (and test targets) as arrays."""
    size = cfg.image_size
    return {
        "check": frames_tensor(checked, size),
        "calib": frames_tensor(calib, size).numpy() if calib else None,
        "test": frames_tensor(test, size) if test else None,
        "targets": test_set_targets(test, spec, size) if test else None,
    }


def _batched(runner, frames: np.ndarray, batch_size: int) -> np.ndarray:
    """A runner's outputs on frames in batches (of the check frames' count: not the export's
    dummy batch of 2, so that a batch axis that is not dynamic fails here)."""
    return np.concatenate(
        [runner(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]
    )


def _export(cfg, out: Path, names, model, spec, what, checked, calib, test, decoded) -> dict:
    source, output, exported = what
    x_check = decoded["check"]
    reference = _torch_outputs(model, x_check)
    report: dict = {
        "source": source,
        "exported": exported,
        "image_size": cfg.image_size,
        "opset": cfg.opset,
        "exporter": cfg.exporter,
        "output": f"{output} {list(reference.shape[1:])}",
        "check_frames": len(checked),
        "calib_frames": len(calib),
        "datasets": sorted({f.dataset for f in checked + calib}),
        "tolerance": cfg.tolerance,
        "models": {},
    }
    job = WriteJob(
        model,
        out,
        cfg.image_size,
        decoded["calib"],
        output,
        cfg.opset,
        cfg.exporter,
        cfg.per_channel,
        cfg.calib_method,
    )
    runners = {}
    for name in names:  # registry order: ort_int8 quantises the ort_fp32 graph written first
        record = BACKENDS.get(name)
        log.info("%s: writing %s", name, out / record.file)
        path = record.writer()(replace(job, path=out / record.file))
        job.written[name] = path
        runners[name] = record.opener()(path, cfg.threads)
        got = _batched(runners[name], x_check.numpy(), len(checked))
        report["models"][name] = {
            "label": record.label,
            "precision": record.precision,
            "file": path.name,
            "size_mb": round(path.stat().st_size / 2**20, 2),
            **compare(reference, got),
        }
    held = [m for m in report["models"].values() if m["precision"] == "fp32"]
    report["fp32_ok"] = all(m["max_abs"] <= cfg.tolerance for m in held)

    if test:
        x_test, targets = decoded["test"], decoded["targets"]
        name, base = head_metric(spec, _torch_outputs(model, x_test), targets)
        report["test"] = {"set": cfg.test_set, "n": len(test), "metric": name, "torch": base}
        report["test"]["files"] = [f.file for f in test]
        for backend, runner in runners.items():
            outputs = _batched(runner, x_test.numpy(), len(checked))
            _, value = head_metric(spec, outputs, targets)
            report["test"][backend] = value
            report["test"][f"{backend}_delta"] = value - base

    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    lines = [
        f"# Export of {report['source']}",
        "",
        f"{report['exported']}, input (B, 1, {report['image_size']}, {report['image_size']}) grey "
        f"[0, 1], output {report['output']}, opset {report['opset']} ({report['exporter']}); "
        f"checked on {report['check_frames']} real frames ({', '.join(report['datasets'])})"
        + (
            f", int8 calibrated on {report['calib_frames']} others."
            if report["calib_frames"]
            else "."
        ),
        "",
    ]
    rows = [
        {
            "backend": kind,
            "runtime": m["label"],
            "size (MB)": m["size_mb"],
            "max abs diff": f"{m['max_abs']:.3g}",
            "mean abs diff": f"{m['mean_abs']:.3g}",
            "cosine mean": f"{m['cosine_mean']:.6f}",
            "cosine min": f"{m['cosine_min']:.6f}",
        }
        for kind, m in report["models"].items()
    ]
    lines.append(markdown_table(rows, floatfmt="g"))
    verdict = "within" if report["fp32_ok"] else "OUTSIDE"
    lines += ["", f"fp32 backends {verdict} tolerance {report['tolerance']:g} of PyTorch."]
    if "test" in report:
        t = report["test"]
        lines += ["", f"{t['metric']} on {t['n']} images of {t['set']}: torch {t['torch']:.4f}"]
        for kind in report["models"]:
            lines.append(f"- {kind}: {t[kind]:.4f} ({t[f'{kind}_delta']:+.4f})")
    return "\n".join(lines) + "\n"
