"""`sonodistill export`: a student backbone (or a fine-tuned head) to ONNX fp32 and int8,
each checked against PyTorch on real frames.

The exported graphs take grey frames (B, 1, S, S) in [0, 1] (normalisation is inside) with a
dynamic batch axis, and return the last feature map `features` (backbone) or `logits` (head).
Outputs in `out/`: `model_fp32.onnx`, `model_int8.onnx` (static QDQ, per-channel weights,
calibrated on real frames), with `--executorch '[int8]'` (or fp32) on-device ExecuTorch programs
`model_int8.pte` (XNNPACK; see `deploy.ondevice`), for a head its checkpoint in `head/` (so that
the folder alone serves `sonodistill predict` and `app` in every backend), `report.{md,json}`
and `config.yaml`. The exit code is 1 when the fp32 graph differs from PyTorch by more than
`tolerance`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from sonodistill.config import (
    NonNegativeInt,
    Opset,
    PositiveFloat,
    PositiveInt,
    check_fields,
    save_config,
)
from sonodistill.data.listing import FrameRef, collect_frames, frames_tensor
from sonodistill.data.masks import image_mask, mask_files
from sonodistill.deploy import ondevice
from sonodistill.deploy.onnx_utils import compare, export_onnx, quantize_int8, run_session, session
from sonodistill.deploy.runtimes import HEAD_DIR
from sonodistill.distill.run import load_encoder
from sonodistill.errors import UserError, check
from sonodistill.evaluate.head_checkpoint import HeadSpec, load_head, save_head
from sonodistill.evaluate.heads import WithPreprocess
from sonodistill.evaluate.metrics import dice_iou, predict_mask
from sonodistill.io import claim_run_dir, markdown_table, remove_owned, write_json, write_text
from sonodistill.models.encoders import Encoder

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """ONNX export (fp32 and int8) of an encoder or a fine-tuned head, checked on real frames."""

    encoder: str = ""
    """Encoder spec, e.g. student:RUN_DIR or timm:resnet50=W.safetensors (backbone export)."""
    head: str | None = None
    """A head checkpoint folder (head.yaml + model.safetensors); replaces `encoder`."""
    frames: list[str] = field(default_factory=list)
    """Real frames for calibration and checks: `NAME=PATH` sources as in `sonodistill embed`."""
    out: str = "runs/export"
    image_size: PositiveInt = 224
    opset: Opset = 18
    exporter: Literal["legacy", "dynamo"] = "legacy"
    int8: bool = True
    executorch: list[Literal["fp32", "int8"]] = field(default_factory=list)
    """On-device ExecuTorch programs (XNNPACK) to write beside the ONNX graphs: fp32, int8."""
    per_channel: bool = True
    calib_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    n_calib: PositiveInt = 32
    """Calibration frames (disjoint from the check frames)."""
    n_check: PositiveInt = 16
    test_set: str | None = None
    """Head only: a labelled folder (segmentation: images with masks, BUSI or image/+mask/
    layout; classification: one subfolder per class name) for the metric change."""
    n_test: PositiveInt = 64
    tolerance: PositiveFloat = 1e-3
    """Maximum abs difference allowed between fp32 ONNX and PyTorch."""
    threads: PositiveInt | None = None
    seed: NonNegativeInt = 0
    overwrite: bool = False
    """Replace an export already in OUT (its models, report and config)."""


OWNED = (
    "config.yaml",
    "model_fp32.onnx",
    "model_int8.onnx",
    "model_fp32.pte",
    "model_int8.pte",
    HEAD_DIR,
    "report.json",
    "report.md",
)
"""What an export folder's export consists of: `--overwrite` removes these and nothing else."""


def check_config(cfg: ExportConfig) -> None:
    """The options that need no file, before anything is read or written."""
    if not (cfg.encoder or cfg.head):
        raise UserError("give --encoder SPEC (a backbone) or --head FOLDER (a fine-tuned head)")
    if not cfg.frames:
        raise UserError("--frames: give real frames (--frames+ NAME=PATH) for the checks")
    check_fields(cfg)
    if cfg.test_set and not Path(cfg.test_set).exists():
        raise UserError(f"--test_set {cfg.test_set}: no such folder")
    if cfg.executorch and not ondevice.available():  # else found after the ONNX graphs
        raise UserError(f"--executorch {cfg.executorch}: {ondevice.INSTALL_HINT}")


def _calibrates(cfg: ExportConfig) -> bool:
    """Whether an int8 model (ONNX or ExecuTorch) needs calibration frames."""
    return cfg.int8 or "int8" in cfg.executorch


def _split_frames(cfg: ExportConfig):
    calibrates = _calibrates(cfg)
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
    """Export, quantize and check; returns the report (also written to out/report.json).

    The model and every frame are read (decoded), and all options checked, before anything is
    written;
    OUT is locked while the export runs, and an export already there needs --overwrite."""
    out = Path(cfg.out)
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.head:  # heads take grey [0, 1] frames already
        model, spec = load_head(cfg.head)
        source, output, exported = cfg.head, "logits", f"{spec.task_type} head"
    else:
        model, spec = WithPreprocess(load_encoder(cfg.encoder)).eval(), None
        source, output, exported = cfg.encoder, "features", "backbone"
    inner = model.model if isinstance(model, WithPreprocess) else model
    encoder = getattr(inner, "encoder", inner)
    if isinstance(encoder, Encoder):  # a library head (timm, smp) has its own size rules
        encoder.check_input_size(cfg.image_size, cfg.image_size, "--image_size")
    checked, calib = _split_frames(cfg)
    test = _test_frames(cfg, spec.task_type) if spec is not None and cfg.test_set else []
    decoded = _decode(cfg, spec, checked, calib, test)  # an unreadable frame: nothing written
    with claim_run_dir(out, "export", OWNED, overwrite=cfg.overwrite):
        if cfg.overwrite:
            remove_owned(out, OWNED)
        save_config(cfg, out / "config.yaml")
        if spec is not None:  # the head itself, so that the folder serves every backend
            save_head(model, replace(spec, image_size=cfg.image_size), out / HEAD_DIR)
        what = (source, output, exported)
        return _export(cfg, out, model, spec, what, checked, calib, test, decoded)


def _decode(cfg: ExportConfig, spec, checked, calib, test) -> dict:
    """The check, calibration and test frames (and test targets) as arrays."""
    size = cfg.image_size
    return {
        "check": frames_tensor(checked, size),
        "calib": frames_tensor(calib, size).numpy() if calib else None,
        "test": frames_tensor(test, size) if test else None,
        "targets": test_set_targets(test, spec, size) if test else None,
    }


def _export(cfg: ExportConfig, out: Path, model, spec, what, checked, calib, test, decoded) -> dict:
    source, output, exported = what
    x_check, x_calib = decoded["check"], decoded["calib"]
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

    paths = {
        "fp32": export_onnx(
            model, out / "model_fp32.onnx", cfg.image_size, cfg.opset, cfg.exporter, (output,)
        )
    }
    if cfg.int8:
        paths["int8"] = quantize_int8(
            paths["fp32"], out / "model_int8.onnx", x_calib, cfg.per_channel, cfg.calib_method
        )
    runners = {
        k: partial(run_session, session(p, cfg.threads), batch_size=len(checked))  # != export's
        for k, p in paths.items()
    }
    if cfg.executorch:
        runners.update(_executorch(cfg, model, out, paths, x_calib))
    for kind, runner in runners.items():
        got = runner(x_check.numpy())
        report["models"][kind] = {
            "file": paths[kind].name,
            "size_mb": round(paths[kind].stat().st_size / 2**20, 2),
            **compare(reference, got),
        }
    report["fp32_ok"] = report["models"]["fp32"]["max_abs"] <= cfg.tolerance

    if test:
        x_test, targets = decoded["test"], decoded["targets"]
        name, base = head_metric(spec, _torch_outputs(model, x_test), targets)
        report["test"] = {"set": cfg.test_set, "n": len(test), "metric": name, "torch": base}
        report["test"]["files"] = [f.file for f in test]
        for kind, runner in runners.items():
            _, value = head_metric(spec, runner(x_test.numpy()), targets)
            report["test"][kind] = value
            report["test"][f"{kind}_delta"] = value - base

    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    return report


def _executorch(cfg: ExportConfig, model: nn.Module, out: Path, paths: dict, x_calib) -> dict:
    """ExecuTorch programs of `model`, run in ExecuTorch's runtime for the checks."""
    from sonodistill.deploy.ondevice import PteRunner, export_pte

    runners = {}
    for kind in cfg.executorch:
        path = out / f"model_{kind}.pte"
        log.info("ExecuTorch %s: exporting %s", kind, path)
        quantize = kind == "int8"
        paths[f"executorch_{kind}"] = export_pte(
            model, path, cfg.image_size, x_calib if quantize else None, quantize
        )
        runners[f"executorch_{kind}"] = PteRunner(path, cfg.threads)
    return runners


def report_markdown(report: dict) -> str:
    lines = [
        f"# Export of {report['source']}",
        "",
        f"{report['exported']}, input (B, 1, {report['image_size']}, {report['image_size']}) grey "
        f"[0, 1], output {report['output']}, opset {report['opset']} ({report['exporter']}); "
        f"checked on {report['check_frames']} real frames ({', '.join(report['datasets'])}), "
        f"int8 calibrated on {report['calib_frames']} others.",
        "",
    ]
    rows = [
        {
            "model": kind,
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
    lines += ["", f"fp32 {verdict} tolerance {report['tolerance']:g} of PyTorch."]
    if "test" in report:
        t = report["test"]
        lines += ["", f"{t['metric']} on {t['n']} images of {t['set']}: torch {t['torch']:.4f}"]
        for kind in report["models"]:
            lines.append(f"- {kind}: {t[kind]:.4f} ({t[f'{kind}_delta']:+.4f})")
    return "\n".join(lines) + "\n"
