"""The encoder interface every model family implements (teachers, students and baselines).

An `Encoder` wraps one backbone and says what it can give, so that distillation, probes, U-Nets,
embeddings, export and benchmarks never ask which family they hold:

- `forward(x)`: the last feature map (B, out_channels, h, w);
- `pyramid(x)`: maps at strides 2, 4, 8, 16, 32 for a U-Net decoder (`pyramid_channels`; a level
  the backbone lacks has 0 channels);
- `pooled(x)`: the vector a classifier reads (`pooled_dim`);
- `vectors(x)`: named vectors `embed` writes (`pooled` = global average of the last map; a ViT adds
  `cls`);
- `token_maps(x, n, norm)`: distillation targets, when the family offers them (`token_channels`);
- `check_input_size(h, w)`: the family's input-size rule (patch size, window grid, fixed size);
- `build(spec)` / `load(...)`: how the backbone is created and how each weights format loads.

Inputs are ImageNet-normalised 3-channel images (`sonodistill.models.to_model_input`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import timm
import torch
import torch.nn.functional as F
from torch import nn

from sonodistill.errors import UserError, unknown_name
from sonodistill.models.specs import RANDOM, EncoderSpec
from sonodistill.models.weights import (
    LoadReport,
    WeightsMismatchError,
    cpu_state_dict,
    load_strict,
    read_state_dict,
)

PYRAMID_STRIDES = (2, 4, 8, 16, 32)


class InputSizeError(UserError, ValueError):
    """An input size the encoder cannot take exactly (one line naming the size and the rule)."""


class Encoder(nn.Module):
    """One backbone behind the uniform interface (module doc); subclass it per model family."""

    family: ClassVar[str] = ""
    title: ClassVar[str] = ""
    """Public name of the family for messages, e.g. 'DINOv3 ViT'."""
    default_name: ClassVar[str] = ""
    names: ClassVar[tuple[str, ...]] = ()
    """The architectures the family covers (empty: any timm architecture)."""
    default_decoder: ClassVar[str] = "unet"
    """Default fine-tuning decoder: 'unet' on `pyramid`, or 'light' on the last map (plain ViTs)."""
    options: ClassVar[tuple[str, ...]] = ()
    """Names of the `EncoderSpec.options` this family reads."""

    def __init__(self, backbone: nn.Module, spec: EncoderSpec, report: LoadReport | None = None):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.load_report = report

    # --- what a spec means (no model built) ---------------------------------------------------

    @classmethod
    def resolve(cls, spec: EncoderSpec) -> EncoderSpec:
        """The spec with the family's defaults filled in (the architecture name)."""
        return spec.replace(name=spec.name or cls.default_name)

    @classmethod
    def weights_file(cls, spec: EncoderSpec) -> Path | None:
        """The file or folder the weights are read from; None for a random initialisation."""
        spec = cls.resolve(spec)
        weights = spec.weights if spec.weights is not None else cls.default_weights(spec)
        return None if not weights or weights == RANDOM else Path(weights)

    @classmethod
    def recipe(cls, spec: EncoderSpec) -> dict:
        """How the encoder was made, for tables and label checks: its initialisation and
        architecture (a distilled student adds its run's recipe)."""
        spec = cls.resolve(spec)
        return {"init": "random" if spec.weights == RANDOM else "pretrained", "student": spec.name}

    @classmethod
    def default_label(cls, spec: EncoderSpec) -> str:
        """The name of an unlabelled encoder in tables: ARCH-rand, or ARCH-WEIGHTSSTEM."""
        spec = cls.resolve(spec)
        if spec.weights == RANDOM:
            return f"{spec.name}-rand"
        return f"{spec.name}-{Path(spec.weights or spec.family).stem}"

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def build(cls, spec: EncoderSpec) -> Encoder:
        """The backbone of `spec` with its weights loaded exactly (WeightsMismatchError if not)."""
        spec = cls.resolve(spec)
        unknown = sorted(set(spec.options) - set(cls.options))
        if unknown:
            raise UserError(
                f"{cls.family} encoder: unknown options {unknown} (known: "
                f"{list(cls.options) or 'none'})"
            )
        cls.check_name(spec.name)
        model = cls.create(spec)
        weights = spec.weights if spec.weights is not None else cls.default_weights(spec)
        report = None
        if weights and weights != RANDOM:
            report = cls.load(model, Path(weights), spec)
        return cls(model, spec, report)

    @classmethod
    def check_name(cls, name: str, option: str = "") -> None:
        """Refuse an architecture the family does not cover (naming the close ones)."""
        if cls.names and name not in cls.names:
            raise unknown_name(f"{cls.title} architecture", name, cls.names, option)
        if not cls.names and not timm.is_model(name):
            raise unknown_name(f"timm architecture ({cls.title})", name, timm.list_models(), option)

    @classmethod
    def create(cls, spec: EncoderSpec) -> nn.Module:
        return timm.create_model(spec.name, pretrained=False, num_classes=0, **spec.model_kwargs)

    @classmethod
    def fixed_input(cls, spec: EncoderSpec, size: int) -> EncoderSpec:
        """The spec of the same model for `size` x `size` inputs only, where that is cheaper
        (a position grid built once instead of every forward); `spec` itself by default."""
        return spec

    @classmethod
    def default_weights(cls, spec: EncoderSpec) -> str | None:
        """Weights when the spec names none: a random init unless the family needs a file."""
        raise FileNotFoundError(
            f"{cls.title or cls.family} encoder {spec.name}: give a weights file "
            f"({cls.family}:{spec.name}=FILE), or {cls.family}:{spec.name}={RANDOM} for a random "
            "initialisation"
        )

    @classmethod
    def load(cls, model: nn.Module, path: Path, spec: EncoderSpec) -> LoadReport:
        """Read `path` in the family's formats and load it strictly; returns what was done."""
        report = LoadReport(str(path), "timm")
        state = read_state_dict(path, report)
        load_strict(model, state, f"{path} ({report.format} format)", spec.name)
        return report

    @classmethod
    def recognizes(cls, state: dict[str, torch.Tensor]) -> bool:
        """Whether a state dict looks like one of this family's formats (for hints)."""
        return False

    # --- what it gives ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Display name (the spec's label, else architecture-family)."""
        return self.spec.display

    @property
    def out_channels(self) -> int:
        return int(self.backbone.num_features)

    @property
    def pooled_dim(self) -> int:
        return self.out_channels

    @property
    def input_multiple(self) -> int:
        """Height and width must be multiples of this (1: any size)."""
        return 1

    @property
    def pyramid_channels(self) -> list[int]:
        """Channels at strides 2, 4, 8, 16, 32 (0 where the backbone has no such level)."""
        by_stride = {f["reduction"]: f["num_chs"] for f in self.backbone.feature_info}
        return [by_stride.get(s, 0) for s in PYRAMID_STRIDES]

    def token_channels(self, n: int) -> list[int]:
        """Channels of the last n token maps; families without token maps refuse."""
        raise UserError(
            f"{self.title or self.family} encoders offer no token maps (distillation targets); "
            "teachers: dinov3, dinov3-convnext, sam2, vit"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone.forward_intermediates(x, intermediates_only=True)
        by_stride = {
            f["reduction"]: m for f, m in zip(self.backbone.feature_info, maps, strict=True)
        }
        return [by_stride.get(s, empty_level(x, s)) for s in PYRAMID_STRIDES]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).mean(dim=(-2, -1))

    def vectors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self.forward(x).mean(dim=(-2, -1))}

    def token_maps(self, x: torch.Tensor, n: int, norm: bool = True) -> list[torch.Tensor]:
        raise NotImplementedError(self.token_channels(n))

    def check_input_size(self, height: int, width: int | None = None, what: str = "input") -> None:
        """Raise InputSizeError when (height, width) is not a size the encoder takes exactly."""
        width = height if width is None else width
        m = self.input_multiple
        if height < 1 or width < 1 or height % m or width % m:
            raise InputSizeError(
                f"{what} size {height}x{width} does not suit {self.spec.name}: height and width "
                f"must be multiples of {m}"
            )

    def portable_spec(self) -> EncoderSpec:
        """This architecture without its weights file (saved models hold every weight)."""
        return self.spec.replace(weights=RANDOM, options={})

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights on the CPU, contiguous: what a weights file holds."""
        return cpu_state_dict(self.backbone)


def empty_level(x: torch.Tensor, stride: int) -> torch.Tensor:
    """A 0-channel map at `stride` (the U-Net decoder skips it)."""
    return x.new_empty(x.shape[0], 0, x.shape[-2] // stride, x.shape[-1] // stride)


def resize_to(maps: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Bilinear resize of maps whose grid differs from `grid` (distillation targets)."""
    return [
        m
        if tuple(m.shape[-2:]) == tuple(grid)
        else F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False)
        for m in maps
    ]


def refuse_size(
    source: str, found: str, model: str, fits: str | None, family: str, teacher: bool = False
) -> None:
    """One line for a file of another model size, naming the architecture that would fit it."""
    if not fits:
        hint = "no timm architecture has this shape"
    elif teacher:
        hint = f"use --teacher.name {fits} (encoder spec: {family}:{fits}=FILE)"
    else:
        hint = f"use the architecture {fits} (encoder spec: {family}:{fits}=FILE)"
    raise WeightsMismatchError(f"{source}: the file is {found} but the model is {model}; {hint}")
