"""CNN student: heads, grid, and a backbone export that loads strictly into timm and smp."""

from __future__ import annotations

import re

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file, save_file

from sonodistill.models import Student, StudentConfig, WeightsMismatchError


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_student_prediction_matches_the_teacher_grid(head):
    student = Student(StudentConfig(name="resnet50", head=head), out_channels=1536)
    out = student(torch.randn(2, 3, 224, 224), (14, 14))
    assert out.shape == (2, 1536, 14, 14)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in student.head.modules())
    assert n_convs == (1 if head == "linear" else 2)


def test_convnext_student_works_too():
    student = Student(StudentConfig(name="convnext_tiny"), out_channels=96)
    assert student(torch.randn(1, 3, 64, 64), (4, 4)).shape == (1, 96, 4, 4)


def test_backbone_export_loads_strictly_into_timm_and_smp(tmp_path):
    student = Student(StudentConfig(name="resnet18"), out_channels=64)
    path = tmp_path / "student_backbone.safetensors"
    save_file(student.backbone_state_dict(), str(path))
    sd = load_file(str(path))
    assert not any(k.startswith("fc.") for k in sd)

    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    plain.load_state_dict(sd, strict=True)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=1)
    unet.encoder.load_state_dict(dict(sd))
    for model in (plain, unet.encoder):
        assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"])


def test_student_initialised_from_a_weights_file(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)  # with its classifier
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    student = Student(StudentConfig(name="resnet18", weights=str(path)), out_channels=8)
    assert torch.equal(student.backbone.conv1.weight, source.conv1.weight)


def test_wrong_weights_file_is_refused_with_the_mismatches(tmp_path):
    path = tmp_path / "r50.safetensors"
    save_file(timm.create_model("resnet50", num_classes=0).state_dict(), str(path))
    with pytest.raises(WeightsMismatchError) as err:
        Student(StudentConfig(name="resnet18", weights=str(path)), out_channels=8)
    message = str(err.value)
    assert "\n" not in message and "r50.safetensors" in message and "resnet18" in message
    # resnet50 has bottleneck blocks: 3rd convs are unexpected, the rest mis-shaped, cut at 5
    assert re.search(r"\d+ unexpected \(layer1\.0\.bn3\.bias, .* and \d+ more\)", message)
    assert re.search(r"\d+ mis-shaped \(layer1\.0\.conv1\.weight file \(64, 64, 1, 1\)", message)
