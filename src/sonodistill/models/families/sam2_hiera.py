"""SAM2 Hiera image encoders (T, S, B+, L): timm's `sam2_hiera_*` trunks, as baselines.

Formats (detected): Meta's official SAM2 / SAM2.1 checkpoints (`sam2.1_hiera_base_plus.pt`:
`{"model": {"image_encoder.trunk.*", "image_encoder.neck.*", "sam_mask_decoder.*", ...}}`; the
trunk is kept, everything else dropped and logged, `mlp.layers.0/1` -> `mlp.fc1/fc2`), and timm
state dicts. The trunk has no final norm, so timm's head norm is removed and the model loads
strictly. A file of another size is refused naming the `sam2_hiera_*` that fits.

What it gives: the hierarchical maps of the four stages (strides 4-32) for a U-Net, the last one
as the feature map; no token maps (not a teacher). Input size: a multiple of 32 for the released
sizes (patch stride 4 x the first window size 8; the windowed position embedding tiles it).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from sonodistill.models.families.base import Encoder, EncoderSpec, refuse_size
from sonodistill.models.specs import FAMILIES
from sonodistill.models.weights import LoadReport, UnknownFormatError, load_strict, read_state_dict

TRUNK = "image_encoder.trunk."
# public name -> (timm name, first width, blocks per stage)
SIZES = {
    "SAM2 Hiera-T": ("sam2_hiera_tiny", 96, (1, 2, 7, 2)),
    "SAM2 Hiera-S": ("sam2_hiera_small", 96, (1, 2, 11, 2)),
    "SAM2 Hiera-B+": ("sam2_hiera_base_plus", 112, (2, 3, 16, 3)),
    "SAM2 Hiera-L": ("sam2_hiera_large", 144, (2, 6, 36, 4)),
}


@FAMILIES.register("sam2")
class SAM2Hiera(Encoder):
    family = "sam2"
    title = "SAM2 Hiera"
    default_name = "sam2_hiera_base_plus"
    names = tuple(name for name, _, _ in SIZES.values())

    @classmethod
    def create(cls, spec: EncoderSpec) -> nn.Module:
        model = super().create(spec)
        model.reset_classifier(0, reset_other=True)  # SAM2's trunk ends without a norm
        return model

    @classmethod
    def recognizes(cls, state: dict[str, torch.Tensor]) -> bool:
        return any(k.startswith(TRUNK) for k in state) or "pos_embed_window" in state

    @classmethod
    def load(cls, model: nn.Module, path: Path, spec: EncoderSpec) -> LoadReport:
        report = LoadReport(str(path), "timm")
        state = read_state_dict(path, report)
        if any(k.startswith(TRUNK) for k in state):
            report.format = "official SAM2"
            dropped: dict[str, int] = {}
            for key in [k for k in state if not k.startswith(TRUNK)]:
                group = (
                    ".".join(key.split(".")[:2])
                    if key.startswith("image_encoder.")
                    else key.split(".")[0]
                )
                dropped[group] = dropped.get(group, 0) + 1
            state = {k[len(TRUNK) :]: v for k, v in state.items() if k.startswith(TRUNK)}
            state = {
                re.sub(r"\.mlp\.layers\.([01])\.", lambda m: f".mlp.fc{int(m[1]) + 1}.", k): v
                for k, v in state.items()
            }
            if dropped:
                report.dropped.update(dropped)
                report.note(
                    "kept the image encoder's trunk, dropped "
                    + ", ".join(f"{g} ({n})" for g, n in sorted(dropped.items()))
                )
        elif "pos_embed_window" not in state:
            raise UnknownFormatError(path, state, cls.title)
        head = [k for k in state if k.startswith("head.")]
        if head:
            report.dropped["head"] = len(head)
            report.note(
                f"dropped the file's head ({', '.join(head)}): the trunk's features are used"
            )
            state = {k: v for k, v in state.items() if k not in head}
        source = f"{path} ({report.format} format)"
        _check_size(state, model, spec.name, source)
        load_strict(model, state, source, spec.name)
        return report

    # --- what it gives ----------------------------------------------------------------------------

    @property
    def input_multiple(self) -> int:
        stride = int(self.backbone.patch_embed.proj.stride[0])
        pooled = stride * 2 ** len(self.backbone.q_pool_blocks)
        return math.lcm(stride * int(self.backbone.window_spec[0]), pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x).permute(0, 3, 1, 2)

    def token_channels(self, n: int) -> list[int]:
        """Channels of the last n stages' outputs (the trunk's token maps, as SAM2's FPN neck
        reads them)."""
        return [f["num_chs"] for f in self.backbone.feature_info][-n:]

    def token_maps(self, x: torch.Tensor, n: int, norm: bool = True) -> list[torch.Tensor]:
        """The last n stages' outputs (NCHW). A SAM2 trunk has no final norm: `norm` is moot."""
        return self.backbone.forward_intermediates(x, indices=n, intermediates_only=True)


def _stages(state: dict) -> tuple[int, tuple[int, ...]] | None:
    """(first width, blocks per stage) of a trunk state dict; a stage starts at a `proj` layer."""
    if "patch_embed.proj.weight" not in state:
        return None
    blocks = {int(m[1]) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not blocks:
        return None
    starts = [0] + sorted(
        {int(m[1]) for k in state if (m := re.match(r"^blocks\.(\d+)\.proj\.weight$", k))}
    )
    ends = starts[1:] + [max(blocks) + 1]
    width = int(state["patch_embed.proj.weight"].shape[0])
    return width, tuple(e - s for s, e in zip(starts, ends, strict=True))


def _check_size(state: dict, model: nn.Module, name: str, source: str) -> None:
    found = _stages(state)
    own = _stages({k: v for k, v in model.state_dict().items()})
    if found is None or found == own:
        return
    fits = next((t for t, w, d in SIZES.values() if (w, d) == found), None)
    refuse_size(source, _describe(*found), f"{name} ({_describe(*own)})", fits, "sam2")


def _describe(width: int, depths: tuple[int, ...]) -> str:
    title = next((t for t, (_, w, d) in SIZES.items() if (w, d) == (width, depths)), None)
    shape = f"width {width}, blocks {'-'.join(map(str, depths))}"
    return f"{title} ({shape})" if title else f"a Hiera of {shape}"
