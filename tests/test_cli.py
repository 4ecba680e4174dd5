"""The `sonodistill` dispatcher: help, unknown commands, and bad input reported by file name."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sonodistill.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name.split()[0] in out for name in COMMANDS)
    assert main(["corpus"]) == 0  # a command of two words: its group lists them
    out = capsys.readouterr().out
    corpus = [name for name in COMMANDS if name.startswith("corpus ")]
    assert len(corpus) == 4 and all(name in out for name in corpus)


def test_unknown_command_is_one_line_with_its_close_match(capsys):
    assert main(["distil"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["sonodistill: error: 'distil': unknown command; did you mean distill?"]


def test_missing_data_names_the_path_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    tiny = ["--teacher.model_kwargs", "{embed_dim: 48, depth: 2, num_heads: 2}"]
    out = ["--out", str(tmp_path / "run")]  # not the default runs/distill of the checkout
    rc = main(["distill", "--data", str(missing), "--teacher.random_init", "true", *tiny, *out])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_wrong_teacher_weights_are_refused_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "not_dinov3.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    tiny = ["--teacher.model_kwargs", "{embed_dim: 48, depth: 2, num_heads: 2}"]
    out = ["--out", str(tmp_path / "run")]
    data = tmp_path / "frames"
    data.mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(data / "frame.png")
    small = ["--batch_size", "1", "--image_size", "64", "--data", str(data)]
    rc = main(["distill", "--teacher.weights", str(bad), *small, *tiny, *out])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not_dinov3.pth" in err and "not a DINOv3 ViT file" in err and "conv1.weight" in err
