"""Plain (single-scale) timm ViTs with a user key map: ultrasound ViT-Bs such as USFM, DINOv2, ...

`vit:ARCH=FILE` with options:
- `key_map`: ordered `[[regex, replacement], ...]` applied to every tensor name of the file
  (USFM, a BEiT-style ViT-B: `beit_base_patch16_224`, and `[["^encoder\\.", ""]]` for a
  file whose names carry an `encoder.` prefix);
- `drop`: regexes of tensors to leave out (pre-training heads such as `lm_head`, `mask_token`).
After the map, timm's own filter for the architecture runs when the names do not fit yet (it
resizes position tables, drops derived buffers); the result loads strictly.

What it gives: the final-normed patch tokens as a (B, D, H/p, W/p) map; CLS (+ mean patch token
for classifiers); token maps of the last blocks (distillation targets); a pyramid of four evenly
spaced blocks resampled to strides 4-32 (ViTDet's simple pyramid without learned layers).
Input size: a multiple of the patch size, or exactly the model's size for fixed-size ViTs (e.g.
BEiT's relative position tables; set `model_kwargs: {img_size: S}` for another size).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sonodistill.models.families.base import (
    PYRAMID_STRIDES,
    Encoder,
    EncoderSpec,
    InputSizeError,
    empty_level,
)
from sonodistill.models.families.timm_cnn import drop_classifier, fit_timm_layout
from sonodistill.models.specs import FAMILIES
from sonodistill.models.weights import LoadReport, load_strict, read_state_dict


@FAMILIES.register("vit")
class TimmViT(Encoder):
    family = "vit"
    title = "ViT (timm)"
    default_name = "vit_base_patch16_224"
    default_decoder = "light"
    options = ("key_map", "drop")

    @classmethod
    def load(cls, model: nn.Module, path: Path, spec: EncoderSpec) -> LoadReport:
        report = LoadReport(str(path), "timm")
        state = read_state_dict(path, report)
        state = apply_key_map(state, spec.options, report)
        state = drop_classifier(model, state, report)
        state = fit_timm_layout(model, state, report)
        load_strict(model, state, f"{path} ({report.format} format)", spec.name)
        return report

    # --- what it gives ----------------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])

    @property
    def has_cls(self) -> bool:
        return getattr(self.backbone, "cls_token", None) is not None

    @property
    def pooled_dim(self) -> int:
        return self.out_channels * (2 if self.has_cls else 1)

    @property
    def input_multiple(self) -> int:
        return self.patch_size

    @property
    def pyramid_channels(self) -> list[int]:
        return [0] + [self.out_channels] * (len(PYRAMID_STRIDES) - 1)

    def token_channels(self, n: int) -> list[int]:
        return [self.out_channels] * n

    def check_input_size(self, height: int, width: int | None = None, what: str = "input") -> None:
        width = height if width is None else width
        embed = self.backbone.patch_embed
        size = tuple(getattr(embed, "img_size", None) or ())
        if getattr(embed, "strict_img_size", False) and size and (height, width) != size:
            raise InputSizeError(
                f"{what} size {height}x{width} does not suit {self.spec.name}: it takes exactly "
                f"{size[0]}x{size[1]} (model_kwargs img_size sets another)"
            )
        super().check_input_size(height, width, what)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(CLS token or None, final-normed patch tokens as a map)."""
        tokens = self.backbone.forward_features(x)
        n_prefix = self.backbone.num_prefix_tokens
        p = self.patch_size
        patches = tokens[:, n_prefix:].transpose(1, 2)
        patches = patches.reshape(x.shape[0], -1, x.shape[-2] // p, x.shape[-1] // p)
        return (tokens[:, 0] if self.has_cls else None), patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)[1]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token and mean patch token, concatenated (DINO's linear-probe input)."""
        cls, patches = self._tokens(x)
        mean = patches.mean(dim=(-2, -1))
        return mean if cls is None else torch.cat([cls, mean], dim=1)

    def vectors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, patches = self._tokens(x)
        out = {"pooled": patches.mean(dim=(-2, -1))}
        if cls is not None:
            out["cls"] = cls
        return out

    def token_maps(self, x: torch.Tensor, n: int, norm: bool = True) -> list[torch.Tensor]:
        """Patch tokens of the last n blocks, each through the final norm when `norm` (as the
        official `get_intermediate_layers(n, norm=True)`)."""
        return self.backbone.forward_intermediates(
            x, indices=n, norm=norm, output_fmt="NCHW", intermediates_only=True
        )

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        depth = len(self.backbone.blocks)
        taps = sorted({round((i + 1) * depth / 4) - 1 for i in range(4)})
        maps = self.backbone.forward_intermediates(
            x, indices=taps, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        maps = [maps[0]] * (4 - len(maps)) + list(maps)  # fewer than 4 blocks: reuse the first
        out = [empty_level(x, PYRAMID_STRIDES[0])]
        for m, stride in zip(maps, PYRAMID_STRIDES[1:], strict=True):
            out.append(_resample(m, stride, self.patch_size, x))
        return out


def _resample(m: torch.Tensor, stride: int, patch: int, x: torch.Tensor) -> torch.Tensor:
    """A token map (stride `patch`) at `stride`: average pooling down, bilinear up."""
    if stride == patch:
        return m
    if stride % patch == 0:
        return F.avg_pool2d(m, stride // patch)
    size = (x.shape[-2] // stride, x.shape[-1] // stride)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def apply_key_map(state: dict, options: dict, report: LoadReport) -> dict:
    """Rename tensors by `options['key_map']` and drop those matching `options['drop']`."""
    key_map = [(re.compile(p), r) for p, r in options.get("key_map", [])]
    drop = [re.compile(p) for p in options.get("drop", [])]
    out, dropped = {}, 0
    for key, value in state.items():
        for pattern, replacement in key_map:
            key = pattern.sub(replacement, key)
        if any(p.search(key) for p in drop):
            dropped += 1
            continue
        out[key] = value
    if key_map:
        report.format = "user key map"
    if dropped:
        report.dropped["drop patterns"] = dropped
        report.note(f"dropped {dropped} tensors matching {options['drop']}")
    return out
