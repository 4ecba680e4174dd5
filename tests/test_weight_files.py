"""Bad weights files and sizes, through the CLI as a user meets them: one line naming the file
(or option) and what fits, no traceback, a non-zero exit, and nothing written."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, VITSP, official_shapes, perturbed_official
from PIL import Image
from safetensors.torch import save_file

from sonodistill.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

VITL = {"dim": 1024, "depth": 24, "heads": 16, "hidden": 4096, "swiglu": False}


def shape_only(arch: dict) -> dict[str, torch.Tensor]:
    """Every tensor of an official file at its true shape, backed by one number (a tiny file)."""
    return {k: torch.zeros(1).expand(s) for k, s in official_shapes(**arch).items()}


def make(case: str, tmp_path) -> tuple[object, str]:
    """(weights path, what the message must say) for one bad-file case."""
    weights = perturbed_official(TINY)
    good, good_pth = tmp_path / "good.safetensors", tmp_path / "good.pth"
    save_file(weights, str(good))
    torch.save(weights, good_pth)
    path = tmp_path / {"folder": "snapshot", "two files": "twofiles"}.get(case, "weights")
    if case.endswith("safetensors"):
        path = path.with_suffix(".safetensors")
        data = good.read_bytes()
        path.write_bytes(
            {
                "empty safetensors": b"",
                "truncated safetensors": data[: len(data) // 2],
                "garbage safetensors": os.urandom(4096),
            }[case]
        )
        return path, "not a readable .safetensors file" if "empty" not in case else "empty file"
    if case.endswith("pth"):
        path = path.with_suffix(".pth")
        data = good_pth.read_bytes()
        path.write_bytes(
            {
                "empty pth": b"",
                "truncated pth": data[: len(data) // 2],
                "garbage pth": os.urandom(4096),
            }[case]
        )
        return path, "not a readable weights file" if "empty" not in case else "empty file"
    if case == "folder":
        path.mkdir()
        (path / "config.json").write_text("{}")
        return path, "a folder with no weights file"
    if case == "two files":
        path.mkdir()
        torch.save({}, path / "a.pth")
        torch.save({}, path / "b.pth")
        return path, r"several weights files \(a\.pth, b\.pth\)"
    path = path.with_suffix(".pth")
    if case == "wrong size":
        torch.save(shape_only(VITL), path)
        return (
            path,
            r"ViT-L/16 \(width 1024, depth 24, MLP\) .*--teacher.name vit_large_patch16_dino",
        )
    if case == "swiglu":
        torch.save(shape_only(VITSP), path)
        return path, "ViT-S\\+/16 .*SwiGLU.*--teacher.name vit_small_plus_patch16_dinov3_qkvb"
    if case == "training checkpoint without weights":
        torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "iteration": torch.tensor(3)}, path)
        return path, "no state dict found \\(top-level keys: optimizer, iteration\\)"
    if case == "pickled objects":
        torch.save({"model": {"cls_token": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
        return path, "holds Python objects besides tensors"
    if case == "another family":
        torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
        return path, "not a DINOv3 ViT file \\(first tensors: conv1.weight"
    raise ValueError(case)


CASES = [
    "empty safetensors",
    "truncated safetensors",
    "garbage safetensors",
    "empty pth",
    "truncated pth",
    "garbage pth",
    "folder",
    "two files",
    "wrong size",
    "swiglu",
    "training checkpoint without weights",
    "pickled objects",
    "another family",
]


def one_line_error(capsys, rc: int, must: str, name: object) -> str:
    import re

    err = capsys.readouterr().err.strip()
    assert rc != 0 and "Traceback" not in err
    assert "\n" not in err, err
    assert str(name) in err and re.search(must, err), err
    return err


TINY_KWARGS = "{embed_dim: 48, depth: 2, num_heads: 2}"  # TINY_TEACHER_KWARGS as a flag


def frames(tmp_path) -> str:
    """One batch of grey frames: data that passes distill's checks, so the teacher is next."""
    folder = tmp_path / "frames"
    folder.mkdir(exist_ok=True)
    for i in range(8):
        Image.fromarray(np.full((64, 64), 16 * i, np.uint8)).save(folder / f"{i}.png")
    return f"{folder} --batch_size 8"


@pytest.mark.parametrize("case", CASES)
def test_distill_refuses_bad_teacher_files_in_one_line_writing_nothing(
    case, tmp_path, capsys, shared_data
):
    path, must = make(case, tmp_path)
    out = tmp_path / "run"
    kwargs = "{depth: 1}" if case in ("wrong size", "swiglu") else TINY_KWARGS
    flags = f"--data {frames(tmp_path)} --out {out} --teacher.weights {path}"
    rc = main(["distill", *flags.split(), "--teacher.model_kwargs", kwargs])
    one_line_error(capsys, rc, must, path)
    assert not out.exists()


@pytest.mark.parametrize("case", ["garbage safetensors", "folder"])
def test_embed_refuses_bad_files_writing_nothing(case, tmp_path, capsys, shared_data):
    path, must = make(case, tmp_path)
    out = tmp_path / "emb"
    flags = f"--sources+ ddti={shared_data / 'ddti'} --out {out} --encoders [dinov3:{path}]"
    one_line_error(capsys, main(["embed", *flags.split()]), must, path)
    assert not out.exists()


def test_a_file_of_another_family_names_the_family_that_reads_it(tmp_path, capsys, shared_data):
    path = tmp_path / "dinov3_convnext_tiny.safetensors"
    convnext = timm.create_model("convnext_tiny", num_classes=0, depths=(1, 1, 1, 1))
    save_file(convnext.state_dict(), str(path))
    out = tmp_path / "run"
    flags = f"--data {frames(tmp_path)} --out {out} --teacher.weights {path}"
    rc = main(["distill", *flags.split(), "--teacher.model_kwargs", TINY_KWARGS])
    one_line_error(capsys, rc, r"holds a DINOv3 ConvNeXt \(family dinov3-convnext\) model", path)
    assert not out.exists()


@pytest.mark.parametrize("command", ["distill", "embed", "export", "evaluate", "bench"])
def test_input_sizes_off_the_patch_grid_are_refused_before_writing(
    command, tmp_path, capsys, shared_data
):
    out = tmp_path / "out"
    tiny = f'{{"family": "dinov3", "weights": "random", "model_kwargs": {TINY_KWARGS}}}'
    argv = {
        "distill": f"--data {frames(tmp_path)} --img_size 100 --teacher.random_init true",
        "embed": f"--sources+ ddti={shared_data / 'ddti'} --image_size 100",
        "export": f"--encoder dinov3:random --frames+ ddti={shared_data / 'ddti'} --image_size 100",
        "evaluate": f"--data_root {shared_data} --tasks [ddti_seg] --train.seg_size 100",
        "bench": "--student random:resnet18 --image_size 100",
    }[command].split()
    extra = {
        "distill": ["--teacher.model_kwargs", TINY_KWARGS],
        "embed": ["--encoders", f"[{tiny}]"],
        "export": [],
        "evaluate": ["--encoders", f"[{tiny}]"],
        "bench": ["--teacher", tiny],
    }[command]
    rc = main([command, "--out", str(out), *argv, *extra])
    option = {"distill": "--img_size", "evaluate": "--train.seg_size"}.get(command, "--image_size")
    one_line_error(capsys, rc, f"{option} size 100x100 .* multiples of 16", option)
    assert not out.exists()
