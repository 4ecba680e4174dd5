"""Fine-tuned downstream models for export: a small, documented checkpoint format.

A head checkpoint is a folder with `model.safetensors` (the module's full state dict, loaded
strictly) and `head.yaml` saying what to build, in one of two forms:
- what `sonodistill evaluate` trains (`sonodistill.evaluate.heads.build_model`):
  `{task: seg|cls, encoder: random:resnet50, protocol: finetune|linear, num_classes: 2,
  class_names: [...]}` (the encoder spec only names the architecture: every weight comes from
  model.safetensors, so `random:ARCH` is the portable choice);
- plain libraries: `{task: cls, arch: resnet50, num_classes: 3, class_names: [...]}` ->
  `timm.create_model(arch, num_classes=...)`, or `{task: seg, smp: {arch: Unet,
  encoder_name: tu-resnet50, classes: 1}}` -> `segmentation_models_pytorch.create_model`; these
  take ImageNet-normalised input and are wrapped so that every head takes grey [0, 1] frames.

`save_head` writes the format from a module and its HeadSpec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from torch import nn

from sonodistill.models.encoders import EncoderSpec, parse_spec, resolve_student
from sonodistill.models.weights import load_strict, read_state_dict

HEAD_YAML = "head.yaml"
HEAD_WEIGHTS = "model.safetensors"
_TASKS = {"cls": "cls", "classification": "cls", "seg": "seg", "segmentation": "seg"}


@dataclass
class HeadSpec:
    task: str
    """seg | cls (segmentation | classification accepted)."""
    encoder: str | dict = ""
    """Encoder spec string, or EncoderSpec fields as a dict (see `portable_encoder`)."""
    protocol: str = "finetune"
    num_classes: int = 2
    class_names: list[str] = field(default_factory=list)
    arch: str = ""
    smp: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.task not in _TASKS:
            raise ValueError(f"head task must be seg or cls, not {self.task!r}")
        return _TASKS[self.task]


def build_head_model(spec: HeadSpec) -> nn.Module:
    """The (untrained) module of a head spec, taking grey (B, 1, H, W) frames in [0, 1]."""
    from sonodistill.deploy.onnx_utils import WithPreprocess

    if spec.encoder:
        from sonodistill.evaluate.heads import build_model

        encoder = EncoderSpec(**spec.encoder) if isinstance(spec.encoder, dict) else spec.encoder
        return build_model(encoder, spec.kind, spec.protocol, spec.num_classes)
    if spec.kind == "cls" and spec.arch:
        return WithPreprocess(
            timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes)
        )
    if spec.kind == "seg" and spec.smp:
        import segmentation_models_pytorch as smp

        return WithPreprocess(smp.create_model(**{**spec.smp, "encoder_weights": None}))
    raise ValueError(f"head spec {spec}: give `encoder` (evaluate format), `arch` or `smp`")


def load_head(folder: str | Path) -> tuple[nn.Module, HeadSpec]:
    folder = Path(folder)
    if not (folder / HEAD_YAML).is_file():
        raise FileNotFoundError(f"{folder}: no {HEAD_YAML} (see sonodistill.deploy.heads)")
    spec = HeadSpec(**yaml.safe_load((folder / HEAD_YAML).read_text()))
    model = build_head_model(spec)
    state = read_state_dict(folder / HEAD_WEIGHTS)
    target = model.model if _is_wrapped(model) else model  # plain formats store the bare module
    load_strict(target, state, str(folder / HEAD_WEIGHTS))
    return model.eval(), spec


def save_head(model: nn.Module, spec: HeadSpec, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEAD_YAML).write_text(yaml.safe_dump(spec.__dict__, sort_keys=False))
    module = model.model if _is_wrapped(model) else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / HEAD_WEIGHTS))
    return folder


def portable_encoder(encoder: EncoderSpec | str) -> dict:
    """The architecture of an encoder spec without its weights file (EncoderSpec fields).

    A head checkpoint holds every weight itself; naming the architecture alone keeps it
    loadable after the distill run dir or the teacher weights have moved.
    """
    spec = parse_spec(encoder) if isinstance(encoder, str) else encoder
    if spec.kind == "teacher":
        name = spec.name or "vit_base_patch16_dinov3_qkvb"
        kind, weights = "teacher", "random"
    else:
        name = (
            resolve_student(spec.weights, spec.name or None)[0]
            if spec.kind == "student"
            else (spec.name or "resnet50")
        )
        kind, weights = "random", None
    return {"kind": kind, "name": name, "weights": weights, "label": spec.label,
            "model_kwargs": dict(spec.model_kwargs)}  # fmt: skip


def save_evaluate_head(
    model: nn.Module,
    encoder: EncoderSpec | str,
    task: str,
    protocol: str,
    num_classes: int,
    folder: str | Path,
    class_names: list[str] | tuple[str, ...] = (),
) -> Path:
    """Save a model built by `sonodistill.evaluate.heads.build_model`, e.g. from
    `run_one(..., on_end=lambda m: save_evaluate_head(m, encoder, task, ...))`."""
    spec = HeadSpec(
        task=task,
        encoder=portable_encoder(encoder),
        protocol=protocol,
        num_classes=num_classes,
        class_names=list(class_names),
    )
    return save_head(model, spec, folder)


def _is_wrapped(model: nn.Module) -> bool:
    from sonodistill.deploy.onnx_utils import WithPreprocess

    return isinstance(model, WithPreprocess)


# --- metrics of a head's outputs ------------------------------------------------------------------


def predict_masks(logits: np.ndarray) -> np.ndarray:
    """(N, C, H, W) logits -> (N, H, W) class-index map (one logit: sigmoid > 0.5)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0.0).astype(np.int64)
    return logits.argmax(1)


def dice(pred: np.ndarray, target: np.ndarray, num_classes: int = 2) -> float:
    """Mean per-image Dice with `sonodistill evaluate`'s rule (both empty -> 1)."""
    from sonodistill.evaluate.metrics import dice_iou

    return float(dice_iou(pred.astype(np.int64), target.astype(np.int64), num_classes)[0].mean())


def head_metric(spec: HeadSpec, outputs: np.ndarray, targets: np.ndarray) -> tuple[str, float]:
    if spec.kind == "seg":
        classes = max(2, outputs.shape[1])
        return "dice", dice(predict_masks(outputs), targets, classes)
    return "accuracy", float((outputs.argmax(1) == targets).mean())


def test_set_targets(frames, spec: HeadSpec, size: int) -> np.ndarray:
    """Labels of test frames: class index (classification) or resized mask (segmentation)."""
    if spec.kind == "seg":
        return np.stack([read_mask(f.file, size) for f in frames])
    names = spec.class_names or sorted({Path(f.file).parent.name for f in frames})
    return np.array([names.index(Path(f.file).parent.name) for f in frames])


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def mask_files(image: str | Path) -> list[Path]:
    """Masks of an image: BUSI `X_mask.png`, `X_mask_1.png` ... beside it, or DDTI-style
    `.../image/N.PNG` -> `.../mask/N.PNG`."""
    image = Path(image)
    found = sorted(image.parent.glob(f"{image.stem}_mask*{image.suffix}"))
    if not found and image.parent.name.lower() in ("image", "images"):
        for name in ("mask", "masks"):
            candidate = image.parent.parent / name / image.name
            if candidate.is_file():
                found = [candidate]
                break
    return found


def read_mask(image: str | Path, size: int) -> np.ndarray:
    """Union of an image's masks, resized (nearest) to size x size, boolean."""
    from PIL import Image

    files = mask_files(image)
    if not files:
        raise FileNotFoundError(f"no mask found for {image}")
    union = None
    for f in files:
        with Image.open(f) as m:
            arr = np.asarray(m.convert("L").resize((size, size), Image.NEAREST)) > 0
        union = arr if union is None else union | arr
    return union
