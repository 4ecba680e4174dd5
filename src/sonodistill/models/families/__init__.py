"""The model-family registry: a new family is one module (an `Encoder` subclass) plus one line.

`sonodistill.models.encoders.register_family` adds one at run time (plugins, tests).
"""

from sonodistill.models.families.base import Encoder
from sonodistill.models.families.dinov3_convnext import DINOv3ConvNeXt
from sonodistill.models.families.dinov3_vit import DINOv3ViT
from sonodistill.models.families.sam2_hiera import SAM2Hiera
from sonodistill.models.families.timm_cnn import TimmCNN
from sonodistill.models.families.timm_vit import TimmViT

FAMILIES: dict[str, type[Encoder]] = {
    "timm": TimmCNN,
    "dinov3": DINOv3ViT,
    "dinov3-convnext": DINOv3ConvNeXt,
    "sam2": SAM2Hiera,
    "vit": TimmViT,
}
