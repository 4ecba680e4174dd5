"""Dataset layouts beyond the shared data: DDTI's original XML release, a user's own folders,
every mask mode, group columns, and the tables' mean +- std over seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sonodistill.data.masks import read_mask_file
from sonodistill.evaluate.datasets import (
    ClsDataset,
    DatasetSpec,
    SegDataset,
    load_dataset,
    load_ddti,
    load_mask,
)
from sonodistill.evaluate.splits import SPLITS, make_splits
from sonodistill.evaluate.tables import paper_tables

XML = """<?xml version="1.0" encoding="UTF-8"?>
<case><number>7</number><tirads>4a</tirads>
<mark><image>1</image><svg>[{"points": [{"x": 10, "y": 10}, {"x": 29, "y": 10},
{"x": 29, "y": 19}, {"x": 10, "y": 19}], "annotationType": "freehand"}]</svg></mark>
<mark><image>2</image><svg>[{"points": [{"x": 0, "y": 0}, {"x": 9, "y": 0}, {"x": 9, "y": 9},
{"x": 0, "y": 9}], "annotationType": "freehand"}, {"points": [{"x": 20, "y": 20},
{"x": 29, "y": 20}, {"x": 29, "y": 29}, {"x": 20, "y": 29}], "regionType": "freeh</svg></mark>
</case>"""


def _grey(path, size=(40, 30), value=100):
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_ddti_original_release_xml(tmp_path):
    (tmp_path / "7.xml").write_text(XML)
    for k in (1, 2):
        _grey(tmp_path / f"7_{k}.jpg")
    index = load_ddti(tmp_path)
    assert [r.id for r in index.records] == ["7_1", "7_2"]
    assert {r.group for r in index.records} == {"7"}  # the case (patient) is the group
    ds = SegDataset(index.records, size=40)
    # rectangle 10..29 x 10..19 filled with its outline: 20 x 10 px (on a 40 x 30 image)
    r1 = ds.load(0)[1]
    assert ds.records[0].polygons and r1.shape == (40, 40)
    m1 = load_mask(index.records[0], (30, 40))
    assert m1.sum() == 20 * 10
    # two polygons, the second from a truncated JSON string: both rasterised, 10x10 each
    m2 = load_mask(index.records[1], (30, 40))
    assert m2.sum() == 200 and m2[0, 0] == 1 and m2[25, 25] == 1


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "RGBA-alpha"])
def test_mask_modes(tmp_path, mode):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    if mode == "RGBA-alpha":  # drawn as transparency over constant colour
        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[..., 3] = mask
        im = Image.fromarray(rgba, "RGBA")
    else:
        im = Image.fromarray(mask).convert(mode)
    im.save(tmp_path / "m.png")
    out = read_mask_file(tmp_path / "m.png")
    np.testing.assert_array_equal(out, mask > 0)


def test_generic_multiclass_seg_and_class_folders(tmp_path):
    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    for i in range(6):
        _grey(seg / "images" / f"case{i}.png", value=10 * i)
        m = np.zeros((30, 40), np.uint8)
        m[:10] = 1
        m[20:] = 2
        Image.fromarray(m).save(seg / "masks" / f"case{i}.png")
    spec = DatasetSpec(format="seg_folder", root=str(seg), classes=["bg", "a", "b"])
    index = load_dataset(spec, "mine")
    assert index.name == "mine" and index.num_classes == 3 and len(index.records) == 6
    x, y = SegDataset(index.records, 32, binary=False)[0]
    assert set(y.unique().tolist()) == {0, 1, 2} and x.shape == (1, 32, 32)

    cls = tmp_path / "cls"
    for c, n in (("cat", 5), ("dog", 7)):
        (cls / c).mkdir(parents=True)
        for i in range(n):
            _grey(cls / c / f"{i}.png", value=20 * i + (c == "dog"))
    index = load_dataset(DatasetSpec(format="cls_folder", root=str(cls), task_type="cls"))
    assert index.classes == ("cat", "dog") and len(index.records) == 12
    assert int(ClsDataset(index.records, 16)[11][1]) == 1


def test_group_column_is_honoured(tmp_path):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # distinct random images: no duplicates among them
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / f"{i}.png")
    (tmp_path / "groups.csv").write_text(
        "id,group\n" + "".join(f"{i},patient{i // 4}\n" for i in range(40))
    )
    spec = DatasetSpec(format="seg_folder", root=str(root), groups_csv=str(tmp_path / "groups.csv"))
    splits = make_splits(load_dataset(spec))
    where = {i: s for s in SPLITS for i in splits["ids"][s]}
    for p in range(10):
        assert len({where[str(i)] for i in range(4 * p, 4 * p + 4)}) == 1
    assert len(splits["multi_image_groups"]) == 10


def _result(encoder, seed, dice, acc):
    base = {
        "protocol": "finetune",
        "encoder": encoder,
        "fraction": 1.0,
        "seed": seed,
        "best_epoch": 1,
        "wall_s": 1.0,
        "backbone": {"family": "timm CNN", "name": f"net_{encoder}", "params": 2_500_000},
    }
    return [
        {**base, "task": "ddti_seg", "task_type": "seg", "test": {"dice": dice, "iou": dice / 2}},
        {**base, "task": "busi_cls", "task_type": "cls", "test": {"acc": acc, "f1": acc}},
    ]


def test_tables_mean_and_std_over_seeds(tmp_path):
    results = _result("A", 0, 0.5, 0.6) + _result("A", 1, 0.7, 0.8) + _result("B", 0, 0.1, 0.2)
    tasks = {"ddti_seg": "seg", "busi_cls": "cls"}
    ablation = [{"encoder": "A", "augmentation": "US-aware", "mixup": True}]
    paths = paper_tables(results, ["A", "B"], tasks, tmp_path, "NOTE", ablation)
    assert {p.name for p in paths} == {
        "table3_finetune.md",
        "table7_architectures.md",
        "table6_ablation.md",
        "table8_foundation_models.md",
    }
    table3 = (tmp_path / "table3_finetune.md").read_text()
    # A: Dice mean 0.6, sample std of (0.5, 0.7) = 0.1414; B has one seed: value alone
    assert "| A | 0.6000 ± 0.1414 | 0.3000 ± 0.0707 | 0.7000 ± 0.1414 |" in table3
    assert "| B | 0.1000 | 0.0500 | 0.2000 | 0.2000 |" in table3
    assert "NOTE" in table3
    assert "| A | US-aware | ✓ |" in (tmp_path / "table6_ablation.md").read_text()
    table8 = (tmp_path / "table8_foundation_models.md").read_text()  # segmentation Dice only
    assert "| A | timm CNN | net_A | 2.5 | 0.6000 ± 0.1414 |" in table8
    summary = pd.read_csv(tmp_path / "summary.csv").to_dict(orient="records")
    assert {(r["encoder"], r["task"], r["n_seeds"]) for r in summary} == {
        ("A", "ddti_seg", 2),
        ("A", "busi_cls", 2),
        ("B", "ddti_seg", 1),
        ("B", "busi_cls", 1),
    }
