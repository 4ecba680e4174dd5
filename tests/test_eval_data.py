"""Loaders, splits and a smoke suite on the real BUSI and DDTI data (../shared/data).

The images are hashed once per session (module fixture) and the split files are written to a
temporary folder that the smoke suite reuses, which keeps this module within its CPU budget.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sonodistill.errors import UserError
from sonodistill.evaluate.datasets import SegDataset, load_busi, load_ddti, load_mask, read_grey
from sonodistill.evaluate.head_checkpoint import load_head
from sonodistill.evaluate.splits import (
    SPLITS,
    SplitConfig,
    image_hashes,
    load_or_make_splits,
    make_splits,
)
from sonodistill.evaluate.suite import SuiteConfig, run_suite
from sonodistill.evaluate.train import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def busi(shared_data):
    return load_busi(shared_data / "busi", "seg"), load_busi(shared_data / "busi", "cls")


@pytest.fixture(scope="module")
def ddti(shared_data):
    return load_ddti(shared_data / "ddti")


@pytest.fixture(scope="module")
def hashes(busi, ddti):
    return {"busi": image_hashes(busi[0]), "ddti": image_hashes(ddti)}


@pytest.fixture(scope="module")
def splits_dir(tmp_path_factory, busi, ddti, hashes):
    out = tmp_path_factory.mktemp("eval_splits")
    for name, index, h in (
        ("busi_seg", busi[0], hashes["busi"]),
        ("busi_cls", busi[1], hashes["busi"]),
        ("ddti_seg", ddti, hashes["ddti"]),
    ):
        index.name = name
        load_or_make_splits(index, out / f"{name}.json", hashes=h)
    return out


def test_busi_counts_and_masks(busi):
    seg, cls = busi
    assert len(seg.records) == 780
    assert Counter(cls.classes[r.label] for r in cls.records) == {
        "benign": 437,
        "malignant": 210,
        "normal": 133,
    }
    assert sum(len(r.masks) for r in seg.records) == 798
    assert all(len(r.masks) >= 1 for r in seg.records)
    multi = [r for r in seg.records if len(r.masks) > 1]
    # 17 images carry a second lesion mask, one of them a third: 780 + 17 + 1 = 798 files
    assert len(multi) == 17 and max(len(r.masks) for r in multi) == 3


def test_busi_masks_binary_aligned_and_merged(busi):
    seg, _ = busi
    # every mask file has its image's size (read from the PNG headers: fast)
    for r in seg.records:
        size = Image.open(r.image).size
        assert all(Image.open(m).size == size for m in r.masks), r.id
    by_id = {r.id: r for r in seg.records}
    # a merged mask is the union of its files, in every mode the files come in
    for r in [r for r in seg.records if len(r.masks) > 1]:
        image = read_grey(r.image)
        merged = load_mask(r, image.shape)
        assert set(np.unique(merged)) <= {0, 1}
        singles = [load_mask(type(r)(r.id, r.image, (m,)), image.shape) for m in r.masks]
        np.testing.assert_array_equal(merged, np.maximum.reduce(singles))
    # benign (4): two disjoint lesions of 1984 and 624 pixels (one mask RGBA, one 1-bit)
    r = by_id["benign/benign (4)"]
    assert load_mask(r, read_grey(r.image).shape).sum() == 1984 + 624
    normal = load_mask(
        by_id["normal/normal (1)"], read_grey(by_id["normal/normal (1)"].image).shape
    )
    assert normal.sum() == 0
    # the two RGBA masks (benign 4, benign 54) carry their lesion in the colour channels
    for name in ("benign/benign (4)", "benign/benign (54)"):
        r = by_id[name]
        assert load_mask(r, read_grey(r.image).shape).mean() > 0.005


def test_ddti_pairs(ddti):
    assert len(ddti.records) == 637
    ds = SegDataset(ddti.records[:5], size=64)
    for i in range(5):
        x, y = ds[i]
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.shape == (64, 64) and set(y.unique().tolist()) == {0, 1}
    for r in ddti.records[::50]:
        image = read_grey(r.image)
        mask = load_mask(r, image.shape)
        assert 0 < mask.mean() < 0.6
        # nodules sit on tissue, not on the black frame around the scan
        assert image[mask > 0].mean() > 20


def test_splits_deterministic_disjoint_grouped(busi, ddti, hashes):
    seg, cls = busi
    for index, h in ((ddti, hashes["ddti"]), (seg, hashes["busi"]), (cls, hashes["busi"])):
        a, b = make_splits(index, hashes=h), make_splits(index, hashes=h)
        assert a == b
        ids = [set(a["ids"][s]) for s in SPLITS]
        assert sum(map(len, ids)) == len(index.records) == len(set.union(*ids))
        fr = [set(a["fractions"][k]) for k in ("0.05", "0.1", "0.2", "0.5")]
        assert all(x < y for x, y in zip(fr, fr[1:], strict=False))
        assert fr[-1] < ids[0]
        where = {i: s for s in SPLITS for i in a["ids"][s]}
        for group in a["multi_image_groups"]:
            assert len({where[i] for i in group}) == 1
        if index is not ddti:  # the exact duplicate across classes shares a split
            assert where["malignant/malignant (145)"] == where["benign/benign (433)"]
    reseeded = make_splits(ddti, SplitConfig(seed=1), hashes=hashes["ddti"])
    assert reseeded["ids"]["test"] != make_splits(ddti, hashes=hashes["ddti"])["ids"]["test"]


def test_split_sizes(splits_dir, busi):
    ddti = json.loads((splits_dir / "ddti_seg.json").read_text())
    assert [len(ddti["ids"][s]) for s in SPLITS] == [445, 127, 65]
    seg = json.loads((splits_dir / "busi_seg.json").read_text())
    assert [len(seg["ids"][s]) for s in SPLITS] == [544, 156, 80]
    cls = json.loads((splits_dir / "busi_cls.json").read_text())
    label = {r.id: r.label for r in busi[1].records}
    for s, share in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
        counts = Counter(label[i] for i in cls["ids"][s])
        for k, total in ((0, 133), (1, 437), (2, 210)):
            assert abs(counts[k] - share * total) <= 2, (s, k, counts)
    # stratified fractions: each class keeps its share of the training split
    train = Counter(label[i] for i in cls["ids"]["train"])
    tenth = Counter(label[i] for i in cls["fractions"]["0.1"])
    for k in range(3):
        assert tenth[k] == round(0.1 * train[k])


def test_split_file_is_reused(splits_dir, ddti):
    path = splits_dir / "ddti_seg.json"
    stored = json.loads(path.read_text())
    assert load_or_make_splits(ddti, path) == stored  # no hashing: read back as written
    assert load_or_make_splits(ddti, path, SplitConfig()) == stored
    with pytest.raises(UserError, match="made with"):
        load_or_make_splits(ddti, path, SplitConfig(seed=5))


@pytest.mark.slow
def test_smoke_suite_on_real_data(splits_dir, tmp_path, shared_data, fake_student):
    out = tmp_path / "suite"
    (out / "splits").mkdir(parents=True)
    for f in splits_dir.glob("*.json"):
        (out / "splits" / f.name).write_text(f.read_text())
    cfg = SuiteConfig(
        out=str(out),
        data_root=str(shared_data),
        encoders=["random:resnet18@R18-Rand", f"student:{fake_student}@R18-Distill"],
        tasks=["ddti_seg", "busi_seg", "busi_cls"],
        protocols=["linear", "finetune"],
        fractions=[1.0, 0.5],
        seeds=[0],
        train=TrainSettings(seg_size=32, cls_size=32, epochs=1, seg_batch=8, cls_batch=8, subset=8),
        save_models=True,
    )
    tables = run_suite(cfg)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 3 * 2 * 2 + 3 * 2  # tasks x protocols x encoders + 50% fine-tuning
    names = {p.name for p in tables}
    assert names == {
        "baselines.md",
        "table2_linear_probe.md",
        "table3_finetune.md",
        "table4_label_fractions.md",
        "table7_architectures.md",
        "table8_foundation_models.md",
    }
    base = json.loads((out / "tables" / "baselines.json").read_text())
    # every DDTI image has a nodule: all-background scores 0; BUSI's normal cases score 1
    assert base["ddti_seg"]["all_background"]["dice"] == 0.0
    assert 0.0 < base["busi_seg"]["all_background"]["dice"] < 1.0
    assert 0.0 < base["ddti_seg"]["all_foreground"]["dice"] < 0.6
    table3 = (out / "tables" / "table3_finetune.md").read_text()
    assert "32 px" in table3 and "1 epochs" in table3 and "seeds 0" in table3
    assert "| R18-Distill |" in table3 and "ddti_seg Dice" in table3
    table8 = (out / "tables" / "table8_foundation_models.md").read_text()
    assert "| R18-Distill | timm CNN | resnet18 | 11.2 |" in table8  # family, backbone, params
    one = json.loads(runs[0].read_text())
    assert one["n"] == {"train": 8, "val": 8, "test": 8} and one["best_epoch"] == 1
    assert yaml.safe_load((out / "suite.yaml").read_text())["seeds"] == [0]
    # the selected models are kept in the format `sonodistill export --head` reads
    model, spec = load_head(out / "models" / runs[0].stem)
    assert spec.task_type == one["task_type"] and spec.protocol == one["protocol"]
    assert sum(p.numel() for p in model.parameters()) > 0
    assert len(list((out / "models").iterdir())) == len(runs)
    # resumable: a second call trains nothing and rewrites no run file
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    cfg.resume = True
    run_suite(cfg)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
