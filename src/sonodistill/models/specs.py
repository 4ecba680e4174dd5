"""What an encoder is, without building it: specs, the family registry, the student and teacher
configs and the files of a distill run folder. Light (no torch): configs and `--help` read it.

    EncoderSpec.parse("dinov3-convnext:convnext_tiny=FILE@ConvNeXt-T")   # THE checked constructor
    FAMILIES.get("timm")                                                 # the Encoder subclass

Spec strings: `FAMILY:NAME=FILE@LABEL`, or `FAMILY:FILE@LABEL` for the family's default
architecture, with FILE = `random` for a random initialisation:

- `timm:resnet50=W.safetensors`, `random:resnet50` (a random timm CNN);
- `dinov3:FILE`, `dinov3:vit_large_patch16_dinov3_qkvb=FILE`; `teacher:FILE` is the same family,
  and `teacher:` alone reads $SONODISTILL_TEACHER_WEIGHTS;
- `dinov3-convnext:convnext_tiny=FILE`, `sam2:sam2_hiera_base_plus=FILE`,
  `vit:beit_base_patch16_224=FILE` (with `options: {key_map: ...}` in the mapping form);
- `student:RUN_DIR`: a distilled student (any family), read from its run folder; `student:
  NAME=FILE` for a bare backbone file.

A family is an `Encoder` subclass registered where it is defined (`@FAMILIES.register("timm")`);
plugins add theirs through the `sonodistill.plugins` entry points or `--import` (see
`sonodistill.registry`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from sonodistill.config import Renamed, checked
from sonodistill.errors import UserError, unknown_name
from sonodistill.registry import Registry
from sonodistill.utils.fields import NonNegativeInt, PositiveFloat, PositiveInt, registered

RANDOM = "random"
"""The weights value that asks for a random initialisation (smoke runs, architecture-only specs)."""
DEFAULT_STUDENT = "resnet50"
"""The student architecture of the paper (and of `sonodistill distill`)."""

WEIGHTS_ENV = "SONODISTILL_TEACHER_WEIGHTS"
WEIGHTS_HELP = (
    "DINOv3 teacher weights are needed: request access at "
    "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ and pass the file "
    "(e.g. dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth, a timm .safetensors, or the Hugging Face "
    "facebook/dinov3-vitb16-pretrain-lvd1689m model.safetensors or snapshot folder) with "
    f"--teacher.weights PATH or the {WEIGHTS_ENV} environment variable; use "
    "--teacher.random_init true only for smoke tests."
)

FAMILIES: Registry = Registry(
    "encoder family",
    key="families",
    modules=(
        "sonodistill.models.families.timm_cnn",
        "sonodistill.models.families.timm_vit",
        "sonodistill.models.families.dinov3_vit",
        "sonodistill.models.families.dinov3_convnext",
        "sonodistill.models.families.sam2_hiera",
        "sonodistill.models.families.student_run",
    ),
    validate=lambda name, cls: isinstance(cls, type) and getattr(cls, "family", None) == name,
)
"""Model families: name -> `Encoder` subclass (whose `family` attribute is that name)."""
FAMILIES.alias("teacher", "dinov3")
FamilyName = registered(FAMILIES, name="FamilyName")
"""A registered encoder family (timm, dinov3, dinov3-convnext, sam2, vit, student, plugins)."""
GRAMMAR_PREFIXES = ("random",)
"""Spec prefixes that are grammar, not families: `random:NAME` is `timm:NAME=random`."""

# --- the files of a distill run folder (the `student:` family reads them) ------------------------

RUN_CONFIG = "config.yaml"
"""The resolved DistillConfig."""
RUN_INFO = "run_info.json"
"""Teacher weights, world size, precision, device, torch version."""
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "checkpoints/last.pt"
"""Student, optimiser, scheduler and step (for --resume)."""
LOGS = "logs"
STUDENT_WEIGHTS = "student_backbone.safetensors"
"""The distilled backbone: the family's state dict (for timm: no classifier)."""
AUGMENT_TITLES = {"us": "US-aware", "default": "Default", "none": "None"}
"""How tables name a run's augmentation policy."""


def read_run_config(run: str | Path) -> dict:
    """A run's config.yaml as written (a mapping; {} when absent), without validating it
    against today's DistillConfig, so that older runs stay readable."""
    config = Path(run) / RUN_CONFIG
    if not config.is_file():
        return {}
    values = yaml.safe_load(config.read_text())
    return values if isinstance(values, dict) else {}


# --- specs ---------------------------------------------------------------------------------------


@dataclass
class EncoderSpec:
    """Which encoder, initialised how (shorthand strings: `EncoderSpec.parse`)."""

    family: str = "timm"
    """Model family (registry key): timm, dinov3, dinov3-convnext, sam2, vit, student, ..."""
    name: str = ""
    """timm architecture; empty: the family's default."""
    weights: str | None = None
    """Weights file or folder (student: the run folder); `random` for a random init; empty:
    the family's default."""
    label: str | None = None
    """Display name in tables, e.g. R50-Distill-US."""
    model_kwargs: dict = field(default_factory=dict)
    """Architecture overrides for timm (tiny models in tests)."""
    options: dict = field(default_factory=dict)
    """Family-specific loading options (dinov3: rope_periods; vit: key_map, drop)."""

    @property
    def display(self) -> str:
        """The label, else `ARCH-FAMILY` (bridge: embed and bench move to
        `models.encoders.encoder_label`, the one labelling rule)."""
        return self.label or f"{self.name}-{self.family}"

    def replace(self, **changes) -> EncoderSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse(cls, item: str | dict | EncoderSpec, option: str = "--encoders") -> EncoderSpec:
        """THE checked constructor: a spec string (module doc), a mapping of these fields
        (unknown keys named with their close match) or a spec; the family must be registered
        (one line with the close matches naming `option`)."""
        if isinstance(item, EncoderSpec):
            spec = item
        elif isinstance(item, str):
            spec = _parse_string(item, option)
        else:
            spec = checked(cls, item, option)
        family = FAMILIES.entry(spec.family, option).name  # an alias: the family's name
        return spec if family == spec.family else spec.replace(family=family)


def _parse_string(text: str, option: str) -> EncoderSpec:
    text, _, label = text.partition("@")
    prefix, sep, rest = text.partition(":")
    if not sep:
        known = ", ".join(f"{k}:" for k in (*FAMILIES.names(), *GRAMMAR_PREFIXES))
        raise UserError(f"{option} {text}: an encoder spec starts with one of {known}")
    if prefix not in GRAMMAR_PREFIXES:
        if prefix not in FAMILIES:
            known = [*FAMILIES.names(), *GRAMMAR_PREFIXES]
            raise unknown_name("encoder family", prefix, known, option)
        prefix = FAMILIES.entry(prefix).name  # an alias: the family's name
    if prefix == "random":
        return EncoderSpec(family="timm", name=rest, weights=RANDOM, label=label or None)
    spec = EncoderSpec(family=prefix, label=label or None)
    if "=" in rest:
        spec.name, _, spec.weights = rest.partition("=")
    else:
        spec.weights = rest or None
    return spec


@dataclass
class StudentConfig:
    """The student: any encoder + the projection head g_phi to the teacher's channels (Sec. 3.2)."""

    family: FamilyName = "timm"
    """Model family of the student's encoder: timm (any timm CNN), dinov3-convnext, sam2, ..."""
    name: str = DEFAULT_STUDENT
    """Architecture in the family: resnet50, resnet18, convnext_tiny, ..."""
    weights: str | None = None
    """Optional initialisation: a state dict in one of the family's formats, e.g. a timm
    .safetensors/.pth or Meta's DINOv3 ConvNeXt .pth for convnext_tiny (empty: random)."""
    model_kwargs: dict = field(default_factory=dict)
    """Architecture overrides passed to timm (tiny models in tests)."""
    options: dict = field(default_factory=dict)
    """Family loading options (see the family's doc)."""
    projection: Literal["linear", "mlp"] = "linear"
    """Projection head g_phi: a single linear layer (1x1 conv, Sec. 3.2) or a two-layer MLP
    (Sec. 3.5)."""
    mlp_hidden: PositiveInt | None = None
    """Hidden width of the MLP projection; default: the encoder's channel count."""
    sync_bn: bool = False
    """BatchNorm statistics over the global batch (SyncBatchNorm) when training on several
    GPUs: with the paper's 512 images over 32 GPUs each BatchNorm otherwise sees 16."""

    deprecated: ClassVar = (Renamed("head", "projection"),)

    def spec(self) -> EncoderSpec:
        """The student's encoder; no weights: a random initialisation (whatever the family's
        default would be)."""
        return EncoderSpec(
            family=self.family,
            name=self.name,
            weights=self.weights or RANDOM,
            model_kwargs=dict(self.model_kwargs),
            options=dict(self.options),
        )


@dataclass
class TeacherConfig:
    """Frozen teacher (DINOv3 ViT-B/16 by default)."""

    family: FamilyName = "dinov3"
    """Model family with token maps: dinov3, dinov3-convnext, sam2, vit."""
    name: str = ""
    """timm architecture; empty: the family's default (dinov3: vit_base_patch16_dinov3_qkvb)."""
    weights: str | None = None
    """Official .pth (or training checkpoint), timm or Hugging Face file or snapshot folder."""
    random_init: bool = False
    """Explicitly allow a randomly initialised teacher (tests and smoke runs only)."""
    n_blocks: PositiveInt = 2
    """Token maps of this many last blocks are concatenated on channels."""
    norm: bool = True
    """Pass each block's tokens through the final norm, as get_intermediate_layers(norm=True)."""
    model_kwargs: dict = field(default_factory=dict)
    """Architecture overrides passed to timm, e.g. {embed_dim: 64, depth: 2, num_heads: 2}."""
    options: dict = field(default_factory=dict)
    """Family loading options, e.g. {rope_periods: computed} to refuse files with other periods."""

    def spec(self) -> EncoderSpec:
        weights = self.weights or os.environ.get(WEIGHTS_ENV) or None
        if weights is None and self.random_init:
            weights = RANDOM
        return EncoderSpec(
            family=self.family,
            name=self.name,
            weights=weights,
            model_kwargs=dict(self.model_kwargs),
            options=dict(self.options),
        )


@dataclass
class SimTeacherConfig:
    """How the simulated pretrained teacher is made (`sonodistill.models.simulated_teacher`,
    which builds it; every field is part of its cache key)."""

    image_size: PositiveInt = 128
    """Frame side in pixels; the teacher's token grid is image_size / patch_size."""
    patch_size: PositiveInt = 16
    """ViT patch size (DINOv3's is 16)."""
    embed_dim: PositiveInt = 192
    """Token width (ViT-S: 384, ViT-B: 768)."""
    depth: PositiveInt = 4
    """Transformer blocks."""
    num_heads: PositiveInt = 3
    """Attention heads (embed_dim / num_heads must be a multiple of 4 for RoPE)."""
    presets: list[str] = field(default_factory=lambda: ["muscle", "abdomen"])
    """The presets whose labels the teacher learns (its 'natural images')."""
    frames: PositiveInt = 1024
    """Labelled pretraining frames (lesion types balanced), flipped at random while training."""
    steps: PositiveInt = 300
    """AdamW steps (one-cycle lr schedule)."""
    batch_size: PositiveInt = 32
    """Frames per step."""
    lr: PositiveFloat = 2e-3
    """Peak AdamW lr."""
    seed: NonNegativeInt = 0
    """Seed of the frames, the initialisation and the batches."""
    knows: Literal["all", "lesions", "layers"] = "all"
    """What its labels teach (models.simulated_teacher's doc): all, lesions only, or
    layers/anatomy only. Part of the cache key only when not `all`, so that the default
    teacher's file stays the same."""

    def model_kwargs(self) -> dict:
        """The architecture as TeacherConfig.model_kwargs (timm overrides of ARCH)."""
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
        }
