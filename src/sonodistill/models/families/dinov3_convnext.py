"""DINOv3 ConvNeXt (T/S/B/L): Meta's distilled CNNs as baselines, teachers or student starts.

Formats (detected): Meta's official `.pth` (`downsample_layers.*`, `stages.I.J.dwconv`, ...,
`norm`; the `norms.3` alias of `norm` is checked equal and left out), and timm's
`convnext_*.dinov3_lvd1689m` layout (`stem.*`, `stages.I.blocks.J.*`, `head.norm`). Both load
strictly into timm's `convnext_tiny` ... `convnext_large`; a file of another size is refused
naming the one that fits.

What it gives, as Meta's model does: the pooled vector is the final norm of the global average
(its "CLS token"); token maps are the last stages' outputs, the last one through the final norm
(`get_intermediate_layers(n, norm=True)`); the pyramid is the four stages (strides 4-32).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from timm.models.convnext import checkpoint_filter_fn
from torch import nn

from sonodistill.models.families.base import EncoderSpec, refuse_size
from sonodistill.models.families.timm_cnn import TimmCNN, drop_classifier
from sonodistill.models.specs import FAMILIES
from sonodistill.models.weights import (
    LoadReport,
    UnknownFormatError,
    WeightsMismatchError,
    load_strict,
    read_state_dict,
)

# public name -> (timm name, blocks per stage, widths)
SIZES = {
    "ConvNeXt-T": ("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
    "ConvNeXt-S": ("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768)),
    "ConvNeXt-B": ("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024)),
    "ConvNeXt-L": ("convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536)),
}


@FAMILIES.register("dinov3-convnext")
class DINOv3ConvNeXt(TimmCNN):
    family = "dinov3-convnext"
    title = "DINOv3 ConvNeXt"
    default_name = "convnext_tiny"
    names = tuple(name for name, _, _ in SIZES.values())

    @classmethod
    def default_weights(cls, spec: EncoderSpec) -> str | None:
        return super(TimmCNN, cls).default_weights(spec)  # a file is required

    @classmethod
    def recognizes(cls, state: dict[str, torch.Tensor]) -> bool:
        return "downsample_layers.0.0.weight" in state or (
            "stem.0.weight" in state and "stages.0.blocks.0.conv_dw.weight" in state
        )

    @classmethod
    def load(cls, model: nn.Module, path: Path, spec: EncoderSpec) -> LoadReport:
        report = LoadReport(str(path), "")
        state = read_state_dict(path, report)
        official = "downsample_layers.0.0.weight" in state
        if not official and "stem.0.weight" not in state:
            raise UnknownFormatError(path, state, cls.title)
        report.format = "official" if official else "timm"
        source = f"{path} ({report.format} format)"
        _check_size(state, model, spec.name, source, official)
        if official:
            for i in range(4):  # `norms` aliases: identities, then the final norm
                for part in ("weight", "bias"):
                    alias = state.pop(f"norms.{i}.{part}", None)
                    if alias is not None and not torch.equal(alias, state.get(f"norm.{part}")):
                        raise WeightsMismatchError(
                            f"{source}: norms.{i}.{part} differs from norm.{part} (the same "
                            "layer in Meta's model)"
                        )
            state = checkpoint_filter_fn(state, model)
        state = drop_classifier(model, state, report)
        load_strict(model, state, source, spec.name)
        return report

    # --- what it gives ----------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.head.norm(x)  # LayerNorm2d over channels, eps 1e-6 as Meta's

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.forward(x).mean(dim=(-2, -1), keepdim=True)).flatten(1)

    def vectors(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        last = self.forward(x)
        gap = last.mean(dim=(-2, -1), keepdim=True)
        return {"pooled": gap.flatten(1), "cls": self._norm(gap).flatten(1)}

    def token_channels(self, n: int) -> list[int]:
        return [f["num_chs"] for f in self.backbone.feature_info][-n:]

    def token_maps(self, x: torch.Tensor, n: int, norm: bool = True) -> list[torch.Tensor]:
        maps = self.backbone.forward_intermediates(x, indices=n, intermediates_only=True)
        if norm:
            maps[-1] = self._norm(maps[-1])
        return maps


def _check_size(state: dict, model: nn.Module, name: str, source: str, official: bool) -> None:
    stage = r"^stages\.(\d+)\.(\d+)\." if official else r"^stages\.(\d+)\.blocks\.(\d+)\."
    blocks: dict[int, int] = {}
    for key in state:
        if m := re.match(stage, key):
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    norm = next((state[k] for k in ("norm.weight", "head.norm.weight") if k in state), None)
    if not blocks or norm is None:
        return
    file_depths = tuple(blocks[i] for i in sorted(blocks))
    model_depths = tuple(len(s.blocks) for s in model.stages)
    if (file_depths, int(norm.shape[0])) != (model_depths, model.num_features):
        fits = next(
            (t for t, d, w in SIZES.values() if (d, w[-1]) == (file_depths, norm.shape[0])), None
        )
        refuse_size(
            source,
            _describe(file_depths, int(norm.shape[0])),
            f"{name} ({_describe(model_depths, model.num_features)})",
            fits,
            "dinov3-convnext",
            teacher=True,
        )


def _describe(depths: tuple[int, ...], width: int) -> str:
    title = next((t for t, (_, d, w) in SIZES.items() if (d, w[-1]) == (depths, width)), None)
    shape = f"blocks {'-'.join(map(str, depths))}, width {width}"
    return f"DINOv3 {title} ({shape})" if title else f"a ConvNeXt of {shape}"
