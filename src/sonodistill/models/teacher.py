"""The frozen teacher: token maps of its last blocks as distillation targets (Sec. 3.2).

The one place a teacher is built, from any family that offers token maps (DINOv3 ViT by default;
DINOv3 ConvNeXt or a timm ViT with a key map too), through the encoder registry.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from sonodistill.models.encoders import FAMILIES, RANDOM, Encoder, build_encoder
from sonodistill.models.families.base import resize_to
from sonodistill.models.specs import WEIGHTS_ENV, WEIGHTS_HELP, TeacherConfig

log = logging.getLogger(__name__)

__all__ = ["WEIGHTS_ENV", "WEIGHTS_HELP", "Teacher", "TeacherConfig"]


class Teacher(nn.Module):
    """Frozen teacher; always in eval mode (DINOv3's RoPE jitters coordinates in train mode).

    `image_size`: the only input size it will see (distillation), for a family that is cheaper at
    a fixed size (`Encoder.fixed_input`: DINOv3 builds its RoPE grid once); None: any size."""

    def __init__(self, cfg: TeacherConfig, image_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        spec = cfg.spec()
        if image_size is not None:
            spec = FAMILIES.get(spec.family, "--teacher.family").fixed_input(spec, image_size)
        self.encoder: Encoder = build_encoder(spec, "--teacher.family")
        self.channels = self.encoder.token_channels(cfg.n_blocks)  # refuses families without
        if self.encoder.load_report is None:
            log.warning(
                "teacher %s is randomly initialised: results show mechanics only",
                self.encoder.spec.name,
            )
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @property
    def out_channels(self) -> int:
        return sum(self.channels)

    @property
    def weights_info(self) -> dict:
        """What the run records: family, architecture and how the weights were loaded."""
        report = self.encoder.load_report
        return {
            "family": self.encoder.spec.family,
            "name": self.encoder.spec.name,
            **(report.as_dict() if report else {"file": RANDOM}),
        }

    def check_input_size(self, size: int, what: str = "--image_size") -> None:
        self.encoder.check_input_size(size, size, what)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> targets (B, out_channels, h, w) on the last grid."""
        maps = self.encoder.token_maps(x, self.cfg.n_blocks, self.cfg.norm)
        return torch.cat(resize_to(maps, maps[-1].shape[-2:]), dim=1)
