"""Shared fixtures of the evaluation tests (imported by tests/test_eval_*.py; no tests here)."""

from __future__ import annotations

import pytest
import timm
import torch
import yaml
from conftest import TINY_TEACHER_KWARGS
from safetensors.torch import save_file

from sonodistill.models.encoders import EncoderSpec

TINY_TEACHER = EncoderSpec(
    family="dinov3", weights="random", label="ViT-tiny", model_kwargs=TINY_TEACHER_KWARGS
)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on two shared cores, two OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_student(tmp_path_factory):
    """A distill run dir as `sonodistill distill` writes it: config.yaml + backbone weights."""
    run = tmp_path_factory.mktemp("distill_run")
    torch.manual_seed(123)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        run / "student_backbone.safetensors",
    )
    (run / "config.yaml").write_text(yaml.safe_dump({"student": {"name": "resnet18"}}))
    return run
