"""`sonodistill export`: ONNX fp32/int8 checked against PyTorch on real BUSI and DDTI frames."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
import torch
import yaml
from conftest import BUSI, fake_student_run
from PIL import Image

from sonodistill.cli import main
from sonodistill.config import parse_config
from sonodistill.data.listing import FrameRef, frames_tensor
from sonodistill.data.masks import image_mask, mask_files
from sonodistill.deploy.config import export_layout
from sonodistill.deploy.export import ExportConfig, export, head_metric
from sonodistill.deploy.onnx_utils import compare, run_session, session
from sonodistill.deploy.runtimes import BACKENDS, Backend, backend_of_file
from sonodistill.errors import UserError
from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, load_head, save_head
from sonodistill.evaluate.metrics import dice_iou


def _frames(shared):
    return [f"busi={shared / BUSI}", f"ddti={shared / 'ddti'}"]


def test_student_backbone_export_fp32_parity_and_int8(shared_data, tmp_path):
    run = fake_student_run(tmp_path / "run")
    cfg = ExportConfig(
        encoder=f"student:{run}",
        frames=_frames(shared_data),
        out=str(tmp_path / "exp"),
        image_size=64,
        n_calib=4,
        n_check=3,  # != the export's dummy batch of 2: the batch axis must be dynamic
    )
    report = export(cfg)
    fp32, int8 = report["models"]["ort_fp32"], report["models"]["ort_int8"]
    assert report["fp32_ok"] and fp32["max_abs"] <= 1e-3
    assert fp32["cosine_min"] > 0.99999
    assert 0.9 < int8["cosine_mean"] <= 1.0 + 1e-9  # int8 is lossy but must stay close
    assert int8["max_abs"] > fp32["max_abs"]  # the int8 graph really is quantized
    assert report["datasets"] == ["busi", "ddti"] and report["check_frames"] == 3
    assert report["output"] == "features [512, 2, 2]"

    model = onnx.load(str(tmp_path / "exp" / "model_fp32.onnx"))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    ops = {n.op_type for n in onnx.load(str(tmp_path / "exp" / "model_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    saved = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert saved["models"]["ort_int8"]["cosine_mean"] == int8["cosine_mean"]
    assert "| ort_int8 | ONNX Runtime int8 |" in (tmp_path / "exp" / "report.md").read_text()


def test_compare_metrics():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.5], [0.0, -2.0]])
    m = compare(a, b)
    assert m["max_abs"] == 4.0
    assert m["cosine_min"] == pytest.approx(-1.0)
    assert m["cosine_mean"] == pytest.approx((1 / np.sqrt(1.25) - 1) / 2)


def test_head_metric_and_masks(shared_data):
    logits = np.full((2, 1, 4, 4), -1.0)
    target = np.zeros((2, 4, 4), np.int64)
    logits[0, 0, :2], target[0, :1] = 1.0, 1  # |P|=8, |T|=4, overlap 4 -> 8/12
    spec = HeadSpec(task_type="segmentation", encoder="random:resnet18")
    assert spec.task_type == "seg"
    name, value = head_metric(spec, logits, target)  # evaluate's rule: empty/empty counts 1
    assert name == "dice" and value == pytest.approx((8 / 12 + 1.0) / 2)
    busi = shared_data / BUSI / "benign" / "benign (100).png"
    assert [m.name for m in mask_files(busi)] == [
        "benign (100)_mask.png",
        "benign (100)_mask_1.png",
    ]
    union = image_mask(busi) > 0
    parts = [np.asarray(Image.open(m).convert("L")) > 0 for m in mask_files(busi)]
    np.testing.assert_array_equal(union, parts[0] | parts[1])  # both lesions kept
    assert (union & ~parts[0]).any()  # the second mask adds pixels
    assert image_mask(busi, 64).shape == (64, 64)
    ddti = sorted((shared_data / "ddti" / "image").glob("*.PNG"))[0]
    assert mask_files(ddti) == [shared_data / "ddti" / "mask" / ddti.name]


def test_segmentation_head_export_reports_dice_change(shared_data, tmp_path):
    # The format `sonodistill evaluate` saves: its U-Net around a resnet18 encoder.
    spec = HeadSpec(task_type="seg", encoder="random:resnet18", protocol="finetune", num_classes=2)
    torch.manual_seed(0)
    save_head(build_head_model(spec), spec, tmp_path / "head")
    cfg = ExportConfig(
        model=str(tmp_path / "head"),
        frames=_frames(shared_data),
        test_set=str(shared_data / "ddti"),
        n_test=4,
        out=str(tmp_path / "exp"),
        image_size=64,
        n_calib=2,
        n_check=2,
    )
    report = export(cfg)
    assert report["fp32_ok"] and report["output"] == "logits [1, 64, 64]"
    test = report["test"]
    assert test["metric"] == "dice" and test["n"] == 4
    assert 0.0 <= test["torch"] <= 1.0
    assert abs(test["ort_fp32_delta"]) < 1e-2  # same logits up to 1e-3: masks barely move
    # The int8 figure, recomputed here from the saved int8 graph on the same test images.
    refs = [FrameRef("ddti", f) for f in test["files"]]
    assert len(refs) == 4 and all(mask_files(f.file) for f in refs)
    int8 = session(tmp_path / "exp" / "model_int8.onnx")
    logits = run_session(int8, frames_tensor(refs, 64).numpy())
    masks = np.stack([image_mask(f.file, 64) for f in refs])
    dice = dice_iou((logits[:, 0] > 0).astype(np.int64), masks.astype(np.int64))[0].mean()
    assert test["ort_int8"] == pytest.approx(dice, abs=1e-6)
    assert test["ort_int8_delta"] == pytest.approx(test["ort_int8"] - test["torch"], abs=1e-9)


def test_classification_head_plain_timm_format(shared_data, tmp_path, capsys):
    names = ["benign", "malignant", "normal"]
    spec = HeadSpec(task_type="cls", arch="resnet18", num_classes=3, class_names=names)
    torch.manual_seed(0)
    save_head(timm.create_model("resnet18", num_classes=3), spec, tmp_path / "head")
    model, loaded = load_head(tmp_path / "head")
    assert loaded.class_names == names
    argv = (
        f"--head {tmp_path / 'head'} --frames+ busi={shared_data / BUSI} --out {tmp_path / 'exp'}"
    )
    argv += f" --test_set {shared_data / BUSI} --n_test 6 --image_size 64 --n_calib 2 --n_check 2"
    argv = [*argv.split(), "--int8", "false"]  # the flags before 0.2: --head, --int8
    assert main(["export", *argv]) == 0
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "sonodistill export: --head is deprecated, use --model (accepted until 0.3)",
        "sonodistill export: --int8 false is deprecated, use --backends [ort_fp32] "
        "(accepted until 0.3)",
    ]
    report = json.loads((tmp_path / "exp" / "report.json").read_text())
    assert set(report["models"]) == {"ort_fp32"}
    assert report["test"]["metric"] == "accuracy" and report["test"]["ort_fp32_delta"] == 0.0
    # The exported logits equal the module's on the same frames.
    sess = session(tmp_path / "exp" / "model_fp32.onnx")
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_session(sess, x.numpy()), ref, atol=1e-4)


def test_evaluate_head_saved_from_a_student_run_loads_without_the_run(tmp_path):
    import shutil

    from sonodistill.evaluate.head_checkpoint import save_evaluate_head
    from sonodistill.evaluate.heads import build_model

    run = fake_student_run(tmp_path / "run")
    model = build_model(f"student:{run}", "cls", "finetune", 3).eval()
    save_evaluate_head(
        model,
        "cls",
        "finetune",
        3,
        tmp_path / "head",
        ["benign", "malignant", "normal"],
    )
    shutil.rmtree(run)  # the head must not need the distill run any more
    loaded, spec = load_head(tmp_path / "head")
    assert spec.encoder["family"] == "timm" and spec.encoder["name"] == "resnet18"
    assert spec.encoder["weights"] == "random"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_executorch_without_executorch_installed_is_refused_before_writing(
    shared_data, tmp_path, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # executorch not installed
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "executorch" else find_spec(name, *a),
    )
    cfg = ExportConfig(
        model=str(tmp_path / "head"),  # the option is refused before the model is read
        frames=[f"busi={shared_data / BUSI}"],
        backends=["ort_fp32", "executorch_int8"],
        out=str(tmp_path / "export"),
    )
    with pytest.raises(
        UserError, match="^--backends executorch_int8: .*pip install 'sonodistill\\[ondevice\\]'"
    ):
        export(cfg)
    assert not (tmp_path / "export").exists()


def test_an_export_config_written_before_0_2_reads_as_today(tmp_path):
    old = tmp_path / "export.yaml"
    old.write_text(yaml.safe_dump({"head": "runs/m", "int8": False, "executorch": ["int8"]}))
    cfg = parse_config(ExportConfig, ["--config", str(old)], "sonodistill export")
    assert cfg.model == "runs/m" and cfg.backends == ["ort_fp32", "executorch_int8"]
    with pytest.raises(UserError, match=r"^--executorch \[fp16\]: expected a list of fp32, int8$"):
        parse_config(ExportConfig, ["--executorch", "[fp16]"], "sonodistill export")


def test_a_backend_registered_from_outside_is_written_checked_and_owned(shared_data, tmp_path):
    # What a plugin does: one record whose functions are named as strings, imported on use.
    toy = Backend(
        "toy ONNX fp32",
        "model_toy.onnx",
        open="sonodistill.deploy.onnx_utils:open_session",
        write="sonodistill.deploy.onnx_utils:write_fp32",
    )
    BACKENDS.register("toy_ort", toy)
    try:
        assert "model_toy.onnx" in export_layout().owned  # --overwrite removes it
        cfg = ExportConfig(
            encoder="random:test_resnet",
            frames=[f"ddti={shared_data / 'ddti' / 'image'}"],
            backends=["toy_ort"],
            out=str(tmp_path / "exp"),
            image_size=32,
            n_check=2,
        )
        report = export(cfg)
        assert list(report["models"]) == ["toy_ort"] and report["fp32_ok"]
        assert report["models"]["toy_ort"]["label"] == "toy ONNX fp32"
        assert report["calib_frames"] == 0  # no int8 backend: no calibration frames read
        assert (tmp_path / "exp" / "model_toy.onnx").is_file()
        assert not (tmp_path / "exp" / "model_fp32.onnx").exists()
        assert backend_of_file(tmp_path / "exp" / "model_toy.onnx") == "toy_ort"  # predict's
    finally:
        BACKENDS.unregister("toy_ort")
