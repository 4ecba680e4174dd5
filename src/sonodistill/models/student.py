"""CNN student: an unmodified timm backbone + head to the teacher's token grid (Sec. 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sonodistill.config import PositiveInt
from sonodistill.models.encoders import EncoderSpec, build_encoder
from sonodistill.models.families.timm_cnn import TimmCNN


@dataclass
class StudentConfig:
    """CNN student."""

    name: str = TimmCNN.default_name
    """Any timm CNN with a final feature map: resnet50, resnet18, convnext_tiny, ..."""
    weights: str | None = None
    """Optional backbone initialisation: a timm state dict (.safetensors/.pth) or a layout timm
    converts for the architecture, e.g. Meta's DINOv3 ConvNeXt .pth for convnext_tiny."""
    head: Literal["linear", "mlp"] = "linear"
    """Projection head: a single linear layer (1x1 conv, Sec. 3.2) or a two-layer MLP (Sec. 3.5)."""
    mlp_hidden: PositiveInt | None = None
    """Hidden width of the MLP head; default: the backbone's channel count."""
    sync_bn: bool = False
    """BatchNorm statistics over the global batch (SyncBatchNorm) when training on several
    GPUs: with the paper's 512 images over 32 GPUs each BatchNorm otherwise sees 16."""


def build_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    """A timm backbone without classifier; weights (if any: timm layout, or one timm converts
    such as Meta's DINOv3 ConvNeXt .pth) must fit exactly."""
    spec = EncoderSpec(family="timm", name=name, weights=str(weights) if weights else None)
    return build_encoder(spec).backbone


def projection_head(in_ch: int, out_ch: int, head: str, hidden: int | None = None) -> nn.Module:
    """The student's head g_phi: `linear` (1x1 conv) or `mlp` (two 1x1 convs, GELU between)."""
    if head == "linear":
        return nn.Conv2d(in_ch, out_ch, kernel_size=1)
    if head == "mlp":
        hidden = hidden or in_ch
        return nn.Sequential(
            nn.Conv2d(in_ch, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, out_ch, kernel_size=1),
        )
    raise ValueError(f"unknown head {head!r}: use 'linear' or 'mlp'")


class Student(nn.Module):
    """Backbone feature map -> head g_phi -> bilinear resize to the teacher's grid (Eq. 3)."""

    def __init__(self, cfg: StudentConfig, out_channels: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.name, cfg.weights)
        self.head = projection_head(
            self.backbone.num_features, out_channels, cfg.head, cfg.mlp_hidden
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (B, C_S, H_S, W_S)."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        z = self.head(self.features(x))
        if tuple(z.shape[-2:]) != tuple(grid):
            z = F.interpolate(z, size=grid, mode="bilinear", align_corners=False)
        return z

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Clean backbone weights: load strictly into timm.create_model(name, num_classes=0)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
