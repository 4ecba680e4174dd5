"""CNN student: heads, grid, and a backbone export that loads strictly into timm and smp."""

from __future__ import annotations

import re

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file, save_file

from sonodistill.models import Student, StudentConfig, WeightsMismatchError


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_student_prediction_matches_the_teacher_grid(projection):
    student = Student(StudentConfig(name="resnet50", projection=projection), out_channels=1536)
    out = student(torch.randn(2, 3, 224, 224), (14, 14))
    assert out.shape == (2, 1536, 14, 14)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in student.projection.modules())
    assert n_convs == (1 if projection == "linear" else 2)


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


def test_a_fresh_timm_student_draws_the_same_numbers_as_before():
    """The student's encoder comes from build_encoder now; a run seeded as before must start
    from the very same backbone and projection (timm.create_model, then the 1x1 conv)."""
    torch.manual_seed(7)
    student = Student(StudentConfig(name="resnet18"), out_channels=32)
    torch.manual_seed(7)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    conv = torch.nn.Conv2d(plain.num_features, 32, kernel_size=1)
    for key, value in plain.state_dict().items():
        assert torch.equal(student.backbone_state_dict()[key], value), key
    assert torch.equal(student.projection.weight, conv.weight)


def test_a_checkpoint_from_before_the_encoder_loads(tmp_path):
    """0.1 checkpoints hold `backbone.*` and `head.*`: the load hook renames them."""
    torch.manual_seed(0)
    trained = Student(StudentConfig(name="resnet18", projection="mlp"), out_channels=16)
    old = {}
    for key, value in trained.state_dict().items():
        key = key.replace("encoder.backbone.", "backbone.").replace("projection.", "head.")
        old[key] = value
    assert any(k.startswith("head.") for k in old) and not any(k.startswith("encoder") for k in old)
    torch.save({"student": old}, tmp_path / "last.pt")
    torch.manual_seed(1)
    fresh = Student(StudentConfig(name="resnet18", projection="mlp"), out_channels=16)
    fresh.load_state_dict(torch.load(tmp_path / "last.pt")["student"])  # strict
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    wrapped = torch.nn.Sequential(fresh)  # under a prefix (DDP, compile) too
    wrapped.load_state_dict({f"0.{k}": v for k, v in old.items()})


@pytest.mark.parametrize(
    "family, name, kwargs",
    [
        ("dinov3-convnext", "convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}),
        ("sam2", "sam2_hiera_tiny", {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1)}),
    ],
)
def test_a_student_of_another_family(family, name, kwargs):
    cfg = StudentConfig(family=family, name=name, model_kwargs=kwargs)
    student = Student(cfg, out_channels=12)
    assert type(student.encoder).family == family
    out = student(torch.randn(1, 3, 64, 64), (4, 4))
    assert out.shape == (1, 12, 4, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert student.encoder.backbone_state_dict().keys() == student.backbone.state_dict().keys()
