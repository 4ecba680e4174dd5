"""`sonodistill analyze`: separation metrics (checked on constructed cases) and the figure + table
on embeddings of real BUSI, DDTI and lung frames."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from conftest import BUSI, extract_lung_frames, fake_student_run

from sonodistill.cli import main
from sonodistill.errors import UserError
from sonodistill.evaluate.analyze import (
    AnalyzeConfig,
    analyze,
    colour_map,
    knn_accuracy,
    silhouette,
)
from sonodistill.evaluate.embed import EmbedConfig, embed


def _clusters(n_per: int = 30, dim: int = 16, spread: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 5.0
    x = np.concatenate([c + spread * rng.standard_normal((n_per, dim)) for c in centres])
    labels = np.repeat(np.array(["a", "b", "c"]), n_per)
    return x, labels


def test_separated_clusters_score_high_and_shuffled_labels_near_chance():
    x, labels = _clusters()
    groups = np.arange(len(x))
    assert silhouette(x, labels) > 0.8
    assert knn_accuracy(x, labels, groups)["knn_acc"] == 1.0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert abs(silhouette(x, shuffled)) < 0.1
    assert knn_accuracy(x, shuffled, groups)["knn_acc"] < 0.6  # chance = 1/3


def test_knn_keeps_near_duplicate_frames_of_a_clip_in_one_fold():
    # 30 "clips" of 5 identical frames, labels random per clip: features carry no label
    # information, so only leakage between folds could lift the accuracy above chance.
    rng = np.random.default_rng(0)
    clip_x = rng.standard_normal((30, 8))
    clip_y = np.array(["a", "b", "c"] * 10)
    x, labels = np.repeat(clip_x, 5, axis=0), np.repeat(clip_y, 5)
    grouped = knn_accuracy(x, labels, np.repeat(np.arange(30), 5), k=3)["knn_acc"]
    leaky = knn_accuracy(x, labels, np.arange(150), k=3)["knn_acc"]
    assert leaky > 0.95  # identical frames on both sides of the split
    assert grouped < 0.6


def test_colour_map_shared_top_k_and_grey_rest():
    labels = pd.Series(["x"] * 5 + ["y"] * 3 + ["z"] * 1)
    colours, top = colour_map(labels, top_k=2)
    assert top == ["x", "y"]
    assert colours["z"] == (0.7, 0.7, 0.7, 1.0) and colours["x"] != colours["y"]


@pytest.fixture(scope="module")
def real_embeddings(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    lung = extract_lung_frames(shared_data, tmp / "lung", clips=3, per_clip=4)
    student = fake_student_run(tmp / "run")
    cfg = EmbedConfig(
        sources=[f"busi={shared_data / BUSI}", f"ddti={shared_data / 'ddti'}", f"lung={lung}"],
        encoders=["random:resnet18@R18-Rand", f"student:{student}@R18-Distill"],
        out=str(tmp / "emb"),
        image_size=64,
        max_per_source=12,
        batch_size=12,
    )
    return embed(cfg)


def test_analyze_real_frames_writes_figure_and_table(real_embeddings, tmp_path):
    cfg = AnalyzeConfig(
        embeddings=str(real_embeddings), out=str(tmp_path), knn_k=3, tsne_iter=250, threads=1
    )
    out = analyze(cfg)
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics.model.tolist() == ["R18-Rand", "R18-Distill"]
    assert (metrics.n == 36).all() and (metrics.datasets == 3).all()
    assert metrics.chance.round(4).eq(round(1 / 3, 4)).all()
    assert metrics.silhouette.between(-1, 1).all() and metrics.knn_acc.between(0, 1).all()
    # Three sources this different (breast, thyroid, convex lung clips) are told apart even by
    # a random CNN: dataset ID well above chance.
    assert (metrics.knn_acc > 0.6).all()
    assert (out / "tsne.png").stat().st_size > 10_000
    assert (out / "metrics.md").read_text().startswith("| model |")
    proj = pd.read_parquet(out / "projection.parquet")
    assert {"R18-Rand_x", "R18-Distill_y", "dataset"} <= set(proj.columns) and len(proj) == 36


def test_cli_and_umap_option(real_embeddings, tmp_path, capsys):
    argv = ["--embeddings", str(real_embeddings), "--out", str(tmp_path), "--models", "[R18-Rand]"]
    assert main(["analyze", *argv, "--tsne_iter", "250", "--threads", "1"]) == 0
    assert "R18-Rand" in capsys.readouterr().out
    assert main(["analyze", *argv, "--tsne_iter", "250"]) == 2  # a folder holds one analysis
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a sonodistill analyze run" in err[0], err
    assert "--overwrite true" in err[0] and "--resume" not in err[0]
    before = sorted(p.name for p in tmp_path.iterdir())
    again = [*argv, "--method", "umap", "--overwrite", "true"]
    if importlib.util.find_spec("umap") is None:  # refused before the old analysis is touched
        assert main(["analyze", *again]) == 2
        assert "sonodistill[umap]" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    else:
        assert main(["analyze", *again]) == 0
        assert (tmp_path / "umap.png").is_file() and not (tmp_path / "tsne.png").exists()
    with pytest.raises(UserError, match="--models nope: unknown model"):  # before any write
        analyze(AnalyzeConfig(str(real_embeddings), str(tmp_path / "nope"), models=["nope"]))
    assert not (tmp_path / "nope").exists()
