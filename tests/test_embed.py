"""`sonodistill embed` on real frames: BUSI, DDTI and COVID-BLUES lung video frames."""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUSI, TINY_TEACHER_KWARGS, VIDEOS, extract_lung_frames, fake_student_run
from PIL import Image

from sonodistill.cli import main
from sonodistill.data.listing import collect_frames, list_source, load_frames
from sonodistill.data.masks import is_mask
from sonodistill.evaluate.config import EmbedConfig
from sonodistill.evaluate.embed import embed, load_embeddings
from sonodistill.models import to_model_input
from sonodistill.models.encoders import build_encoder


@pytest.fixture(scope="module")
def lung_png(shared_data, tmp_path_factory) -> Path:
    return extract_lung_frames(shared_data, tmp_path_factory.mktemp("lung"))


def test_busi_listing_skips_masks_and_labels_classes(shared_data):
    frames = list_source(f"busi={shared_data / BUSI}", label_component=0)
    counts = pd.Series([f.dataset for f in frames]).value_counts().to_dict()
    # The README's counts: 437 benign, 210 malignant, 133 normal images (798 masks not listed).
    assert counts == {"busi/benign": 437, "busi/malignant": 210, "busi/normal": 133}
    assert not any("_mask" in f.file for f in frames)


def test_ddti_listing_skips_mask_folder(shared_data):
    frames = list_source(str(shared_data / "ddti"))
    assert len(frames) == 637
    assert {f.dataset for f in frames} == {"ddti"}
    assert all(Path(f.file).parent.name == "image" for f in frames)
    assert is_mask(shared_data / "ddti" / "mask" / "1.PNG")


def test_video_frames_read_directly_match_pyav(shared_data):
    video = sorted((shared_data / VIDEOS).glob("*.mp4"))[0]
    frames = list_source(f"lung={video}", frames_per_video=3)
    assert [f.frame for f in frames][0] == 0 and len(frames) == 3
    got = list(load_frames(frames, 350))  # clips are 350x350: no resize
    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    for frame, arr in zip(frames, got, strict=True):
        # Frames go through the corpus reader (RGB, then OpenCV's luma): PyAV's direct grey
        # conversion rounds differently by at most one level; a neighbouring frame differs more.
        diff = np.abs(arr.astype(int) - decoded[frame.frame])
        assert diff.max() <= 1
        neighbour = decoded[frame.frame + 1 if frame.frame + 1 < len(decoded) else frame.frame - 1]
        assert np.abs(arr.astype(int) - neighbour).max() > 1


def test_max_per_source_is_seeded_and_anatomy_mapped(shared_data):
    sources = [f"busi={shared_data / BUSI}", f"ddti={shared_data / 'ddti'}"]
    a = collect_frames(sources, 5, anatomy=["busi=breast", "ddti=thyroid"], seed=3)
    b = collect_frames(sources, 5, anatomy=["busi=breast", "ddti=thyroid"], seed=3)
    assert [f.file for f in a] == [f.file for f in b] and len(a) == 10
    assert {(f.dataset, f.anatomy) for f in a} == {("busi", "breast"), ("ddti", "thyroid")}


def test_manifest_parquet(shared_data, tmp_path):
    video = sorted((shared_data / VIDEOS).glob("*.mp4"))[0]
    ddti = sorted((shared_data / "ddti" / "image").glob("*.PNG"))[:2]
    manifest = pd.DataFrame(
        {
            "dataset": ["ddti", "ddti", "lung"],
            "anatomy": ["thyroid", "thyroid", "lung"],
            "file": [str(ddti[0]), str(ddti[1]), str(video)],
            "frame": [None, None, 7],
        }
    )
    manifest.to_parquet(tmp_path / "corpus.parquet")
    frames = collect_frames([str(tmp_path / "corpus.parquet")])
    assert [(f.dataset, f.anatomy, f.frame) for f in frames] == [
        ("ddti", "thyroid", -1),
        ("ddti", "thyroid", -1),
        ("lung", "lung", 7),
    ]
    assert len(list(load_frames(frames, 32))) == 3


def test_embed_three_real_sources_three_encoders(shared_data, lung_png, tmp_path):
    student = fake_student_run(tmp_path / "run")
    cfg = EmbedConfig(
        sources=[f"busi={shared_data / BUSI}", f"ddti={shared_data / 'ddti'}", f"lung={lung_png}"],
        encoders=[
            "random:resnet18@R18-Rand",
            f"student:{student}@R18-Distill",
            {
                "family": "dinov3",
                "weights": "random",
                "label": "ViT-tiny",
                "model_kwargs": TINY_TEACHER_KWARGS,
            },
        ],
        out=str(tmp_path / "emb"),
        image_size=64,
        max_per_source=5,
        batch_size=4,
        anatomy=["busi=breast", "ddti=thyroid", "lung=lung"],
    )
    out = embed(cfg)
    meta, arrays = load_embeddings(out)
    assert meta.dataset.value_counts().to_dict() == {"busi": 5, "ddti": 5, "lung": 5}
    assert set(meta.anatomy) == {"breast", "thyroid", "lung"}
    assert arrays["R18-Rand"].shape == (15, 512) and arrays["R18-Distill"].shape == (15, 512)
    assert arrays["ViT-tiny"].shape == (15, 48) and arrays["ViT-tiny.cls"].shape == (15, 48)
    assert np.isfinite(arrays["R18-Distill"]).all()
    index = json.loads((out / "embeddings.json").read_text())
    assert [m["label"] for m in index["models"]] == ["R18-Rand", "R18-Distill", "ViT-tiny"]
    assert (out / "config.yaml").is_file()

    # Independent recomputation of one row: PIL grey -> OpenCV area resize (the documented
    # image path, docs/protocol.md) -> encoder.pooled.
    row = meta.iloc[7]
    grey = np.array(Image.open(row.file).convert("L"))
    img = cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(img).float().div(255)[None, None]
    enc = build_encoder(f"student:{student}").eval()
    with torch.no_grad():
        expected = enc.pooled(to_model_input(x))[0].numpy()
    np.testing.assert_allclose(arrays["R18-Distill"][7], expected, rtol=1e-4, atol=1e-5)
    # Different weights give different embeddings (the student is not the random encoder).
    assert not np.allclose(arrays["R18-Distill"], arrays["R18-Rand"])


def test_cli_labels_and_one_run_per_folder(shared_data, tmp_path, capsys):
    out = tmp_path / "e"
    flags = f"--sources+ ddti={shared_data / 'ddti'} --max_per_source 3 --image_size 32 --out {out}"
    argv = ["embed", *flags.split()]
    assert main([*argv, "--encoders", "[random:resnet18@r18, random:resnet18]"]) == 0
    assert np.load(out / "r18.npy").shape == (3, 512)
    assert np.load(out / "resnet18-rand.npy").shape == (3, 512)  # the suite's label of the spec
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main([*argv, "--encoders", "[random:resnet18@other]"]) == 2  # the folder holds a run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a sonodistill embed run" in err[0], err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert main([*argv, "--encoders", "[random:resnet18@other]", "--overwrite", "true"]) == 0
    assert sorted(p.name for p in out.glob("*.npy")) == ["other.npy"]  # no stale arrays
