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
    """Encoder feature map -> projection g_phi -> bilinear resize to the teacher's grid (Eq. 3).

    With several teachers (`out_channels` a list), one projection head per teacher on the same
    feature map (`projections`), each resized to its teacher's grid; `forward` then takes a
    list of grids and returns a list of maps."""

    def __init__(self, cfg: StudentConfig, out_channels: int | list[int]):
        super().__init__()
        self.cfg = cfg
        self.encoder: Encoder = build_encoder(cfg.spec(), "--student.family")
        width = self.encoder.out_channels
        if isinstance(out_channels, int):
            self.projection = projection_head(width, out_channels, cfg.projection, cfg.mlp_hidden)
        else:
            self.projections = nn.ModuleList(
                projection_head(width, c, cfg.projection, cfg.mlp_hidden) for c in out_channels
            )
        self._register_load_state_dict_pre_hook(_upgrade_keys)

    @property
    def backbone(self) -> nn.Module:
        """The encoder's backbone (what `student_backbone.safetensors` holds)."""
        return self.encoder.backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last feature map (B, C_S, H_S, W_S)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, grid):
        """(B, C, H, W) -> the projected map on `grid` (h, w); with several heads, `grid` is a
        list of grids and the result a list of maps."""
        features = self.features(x)
        if not hasattr(self, "projections"):
            return _on_grid(self.projection(features), grid)
        return [_on_grid(head(features), g) for head, g in zip(self.projections, grid, strict=True)]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Clean backbone weights; for a timm student they load strictly into
        timm.create_model(name, num_classes=0)."""
        return self.encoder.backbone_state_dict()


def _on_grid(z: torch.Tensor, grid) -> torch.Tensor:
    if tuple(z.shape[-2:]) != tuple(grid):
        z = F.interpolate(z, size=grid, mode="bilinear", align_corners=False)
    return z


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
