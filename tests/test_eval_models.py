"""Downstream models: the U-Net is smp's on the encoder's own pyramid, probes stay frozen, ViT
heads fit."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from conftest import TINY_TEACHER
from safetensors.torch import load_file

from sonodistill.evaluate.heads import (
    Classifier,
    LightSegModel,
    LinearSegProbe,
    UNetSeg,
    build_model,
    trainable_parameters,
)
from sonodistill.evaluate.train import SegLoss
from sonodistill.models.encoders import build_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_unet_is_smps_decoder_on_the_encoders_own_weights(name):
    torch.manual_seed(0)
    encoder = build_encoder(f"random:{name}")
    unet = UNetSeg(encoder, num_classes=2)
    assert unet.encoder is encoder  # fine-tuning trains these very weights: nothing is copied
    # smp.Unet(tu-NAME) gives the same decoder and head for the same pyramid (strides 2-32)
    reference = smp.Unet(f"tu-{name}", encoder_weights=None, classes=1)
    ours = {k: v.shape for k, v in unet.state_dict().items() if not k.startswith("encoder.")}
    theirs = {
        k.replace("decoder.", "unet_decoder.", 1): v.shape
        for k, v in reference.state_dict().items()
        if not k.startswith("encoder.")
    }
    assert ours == theirs
    x = torch.rand(2, 1, 64, 64)
    y = unet(x)
    assert y.shape == (2, 1, 64, 64)
    with torch.no_grad():  # the encoder's weights shape the output
        next(iter(encoder.backbone.parameters())).mul_(0.5)
    assert not torch.allclose(unet(x), y)


def test_student_weights_reach_the_unet(fake_student):
    model = build_model(f"student:{fake_student}", "seg", "finetune", num_classes=2)
    saved = load_file(fake_student / "student_backbone.safetensors")
    assert torch.equal(
        model.encoder.backbone.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"]
    )


def test_linear_probe_trains_only_its_head():
    model = build_model("random:resnet18", "seg", "linear", num_classes=2)
    assert isinstance(model, LinearSegProbe)
    params = trainable_parameters(model)
    assert params == list(model.head.parameters())
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    x, y = torch.rand(4, 1, 64, 64), (torch.rand(4, 64, 64) > 0.5).long()
    loss = SegLoss(2)(model(x), y)
    loss.backward()
    opt.step()
    # BatchNorm running statistics and weights untouched: the encoder stayed in eval mode
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    assert model(x).shape == (4, 1, 64, 64)


def test_classifiers_and_vit_heads():
    cnn = build_model("random:resnet18", "cls", "finetune", num_classes=3)
    assert isinstance(cnn, Classifier) and cnn.head.in_features == 512
    assert len(trainable_parameters(cnn)) > 2
    probe = build_model("random:resnet18", "cls", "linear", num_classes=3)
    assert len(trainable_parameters(probe)) == 2
    vit_cls = build_model(TINY_TEACHER, "cls", "linear", num_classes=3)
    assert vit_cls.head.in_features == 2 * 48  # CLS token + mean patch token
    assert vit_cls(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    vit_seg = build_model(TINY_TEACHER, "seg", "finetune", num_classes=2)
    assert isinstance(vit_seg, LightSegModel)  # the paper's ViT reference head by default
    assert vit_seg(torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    multi = build_model(TINY_TEACHER, "seg", "linear", num_classes=4)
    assert multi(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_timm_weights_file_reaches_the_classifier(tmp_path):
    torch.manual_seed(7)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)  # with its fc
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    model = build_model(f"timm:resnet18={path}", "cls", "finetune", num_classes=3)
    assert torch.equal(model.encoder.backbone.layer2[0].conv1.weight, net.layer2[0].conv1.weight)
    assert model.head.out_features == 3  # the file's 10-class fc is not reused


def test_build_model_looks_protocols_and_decoders_up_in_their_registries():
    from sonodistill.errors import UserError
    from sonodistill.evaluate.config import PROTOCOLS, SEG_DECODERS, Protocol

    assert SEG_DECODERS.get("unet") is UNetSeg and SEG_DECODERS.get("light") is LightSegModel
    with pytest.raises(UserError, match="seg_decoder unte: unknown segmentation decoder.*unet"):
        build_model("random:resnet18", "seg", "finetune", 2, "unte")
    PROTOCOLS.register("frozen_toy", Protocol(frozen=True, title="a plugin's frozen protocol"))
    try:
        model = build_model("random:resnet18", "seg", "frozen_toy", 2)
        assert isinstance(model, LinearSegProbe) and not trainable_parameters(model.encoder)
    finally:
        PROTOCOLS.unregister("frozen_toy")


def test_a_model_folders_spec_is_read_without_torch(tmp_path):
    import subprocess
    import sys

    import yaml

    from sonodistill.errors import UserError
    from sonodistill.evaluate.head_checkpoint import read_head_spec

    spec = {"task_type": "segmentation", "encoder": "random:resnet18", "image_size": 64}
    (tmp_path / "head.yaml").write_text(yaml.safe_dump(spec))
    code = (
        "import sys\n"
        "from sonodistill.evaluate.head_checkpoint import HEAD_WEIGHTS, read_head_spec\n"
        f"spec = read_head_spec({str(tmp_path)!r})\n"
        "print(spec.task_type, spec.image_size, HEAD_WEIGHTS, 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["seg", "64", "model.safetensors", "False"]
    (tmp_path / "head.yaml").write_text("task_type: seg\nnum_clases: 3\n")
    with pytest.raises(UserError, match="head.yaml: num_clases: unknown key; did you mean num_c"):
        read_head_spec(tmp_path)
    (tmp_path / "head.yaml").write_text("task_type: depth\n")
    with pytest.raises(UserError, match="task_type depth: must be one of seg, cls"):
        read_head_spec(tmp_path)
