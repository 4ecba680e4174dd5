"""Downstream models around an encoder: linear probes, smp U-Net, a light ViT head, classifiers.

All models take grey images (B, 1, H, W) in [0, 1] and apply the shared input convention
(`to_model_input`) themselves. Heads and decoders always start from scratch (Sec. 4.3).
"""

from __future__ import annotations

from typing import Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from sonodistill.distill.run import load_encoder
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, EncoderSpec

Protocol = Literal["linear", "finetune"]


class WithPreprocess(nn.Module):
    """Grey frames (B, 1, H, W) in [0, 1] -> model(ImageNet-normalised 3-channel input).

    Exported graphs take what a scanner gives (grey, scaled to [0, 1]), so that a deployment
    cannot get the normalisation wrong.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model(to_model_input(frames))


def seg_channels(num_classes: int) -> int:
    """One logit for binary masks (smp's binary losses), else one per class."""
    return 1 if num_classes == 2 else num_classes


class _Frozen(nn.Module):
    """Keeps a frozen encoder in eval mode (BatchNorm statistics untouched) and grad-free."""

    def __init__(self, encoder: Encoder, frozen: bool):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            return self.encoder(to_model_input(x))


class LinearSegProbe(_Frozen):
    """Frozen encoder, a 1x1 conv on its last feature map, bilinear upsampling to the mask."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder, frozen=True)
        self.head = nn.Conv2d(encoder.out_channels, seg_channels(num_classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ViTSegHead(nn.Module):
    """A light progressive-upsampling head on the patch-token map (the paper's ViT reference)."""

    def __init__(self, in_ch: int, out_ch: int, width: int = 256):
        super().__init__()
        self.block1 = _conv_bn_relu(in_ch, width)
        self.block2 = _conv_bn_relu(width, width // 4)
        self.out = nn.Conv2d(width // 4, out_ch, 1)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.block1(feats)
        x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
        x = self.block2(x)
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(True)
    )


class ViTSegModel(_Frozen):
    """DINOv3 teacher fine-tuned end to end with `ViTSegHead` on its patch tokens."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder, frozen=False)
        self.head = ViTSegHead(encoder.out_channels, seg_channels(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), x.shape[-2:])


class UNetSeg(nn.Module):
    """smp U-Net (timm-universal encoder `tu-NAME`) carrying the encoder's weights."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__()
        self.unet = smp.Unet(
            f"tu-{encoder.spec.name}", encoder_weights=None, classes=seg_channels(num_classes)
        )
        load_into_smp_encoder(self.unet.encoder.model, encoder.backbone_state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(to_model_input(x))


def load_into_smp_encoder(features_net: nn.Module, backbone_sd: dict[str, torch.Tensor]) -> int:
    """Copy a timm backbone state dict into smp's timm `features_only` network.

    The features network flattens top-level sequentials (`stem.0` -> `stem_0`) and drops what
    follows the last stage (e.g. ConvNeXt's head norm), so keys are matched with '_' and '.'
    treated alike; every target tensor must be found with the same shape. Returns the count.
    """
    norm = lambda k: k.replace("_", ".")  # noqa: E731
    source = {norm(k): v for k, v in backbone_sd.items()}
    if len(source) != len(backbone_sd):
        raise ValueError("ambiguous backbone keys after '_' -> '.' normalisation")
    target = features_net.state_dict()
    mapped = {}
    for key, value in target.items():
        src = source.get(norm(key))
        if src is None or src.shape != value.shape:
            raise KeyError(f"U-Net encoder tensor {key} {tuple(value.shape)} not in the backbone")
        mapped[key] = src
    features_net.load_state_dict(mapped, strict=True)
    return len(mapped)


class Classifier(_Frozen):
    """Global average pooling (ViT: CLS token and mean patch token) + a linear layer."""

    def __init__(self, encoder: Encoder, num_classes: int, frozen: bool):
        super().__init__(encoder, frozen)
        dim = encoder.out_channels * (2 if encoder.is_vit else 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            if self.encoder.is_vit:
                cls, patches = self.encoder.tokens(to_model_input(x))
                pooled = torch.cat([cls, patches.mean(dim=(-2, -1))], dim=1)
            else:
                pooled = self.encoder.pooled(to_model_input(x))
        return self.head(pooled)


def build_model(
    spec: EncoderSpec | str, task: str, protocol: Protocol, num_classes: int
) -> nn.Module:
    """The downstream model of one run: (task, protocol) x encoder."""
    encoder = load_encoder(spec)
    if task == "cls":
        return Classifier(encoder, num_classes, frozen=protocol == "linear")
    if protocol == "linear":
        return LinearSegProbe(encoder, num_classes)
    if encoder.is_vit:
        return ViTSegModel(encoder, num_classes)
    return UNetSeg(encoder, num_classes)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
