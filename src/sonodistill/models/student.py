"""The student: any encoder + the projection head g_phi to the teacher's grid (Sec. 3.2).

The encoder comes from `build_encoder` (a timm CNN by default, or any registered family: a
DINOv3 ConvNeXt, a SAM2 trunk, a plugin's); the head is a 1x1 convolution (or a two-layer MLP)
to the teacher's channels, and the map is resized to the teacher's token grid (Eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sonodistill.models.encoders import Encoder, build_encoder
from sonodistill.models.specs import StudentConfig

__all__ = ["Student", "StudentConfig", "projection_head"]


def projection_head(in_ch: int, out_ch: int, kind: str, hidden: int | None = None) -> nn.Module:
    """The student's projection g_phi: `linear` (1x1 conv) or `mlp` (two 1x1 convs, GELU
    between)."""
    if kind == "linear":
        return nn.Conv2d(in_ch, out_ch, kernel_size=1)
    if kind == "mlp":
        hidden = hidden or in_ch
        return nn.Sequential(
            nn.Conv2d(in_ch, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, out_ch, kernel_size=1),
        )
    raise ValueError(f"unknown projection {kind!r}: use 'linear' or 'mlp'")


class Student(nn.Module):
    """Encoder feature map -> projection g_phi -> bilinear resize to the teacher's grid (Eq. 3)."""

    def __init__(self, cfg: StudentConfig, out_channels: int):
        super().__init__()
        self.cfg = cfg
        self.encoder: Encoder = build_encoder(cfg.spec(), "--student.family")
        self.projection = projection_head(
            self.encoder.out_channels, out_channels, cfg.projection, cfg.mlp_hidden
        )
        self._register_load_state_dict_pre_hook(_upgrade_keys)

    @property
    def backbone(self) -> nn.Module:
        """The encoder's backbone (what `student_backbone.safetensors` holds)."""
        return self.encoder.backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last feature map (B, C_S, H_S, W_S)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        z = self.projection(self.features(x))
        if tuple(z.shape[-2:]) != tuple(grid):
            z = F.interpolate(z, size=grid, mode="bilinear", align_corners=False)
        return z

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Clean backbone weights; for a timm student they load strictly into
        timm.create_model(name, num_classes=0)."""
        return self.encoder.backbone_state_dict()


def _upgrade_keys(state: dict, prefix: str, *args) -> None:
    """Checkpoints written before the student held an encoder (0.1): `backbone.*` is now
    `encoder.backbone.*` and `head.*` is `projection.*` (renamed in place, as torch asks)."""
    for key in list(state):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.startswith("backbone."):
            state[f"{prefix}encoder.{rest}"] = state.pop(key)
        elif rest.startswith("head."):
            state[f"{prefix}projection.{rest[len('head.') :]}"] = state.pop(key)
