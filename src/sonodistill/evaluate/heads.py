"""Downstream models around any encoder: linear probes, a U-Net, a light head, classifiers.

All models take grey images (B, 1, H, W) in [0, 1] and apply the shared input convention
(`to_model_input`) themselves. Heads and decoders always start from scratch (Sec. 4.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.base import initialization as smp_init
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from sonodistill.evaluate.config import PROTOCOLS, SEG_DECODERS
from sonodistill.models import to_model_input
from sonodistill.models.encoders import Encoder, EncoderSpec, build_encoder


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


class EncoderModel(nn.Module):
    """A downstream model around an encoder; a frozen encoder stays in eval mode (BatchNorm
    statistics untouched) and grad-free."""

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

    def _grad(self):
        return torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with self._grad():
            return self.encoder(to_model_input(x))


class LinearSegProbe(EncoderModel):
    """Frozen encoder, a 1x1 conv on its last feature map, bilinear upsampling to the mask."""

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder, frozen=True)
        self.head = nn.Conv2d(encoder.out_channels, seg_channels(num_classes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[-2:])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part: what linear probes cache (evaluate.probe_cache)."""
        return self.features(x)

    def decode(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.head(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class LightSegHead(nn.Module):
    """A light progressive-upsampling head on the last feature map (the paper's ViT reference)."""

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


@SEG_DECODERS.register("light", title="light upsampling head on the last feature map")
class LightSegModel(EncoderModel):
    """An encoder fine-tuned end to end with `LightSegHead` on its last map (plain ViTs)."""

    seg_decoder = "light"

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder, frozen=False)
        self.head = LightSegHead(encoder.out_channels, seg_channels(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), x.shape[-2:])


@SEG_DECODERS.register("unet", title="smp's U-Net decoder on the encoder's pyramid")
class UNetSeg(EncoderModel):
    """smp's U-Net decoder and segmentation head on the encoder's pyramid (strides 2-32), the
    encoder fine-tuned with it: `smp.Unet` for any family, its weights the encoder's own."""

    seg_decoder = "unet"

    def __init__(self, encoder: Encoder, num_classes: int):
        super().__init__(encoder, frozen=False)
        channels = (256, 128, 64, 32, 16)  # smp.Unet's defaults
        self.unet_decoder = UnetDecoder([3, *encoder.pyramid_channels], channels, n_blocks=5)
        self.segmentation_head = SegmentationHead(channels[-1], seg_channels(num_classes), 3)
        smp_init.initialize_decoder(self.unet_decoder)  # as smp.Unet initialises its own
        smp_init.initialize_head(self.segmentation_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_model_input(x)
        return self.segmentation_head(self.unet_decoder([x, *self.encoder.pyramid(x)]))


class Classifier(EncoderModel):
    """The encoder's pooled vector (CNN: global average; ViT: CLS + mean patch token; DINOv3
    ConvNeXt: its normed average) + a linear layer."""

    def __init__(self, encoder: Encoder, num_classes: int, frozen: bool):
        super().__init__(encoder, frozen)
        self.head = nn.Linear(encoder.pooled_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[-2:])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's part (frozen for a linear probe: what probes cache)."""
        with self._grad():
            return self.encoder.pooled(to_model_input(x))

    def decode(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.head(features)


def build_model(
    spec: EncoderSpec | str | dict | Encoder,
    task_type: str,
    protocol: str,
    num_classes: int,
    seg_decoder: str = "auto",
) -> nn.Module:
    """The downstream model of one run: (task type, protocol) x encoder. A frozen protocol
    (`linear`) trains a linear layer on the encoder's features; the others fine-tune it with a
    classifier, or for segmentation with `seg_decoder` (a `SEG_DECODERS` name, or auto: the
    encoder family's default)."""
    frozen = PROTOCOLS.get(protocol, "protocol").frozen
    if seg_decoder != "auto":  # an unknown name stops before the encoder is built
        SEG_DECODERS.get(seg_decoder, "seg_decoder")
    encoder = spec if isinstance(spec, Encoder) else build_encoder(spec)
    if task_type == "cls":
        return Classifier(encoder, num_classes, frozen=frozen)
    if frozen:
        return LinearSegProbe(encoder, num_classes)
    name = encoder.default_decoder if seg_decoder == "auto" else seg_decoder
    return SEG_DECODERS.get(name, "seg_decoder")(encoder, num_classes)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
