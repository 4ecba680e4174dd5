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


def _result(encoder, seed, dice, acc, recipe=None):
    """Two finished runs (DDTI segmentation, BUSI classification) as run_suite writes them:
    four test images each, per-image scores with ids, and the trivial predictors."""
    base = {
        "protocol": "finetune",
        "encoder": encoder,
        "encoder_recipe": recipe or {},
        "fraction": 1.0,
        "seed": seed,
        "best_epoch": 1,
        "wall_s": 1.0,
        "backbone": {"family": "timm CNN", "name": f"net_{encoder}", "params": 2_500_000},
        "n": {"train": 8, "val": 4, "test": 4},
    }
    ids = ["a", "b", "c", "d"]
    per_dice = [dice - 0.05, dice + 0.05, dice - 0.05, dice + 0.05]
    labels = [0, 1, 2, 1]
    correct = round(acc * 4)
    preds = labels[:correct] + [(y + 1) % 3 for y in labels[correct:]]
    return [
        {
            **base,
            "task": "ddti_seg",
            "task_type": "seg",
            "test": {"dice": dice, "iou": dice / 2},
            "per_image": {"id": ids, "dice": per_dice, "iou": [d / 2 for d in per_dice]},
            "baselines": {
                "all_background": {"dice": 0.0, "iou": 0.0},
                "all_foreground": {"dice": 0.2, "iou": 0.11},
            },
        },
        {
            **base,
            "task": "busi_cls",
            "task_type": "cls",
            "test": {"acc": acc, "f1": acc},
            "per_image": {"id": ids, "label": labels, "pred": preds},
            "baselines": {"majority_class": {"acc": 0.5, "f1": 0.2222}},
        },
    ]


def test_tables_statistics_baselines_and_recipes(tmp_path):
    us = {
        "init": "distilled",
        "augmentation": "US-aware",
        "mixup": True,
        "head": "linear",
        "student": "resnet18",
        "teacher": "vit_base_patch16_dinov3_qkvb",
    }
    results = _result("A", 0, 0.5, 0.75, us) + _result("A", 1, 0.7, 0.75, us)
    results += _result("B", 0, 0.1, 0.25, {"init": "random", "student": "resnet18"})
    tasks = {"ddti_seg": "seg", "busi_cls": "cls"}
    ablation = [{"encoder": "A", "augmentation": "US-aware", "mixup": True}]
    expected = {(t, "finetune", e, 1.0): 2 for t in tasks for e in "AB"}
    paths = paper_tables(
        results, ["A", "B"], tasks, tmp_path, "NOTE", ablation, expected, {"busi_cls": 3}
    )
    assert {p.name for p in paths} == {
        "table3_finetune.md",
        "table7_architectures.md",
        "table6_ablation.md",
        "table8_foundation_models.md",
        "comparisons.md",
    }
    table8 = (tmp_path / "table8_foundation_models.md").read_text()  # segmentation Dice only
    assert "| A | timm CNN | net_A | 2.5 | 0.6000 ± 0.1414 [" in table8
    table3 = (tmp_path / "table3_finetune.md").read_text()
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:]
        for line in table3.splitlines()
        if line.startswith("| ") and not line.startswith("| Model")
    }
    # A: Dice mean 0.6, sample std of (0.5, 0.7) = 0.1414; the interval over the 4 images of
    # the per-image means (0.55, 0.65, 0.55, 0.65) lies within [0.55, 0.65]
    dice = rows["A"][0]
    assert dice.startswith("0.6000 ± 0.1414 [") and dice.endswith("(n=2)")
    inside = dice.split("[")[1].split("]")[0]
    assert inside.endswith("; 4 images")  # the test images of the cell
    low, high = (float(v) for v in inside.split(";")[0].split(", "))
    assert 0.55 <= low < 0.6 < high <= 0.65
    # B: one of two seeds, and no better than predicting all foreground (0.2): flagged
    assert rows["B"][0].startswith("0.1000 [") and rows["B"][0].endswith("(n=1 of 2) †")
    assert rows["B"][2].endswith("(n=1 of 2) †")  # accuracy 0.25 <= majority class 0.5
    assert not rows["A"][0].endswith("†")
    assert rows["All background (trivial)"][:2] == ["0.0000", "0.0000"]
    assert rows["All foreground (trivial)"][:2] == ["0.2000", "0.1100"]
    assert rows["Majority class (trivial)"][2].startswith("0.5000")
    assert "NOTE" in table3 and "bootstrap" in table3
    table6 = (tmp_path / "table6_ablation.md").read_text()
    assert (
        "| A | distilled | US-aware | ✓ | linear | resnet18 | vit_base_patch16_dinov3_qkvb |"
        in table6
    )
    table7 = (tmp_path / "table7_architectures.md").read_text()
    assert "| B | random | – | – | – | resnet18 | – |" in table7
    comparisons = (tmp_path / "comparisons.md").read_text()
    line = next(x for x in comparisons.splitlines() if x.startswith("| ddti_seg") and "Dice" in x)
    assert "| B | Dice | -0.5000 |" in line  # B's per-image Dice is A's mean minus 0.5
    summary = pd.read_csv(tmp_path / "summary.csv")
    cell = summary[(summary.model == "B") & (summary.metric == "dice")].iloc[0]
    assert (cell.n, cell.expected, bool(cell.flagged)) == (1, 2, True)


def test_linear_probes_at_label_fractions_get_their_own_table4(tmp_path):
    results = []
    for fraction in (0.1, 1.0):
        for r in _result("A", 0, 0.5 + fraction / 10, 0.75) + _result("B", 0, 0.2, 0.25):
            results.append({**r, "protocol": "linear", "fraction": fraction})
    tasks = {"ddti_seg": "seg", "busi_cls": "cls"}
    paths = paper_tables(results, ["A", "B"], tasks, tmp_path, "NOTE", num_classes={"busi_cls": 3})
    names = {p.name for p in paths}
    assert "table4_label_fractions_linear.md" in names and "table4_label_fractions.md" not in names
    table = (tmp_path / "table4_label_fractions_linear.md").read_text()
    assert "linear probe" in table and "| ddti_seg Dice 10% | busi_cls Acc 10% |" in table
    assert "| A | 0.5100 [" in table  # the 10 % runs, not the 100 % ones
