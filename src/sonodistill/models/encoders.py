"""Downstream encoders from one spec: random, distilled student, any timm weights, DINOv3 teacher.

Every encoder maps ImageNet-normalised images (B, 3, H, W) to its last feature map (B, C, h, w),
so probes, U-Nets, embeddings, export and benchmarks treat them alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from sonodistill.models.student import build_backbone
from sonodistill.models.teacher import WEIGHTS_ENV, WEIGHTS_HELP, load_teacher_weights

Kind = Literal["random", "student", "timm", "teacher"]


@dataclass
class EncoderSpec:
    """Which encoder, initialised how. Shorthand strings: see `parse_spec`."""

    kind: Kind = "random"
    name: str = ""
    """timm architecture; default resnet50 (teacher: ViT-B/16 DINOv3; student: from its run)."""
    weights: str | None = None
    """timm: weights file; teacher: DINOv3 file; student: backbone file (a distill run dir is
    resolved by `sonodistill.distill.run.resolve_encoder`: models know no run folders)."""
    label: str | None = None
    """Display name in tables, e.g. R50-Distill-US."""
    model_kwargs: dict = field(default_factory=dict)
    """Architecture overrides for timm (tiny teachers in tests)."""

    @property
    def display(self) -> str:
        return self.label or f"{self.name}-{self.kind}"


def parse_spec(text: str) -> EncoderSpec:
    """`random:resnet18`, `student:RUN_DIR`, `timm:resnet50=W.safetensors`, `teacher:PATH.pth`,
    `teacher:random` (explicit random init), `teacher:` (the file in $SONODISTILL_TEACHER_WEIGHTS);
    optionally followed by `@LABEL`."""
    text, _, label = text.partition("@")
    kind, _, rest = text.partition(":")
    if kind not in ("random", "student", "timm", "teacher"):
        raise ValueError(f"encoder spec {text!r}: kind must be random|student|timm|teacher")
    spec = EncoderSpec(kind=kind, label=label or None)  # type: ignore[arg-type]
    if kind == "random":
        spec.name = rest
    elif kind == "student":
        spec.weights = rest
    elif kind == "timm":
        spec.name, _, spec.weights = rest.partition("=")
    else:
        spec.weights = rest or None  # None: the file named by SONODISTILL_TEACHER_WEIGHTS
    return spec


class Encoder(nn.Module):
    """A backbone with a uniform interface: `forward` -> last feature map (B, C, h, w)."""

    def __init__(self, backbone: nn.Module, spec: EncoderSpec, is_vit: bool):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.is_vit = is_vit
        self.out_channels: int = backbone.num_features

    @property
    def name(self) -> str:
        return self.spec.display

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            return self.backbone.forward_features(x)
        return self.tokens(x)[1]

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT only: final-normed CLS token (B, D) and patch tokens as a map (B, D, h, w)."""
        tokens = self.backbone.forward_features(x)
        p = self.backbone.patch_embed.patch_size[0]
        h, w = x.shape[-2] // p, x.shape[-1] // p
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        return tokens[:, 0], patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooled final features (B, C)."""
        return self.forward(x).mean(dim=(-2, -1))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}


def build_encoder(spec: EncoderSpec | str) -> Encoder:
    """Instantiate an encoder; weights files must fit exactly (WeightsMismatchError otherwise)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "teacher":
        return _teacher_encoder(spec)
    if spec.kind == "student" and (
        not spec.name or not spec.weights or Path(spec.weights).is_dir()
    ):
        raise ValueError(
            f"encoder {spec.display}: a student needs its architecture and backbone file; "
            "a distill run dir is resolved by sonodistill.distill.run.load_encoder"
        )
    if spec.kind == "timm" and not spec.weights:
        raise ValueError(f"encoder {spec.display}: kind 'timm' needs a weights file")
    spec = EncoderSpec(**{**spec.__dict__, "name": spec.name or "resnet50"})
    weights = spec.weights if spec.kind in ("timm", "student") else None
    backbone = build_backbone(spec.name, weights)
    return Encoder(backbone, spec, is_vit=False)


def _teacher_encoder(spec: EncoderSpec) -> Encoder:
    name = spec.name or "vit_base_patch16_dinov3_qkvb"
    model = timm.create_model(name, pretrained=False, num_classes=0, **spec.model_kwargs)
    weights = spec.weights or os.environ.get(WEIGHTS_ENV)
    if not weights:
        raise FileNotFoundError(WEIGHTS_HELP)
    if weights != "random":  # "random" is the explicit opt-in for smoke runs
        load_teacher_weights(model, weights)
    return Encoder(model, EncoderSpec(**{**spec.__dict__, "name": name}), is_vit=True)
