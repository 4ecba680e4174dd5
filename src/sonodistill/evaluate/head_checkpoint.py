"""Saved downstream models ("heads"): a small, documented checkpoint format that `evaluate`
writes (`--save_models`) and `export` (and any deployment code) reads.

A head checkpoint is a folder with `model.safetensors` (the module's full state dict, loaded
strictly) and `head.yaml` saying what to build, in one of two forms:
- what `sonodistill evaluate` trains (`sonodistill.evaluate.heads.build_model`):
  `{task_type: seg|cls, encoder: {family: timm, name: resnet50, weights: random, ...}, protocol:
  finetune|linear, seg_decoder: unet|light, num_classes: 2, class_names: [...]}` (the encoder
  spec only names the architecture: every weight comes from model.safetensors, so a random
  initialisation is the portable choice; `random:resnet50` strings work too);
- plain libraries: `{task_type: cls, arch: resnet50, num_classes: 3, class_names: [...]}` ->
  `timm.create_model(arch, num_classes=...)`, or `{task_type: seg, smp: {arch: Unet,
  encoder_name: tu-resnet50, classes: 1}}` -> `segmentation_models_pytorch.create_model`; these
  take ImageNet-normalised input and are wrapped so that every head takes grey [0, 1] frames.

`save_head` writes the format from a module and its HeadSpec, `load_head` reads it back.
`HeadSpec`, `read_head_spec` and the file names are light (no torch): an ONNX deployment reads
a model folder's head.yaml without importing what builds the PyTorch module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import yaml

from sonodistill.config import Renamed, checked
from sonodistill.errors import UserError
from sonodistill.evaluate.config import ProtocolName
from sonodistill.io import write_bytes, write_text
from sonodistill.utils.fields import ImageSize, PositiveInt

if TYPE_CHECKING:
    from torch import nn

    from sonodistill.models.encoders import Encoder

HEAD_YAML = "head.yaml"
HEAD_WEIGHTS = "model.safetensors"
_TASK_TYPES = {"classification": "cls", "segmentation": "seg"}


@dataclass
class HeadSpec:
    """What a model folder's module is (its head.yaml)."""

    task_type: Literal["seg", "cls"]
    """seg | cls (segmentation | classification accepted and normalised)."""
    encoder: str | dict = ""
    """Encoder spec string, or EncoderSpec fields as a dict (see `portable_encoder`)."""
    protocol: ProtocolName = "finetune"
    """How the encoder was trained: linear (frozen, a linear layer on it) or finetune."""
    seg_decoder: str = "auto"
    """Fine-tuned segmentation decoder: unet, light (auto: the encoder family's default);
    checked when the module is built."""
    num_classes: PositiveInt = 2
    """Classes (segmentation: mask values, background included)."""
    class_names: list[str] = field(default_factory=list)
    """Class names, by index."""
    arch: str = ""
    """Plain timm classifier: its architecture."""
    smp: dict = field(default_factory=dict)
    """Plain segmentation_models_pytorch model: `smp.create_model` arguments."""
    image_size: ImageSize | None = None
    """Side of the square frames it was trained (or exported) at; `predict` resizes to it."""

    deprecated: ClassVar = (Renamed("task_type", values=_TASK_TYPES),)

    def __post_init__(self) -> None:
        self.task_type = _TASK_TYPES.get(self.task_type, self.task_type)


def build_head_model(spec: HeadSpec) -> nn.Module:
    """The (untrained) module of a head spec, taking grey (B, 1, H, W) frames in [0, 1]."""
    from sonodistill.evaluate.heads import WithPreprocess, build_model

    if spec.encoder:
        return build_model(
            spec.encoder, spec.task_type, spec.protocol, spec.num_classes, spec.seg_decoder
        )
    if spec.task_type == "cls" and spec.arch:
        import timm

        return WithPreprocess(
            timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes)
        )
    if spec.task_type == "seg" and spec.smp:
        import segmentation_models_pytorch as smp

        return WithPreprocess(smp.create_model(**{**spec.smp, "encoder_weights": None}))
    raise ValueError(f"head spec {spec}: give `encoder` (evaluate format), `arch` or `smp`")


def read_head_spec(folder: str | Path) -> HeadSpec:
    """The spec of a head checkpoint folder (its head.yaml), without building the model."""
    folder = Path(folder)
    if not (folder / HEAD_YAML).is_file():
        raise FileNotFoundError(f"{folder}: no {HEAD_YAML} (a head checkpoint folder)")
    path = folder / HEAD_YAML
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not a head description ({err})") from err
    if not isinstance(values, dict):
        raise UserError(f"{path}: not a head description (a mapping of HeadSpec fields)")
    return checked(HeadSpec, values, str(path))


def load_head(folder: str | Path) -> tuple[nn.Module, HeadSpec]:
    """The module of a model folder, every weight loaded strictly, in eval mode."""
    from sonodistill.evaluate.heads import WithPreprocess
    from sonodistill.models.weights import load_strict, read_state_dict

    folder = Path(folder)
    spec = read_head_spec(folder)
    model = build_head_model(spec)
    state = read_state_dict(folder / HEAD_WEIGHTS)
    # Plain library formats store the bare module, without the preprocessing wrapper.
    target = model.model if isinstance(model, WithPreprocess) else model
    load_strict(target, state, str(folder / HEAD_WEIGHTS))
    return model.eval(), spec


def save_head(model: nn.Module, spec: HeadSpec, folder: str | Path) -> Path:
    """The weights, then head.yaml: a folder with its head.yaml holds a whole head."""
    from safetensors.torch import save

    from sonodistill.evaluate.heads import WithPreprocess
    from sonodistill.models.weights import cpu_state_dict

    folder = Path(folder)
    module = model.model if isinstance(model, WithPreprocess) else model
    write_bytes(folder / HEAD_WEIGHTS, save(cpu_state_dict(module)))
    write_text(folder / HEAD_YAML, yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    return folder


def portable_encoder(encoder: Encoder) -> dict:
    """The encoder's architecture without its weights file (EncoderSpec fields).

    A head checkpoint holds every weight itself; naming the architecture alone keeps it
    loadable after the distill run dir or the teacher weights have moved.
    """
    return dataclasses.asdict(encoder.portable_spec())


def save_evaluate_head(
    model: nn.Module,
    task_type: str,
    protocol: str,
    num_classes: int,
    folder: str | Path,
    class_names: list[str] | tuple[str, ...] = (),
    image_size: int | None = None,
) -> Path:
    """Save a model built by `sonodistill.evaluate.heads.build_model`, e.g. from
    `run_one(..., on_end=lambda m: save_evaluate_head(m, task_type, ...))`."""
    spec = HeadSpec(
        task_type=task_type,
        encoder=portable_encoder(model.encoder),
        protocol=protocol,
        seg_decoder=getattr(model, "seg_decoder", "auto"),
        num_classes=num_classes,
        class_names=list(class_names),
        image_size=image_size,
    )
    return save_head(model, spec, folder)
