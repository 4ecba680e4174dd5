"""Encoders from one spec, for every model family: the public API of sonodistill.models.

    encoder = build_encoder("dinov3-convnext:convnext_tiny=dinov3_convnext_tiny_pretrain.pth")
    maps = encoder.pyramid(x)        # U-Net skips; encoder(x): last map; encoder.pooled(x): vector
    encoder = build_encoder("student:runs/distill")     # a distilled student, any family

Spec strings and the families: `sonodistill.models.specs` (and docs/encoders.md for their
formats and checks). What a spec means without building it: `resolve_spec` (run folders
resolved), `weights_file`, `encoder_label` (the one labelling rule of tables), `encoder_recipe`.
"""

from __future__ import annotations

from pathlib import Path

from sonodistill.errors import UserError
from sonodistill.models.families.base import Encoder, InputSizeError
from sonodistill.models.specs import FAMILIES, RANDOM, EncoderSpec
from sonodistill.models.weights import UnknownFormatError, WeightsMismatchError

__all__ = [
    "FAMILIES",
    "RANDOM",
    "Encoder",
    "EncoderSpec",
    "InputSizeError",
    "build_encoder",
    "encoder_label",
    "encoder_recipe",
    "family_of",
    "resolve_spec",
    "weights_file",
]

Spec = EncoderSpec | str | dict


def family_of(spec: EncoderSpec, option: str = "") -> type[Encoder]:
    """The family (Encoder subclass) of a spec; an unknown one is one line with close matches."""
    return FAMILIES.get(spec.family, option)


def build_encoder(spec: Spec, option: str = "--encoders") -> Encoder:
    """Instantiate an encoder of any family, `student:RUN` included; its weights file must fit
    exactly (WeightsMismatchError naming the family that reads the file, if another does)."""
    spec = EncoderSpec.parse(spec, option)
    if spec.weights == "":
        raise UserError(f"encoder {spec.display}: give a weights file (FAMILY:NAME=FILE)")
    family = family_of(spec, option)
    try:
        return family.build(spec)
    except UnknownFormatError as err:
        others = [e for e in FAMILIES.list() if e.obj is not family and e.obj.recognizes(err.state)]
        if not others:
            raise
        hint = f"{others[0].obj.title} (family {others[0].name})"
        raise WeightsMismatchError(
            f"{err.path}: holds a {hint} model, not a {err.family_title}"
        ) from err


def resolve_spec(spec: Spec, option: str = "--encoders") -> EncoderSpec:
    """What a spec builds, with the family's defaults filled in and a `student:RUN` folder
    resolved to its family, architecture and backbone file (no model built)."""
    spec = EncoderSpec.parse(spec, option)
    return family_of(spec, option).resolve(spec)


def weights_file(spec: Spec) -> Path | None:
    """The file or folder an encoder's weights are read from; None for a random init."""
    spec = EncoderSpec.parse(spec)
    return family_of(spec).weights_file(spec)


def encoder_label(spec: Spec) -> str:
    """The encoder's name in tables and file names: its `@LABEL`, else ARCH-rand,
    ARCH-WEIGHTSSTEM, or RUN-distill for a distilled student."""
    spec = EncoderSpec.parse(spec)
    return spec.label or family_of(spec).default_label(spec)


def encoder_recipe(spec: Spec) -> dict:
    """How the encoder was made (init, architecture; a student's run recipe): the ablation
    tables' columns and the suite's label checks."""
    spec = EncoderSpec.parse(spec)
    return family_of(spec).recipe(spec)
