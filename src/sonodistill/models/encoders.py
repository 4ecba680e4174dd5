"""Encoders from one spec, for every model family: the public API of sonodistill.models.

    encoder = build_encoder("dinov3-convnext:convnext_tiny=dinov3_convnext_tiny_pretrain.pth")
    maps = encoder.pyramid(x)        # U-Net skips; encoder(x): last map; encoder.pooled(x): vector

Spec strings: `FAMILY:NAME=FILE@LABEL`, or `FAMILY:FILE@LABEL` for the family's default
architecture, with FILE = `random` for a random initialisation. Families (see `FAMILIES`, and
docs/encoders.md for their formats and checks):

- `timm:resnet50=W.safetensors`, `random:resnet50` (a random timm CNN);
- `dinov3:FILE`, `dinov3:vit_large_patch16_dinov3_qkvb=FILE`; `teacher:FILE` is the same family,
  and `teacher:` alone reads $SONODISTILL_TEACHER_WEIGHTS;
- `dinov3-convnext:convnext_tiny=FILE`, `sam2:sam2_hiera_base_plus=FILE`,
  `vit:beit_base_patch16_224=FILE` (with `options: {key_map: ...}` in the mapping form);
- `student:RUN_DIR`: a distilled student, resolved to `timm:ARCH=BACKBONE_FILE` by
  `sonodistill.distill.run.resolve_encoder` (models know no run folders).
"""

from __future__ import annotations

from sonodistill.errors import UserError, unknown_name
from sonodistill.models.families import FAMILIES
from sonodistill.models.families.base import RANDOM, Encoder, EncoderSpec, InputSizeError
from sonodistill.models.weights import UnknownFormatError, WeightsMismatchError

# Spec prefixes that name a family differently.
ALIASES = {"random": "timm", "teacher": "dinov3"}

__all__ = [
    "ALIASES",
    "FAMILIES",
    "RANDOM",
    "Encoder",
    "EncoderSpec",
    "InputSizeError",
    "build_encoder",
    "family_of",
    "parse_spec",
    "register_family",
]


def register_family(name: str, family: type[Encoder]) -> None:
    """Add a model family (an `Encoder` subclass) under `name`, e.g. from a plugin or a test."""
    if not (isinstance(family, type) and issubclass(family, Encoder)):
        raise TypeError(f"family {name!r} must be an Encoder subclass")
    family.family = name
    FAMILIES[name] = family


def family_of(spec: EncoderSpec) -> type[Encoder]:
    if spec.family not in FAMILIES:
        raise unknown_name("encoder family", spec.family, FAMILIES)
    return FAMILIES[spec.family]


def parse_spec(text: str) -> EncoderSpec:
    """`FAMILY:NAME=FILE@LABEL` (see the module doc) -> EncoderSpec."""
    text, _, label = text.partition("@")
    prefix, sep, rest = text.partition(":")
    known = [*FAMILIES, *ALIASES, "student"]
    if not sep or prefix not in known:
        raise UserError(
            f"encoder spec {text!r}: start with one of {', '.join(k + ':' for k in known)}"
        )
    spec = EncoderSpec(family=ALIASES.get(prefix, prefix), label=label or None)
    if prefix == "random":
        spec.name, spec.weights = rest, RANDOM
    elif "=" in rest:
        spec.name, _, spec.weights = rest.partition("=")
    else:
        spec.weights = rest or None
    return spec


def build_encoder(spec: EncoderSpec | str) -> Encoder:
    """Instantiate an encoder; its weights file must fit exactly (WeightsMismatchError if not)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.family == "student":
        raise ValueError(
            f"encoder {spec.display}: a distill run dir is resolved by "
            "sonodistill.distill.run.load_encoder (models know no run folders)"
        )
    if spec.weights == "":
        raise UserError(f"encoder {spec.display}: give a weights file (FAMILY:NAME=FILE)")
    family = family_of(spec)
    try:
        return family.build(spec)
    except UnknownFormatError as err:
        others = [f for f, c in FAMILIES.items() if c is not family and c.recognizes(err.state)]
        if not others:
            raise
        hint = f"{FAMILIES[others[0]].title} (family {others[0]})"
        raise WeightsMismatchError(
            f"{err.path}: holds a {hint} model, not a {err.family_title}"
        ) from err
