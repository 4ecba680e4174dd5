"""Distillation inputs: an image folder with a real frame, a corrupt file and a 16-bit copy."""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image

from sonodistill.data.images import ImageFiles, find_images


def test_image_folder_skips_corrupt_files_and_reads_16_bit(shared_data, tmp_path, caplog):
    # a real unlabeled frame (evaluation sets stay out of distillation inputs)
    mha = sorted((shared_data / "corpus/plus/TestImages").glob("*.igs.mha"))[0]
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(mha)))[0].astype(np.uint8)
    Image.fromarray(real).save(tmp_path / "a_real.png")
    (tmp_path / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    deep = (real.astype(np.uint16) * 257).astype(np.uint16)  # same picture on 16 bits
    Image.fromarray(deep).save(tmp_path / "c_sixteen.tif")
    files = find_images(tmp_path)
    assert [f.name for f in files] == ["a_real.png", "b_corrupt.png", "c_sixteen.tif"]

    data = ImageFiles(files, 64)
    with caplog.at_level(logging.WARNING):
        corrupt = data[1]
    assert "b_corrupt.png" in caplog.text  # logged by name
    sixteen = data[2]
    assert corrupt.shape == sixteen.shape == (1, 64, 64) and corrupt.dtype == torch.uint8
    # the corrupt slot is filled by the next readable image; 16 bits scale to the same picture
    assert torch.equal(corrupt, sixteen)
    diff = (sixteen.float() - data[0].float()).abs()
    assert diff.mean() < 2.0
