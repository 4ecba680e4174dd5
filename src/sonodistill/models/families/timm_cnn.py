"""timm CNNs (ResNet, ConvNeXt, EfficientNet, RegNet, ...): students and random baselines.

Weights: a timm-format state dict (`.safetensors`/`.pth`, classifier tensors dropped), or any
layout timm's own filter for the architecture converts (e.g. Meta's DINOv3 ConvNeXt `.pth` for a
`convnext_tiny` student); loaded strictly either way. No weights: a random initialisation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from sonodistill.models.families.base import Encoder, EncoderSpec
from sonodistill.models.specs import FAMILIES
from sonodistill.models.weights import LoadReport, load_strict, read_state_dict


@FAMILIES.register("timm")
class TimmCNN(Encoder):
    """Any timm CNN with `forward_features` -> (B, C, h, w) and `forward_intermediates`."""

    family = "timm"
    title = "timm CNN"
    default_name = "resnet50"

    @classmethod
    def default_weights(cls, spec: EncoderSpec) -> str | None:
        return None  # a random initialisation

    @classmethod
    def load(cls, model: nn.Module, path: Path, spec: EncoderSpec) -> LoadReport:
        report = LoadReport(str(path), "timm")
        state = drop_classifier(model, read_state_dict(path, report), report)
        state = fit_timm_layout(model, state, report)
        load_strict(model, state, f"{path} ({report.format} format)", spec.name)
        return report


def drop_classifier(model: nn.Module, state: dict, report: LoadReport) -> dict:
    """Leave out the file's classifier tensors (`fc.*`, `head.fc.*`, ...) the backbone lacks."""
    classifier = model.pretrained_cfg.get("classifier") or "fc"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = model.state_dict()
    dropped = [k for k in state if k.startswith(tuple(n + "." for n in names)) and k not in own]
    if dropped:
        report.dropped["classifier"] = len(dropped)
        report.note(f"dropped the classifier ({len(dropped)} tensors: {', '.join(dropped[:4])})")
    return {k: v for k, v in state.items() if k not in dropped}


def fit_timm_layout(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> dict:
    """The state dict as it is when it fits the model, else converted by timm's own filter for
    the architecture when that fits better: other layouts (Meta/FB ConvNeXt, BEiT, OpenCLIP, ...)
    and tables that depend on the input size (position embeddings, relative position biases),
    which the filter resizes (noted in the report)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if _misfits(own, state) == 0:
        return state
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        converted = filter_fn(dict(state), model)
    except Exception:  # a layout the filter does not know: report the file's own names
        return state
    if _misfits(own, converted) >= _misfits(own, state):
        return state
    how = f"timm's {module.__name__.rsplit('.', 1)[-1]} filter"
    report.format = f"converted by {how}" if report.format == "timm" else f"{report.format} + {how}"
    resized = sorted(k for k in converted if k in state and converted[k].shape != state[k].shape)
    if resized:
        report.note(f"{how} resized {len(resized)} tensors to the model (e.g. {resized[0]})")
    return converted


def _misfits(own: dict[str, tuple], state: dict[str, torch.Tensor]) -> int:
    shapes = sum(1 for k, s in own.items() if k in state and tuple(state[k].shape) != s)
    return len(set(own) ^ set(state)) + shapes
