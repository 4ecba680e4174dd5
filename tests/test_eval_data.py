"""Loaders, splits, folds and a smoke suite on the real BUSI and DDTI data (../shared/data).

The acceptance checks of the splits use the tests' own similarity (`conftest.pixel_correlation`:
Pearson correlation of 64 x 64 bilinear thumbnails), not the project's near-duplicate notion.
Images are decoded once per session (`eval_sets`); split files are made once per module.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from sonodistill.data.greys import read_grey
from sonodistill.errors import UserError
from sonodistill.evaluate.audit import LeakError
from sonodistill.evaluate.config import TrainSettings
from sonodistill.evaluate.datasets import SegDataset, load_mask
from sonodistill.evaluate.estimate import dry_run
from sonodistill.evaluate.head_checkpoint import load_head
from sonodistill.evaluate.splits import (
    SPLITS,
    SplitConfig,
    load_or_make_splits,
    make_folds,
    make_splits,
)
from sonodistill.evaluate.suite import SuiteConfig, run_suite
from sonodistill.io import write_json

pytestmark = pytest.mark.usefixtures("one_thread")

DDTI_LARGEST_GROUP = 5
"""Measured: DDTI's largest group (five pixel-identical copies of one scan, each with another
nodule's mask); docs/near_duplicates.md."""


@pytest.fixture(scope="module")
def busi(eval_sets):
    return eval_sets["busi"]["index"], eval_sets["busi"]["cls"]


@pytest.fixture(scope="module")
def ddti(eval_sets):
    return eval_sets["ddti"]["index"]


@pytest.fixture(scope="module")
def splits(eval_sets):
    """Fixed splits and 5 folds of the three paper tasks, made from the session fingerprints."""
    out = {}
    for task, entry, index in (
        ("ddti_seg", eval_sets["ddti"], eval_sets["ddti"]["index"]),
        ("busi_seg", eval_sets["busi"], eval_sets["busi"]["index"]),
        ("busi_cls", eval_sets["busi"], eval_sets["busi"]["cls"]),
    ):
        index.name = task
        fixed = make_splits(index, fingerprints=entry["fingerprints"])
        folds = make_folds(index, 5, fingerprints=entry["fingerprints"])
        out[task] = [fixed, *folds]
    return out


@pytest.fixture(scope="module")
def splits_dir(tmp_path_factory, splits):
    out = tmp_path_factory.mktemp("eval_splits")
    for task, (fixed, *_) in splits.items():
        write_json(out / f"{task}.json", fixed)
    return out


def straddling(split: dict, pairs) -> list:
    where = {i: s for s in SPLITS for i in split["ids"][s]}
    return [(a, b) for a, b in pairs if a in where and b in where and where[a] != where[b]]


def similar_pairs(entry: dict, level: float) -> list[tuple[str, str]]:
    corr, ids = entry["correlation"], entry["ids"]
    i, j = np.nonzero(np.triu(corr >= level, 1))
    return [(ids[a], ids[b]) for a, b in zip(i, j, strict=True)]


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
    normal = by_id["normal/normal (1)"]
    assert load_mask(normal, read_grey(normal.image).shape).sum() == 0
    # the two RGBA masks (benign 4, benign 54) carry their lesion in the colour channels
    for name in ("benign/benign (4)", "benign/benign (54)"):
        r = by_id[name]
        assert load_mask(r, read_grey(r.image).shape).mean() > 0.005


def test_ddti_pairs_and_scan_groups(ddti):
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
    # the two halves of a dual-view scan (10000+N, 20000+N) carry one group
    ids = {r.id: r for r in ddti.records}
    halves = [(str(n), str(n + 10000)) for n in range(10000, 20000) if str(n + 10000) in ids]
    halves = [h for h in halves if h[0] in ids]
    assert len(halves) == 171
    assert all(ids[a].group == ids[b].group is not None for a, b in halves)
    # the widths of the halves add up to a dual-view frame (e.g. 315 + 245 of 560 px)
    w = [Image.open(ids[a].image).width + Image.open(ids[b].image).width for a, b in halves[:20]]
    assert max(w) <= 600 and min(w) >= 500


def test_ddti_no_scan_or_near_copy_straddles(splits, eval_sets):
    """Acceptance: no i/i+10000 pair and no pair with pixel correlation >= 0.95 straddles the
    fixed split or any fold; the largest group stays small."""
    ddti = eval_sets["ddti"]
    by_id = {r.id: r for r in ddti["index"].records}
    scans = {}
    for r in by_id.values():
        if r.group:
            scans.setdefault(r.group, []).append(r.id)
    scan_pairs = [tuple(v) for v in scans.values() if len(v) == 2]
    assert len(scan_pairs) == 171
    copies = similar_pairs(ddti, 0.95)
    assert ("183", "184") in copies or ("184", "183") in copies  # 99.3% identical (issue)
    for split in splits["ddti_seg"]:
        assert straddling(split, scan_pairs) == []
        assert straddling(split, copies) == []
        assert split["largest_group"] == DDTI_LARGEST_GROUP
    fixed = splits["ddti_seg"][0]
    assert [len(fixed["ids"][s]) for s in SPLITS] == [445, 127, 65]


def test_busi_no_near_identical_pair_straddles(splits, eval_sets):
    """Acceptance: no BUSI pair with pixel correlation >= 0.93 straddles (segmentation and
    classification, fixed split and folds)."""
    pairs = similar_pairs(eval_sets["busi"], 0.93)
    assert len(pairs) > 200  # BUSI is full of them
    for task in ("busi_seg", "busi_cls"):
        for split in splits[task]:
            assert straddling(split, pairs) == [], task
            assert split["largest_group"] <= 8
    # the example: malignant 7 (train) and malignant 8, 9 (test) now share a split
    where = {i: s for s in SPLITS for i in splits["busi_seg"][0]["ids"][s]}
    assert len({where[f"malignant/malignant ({k})"] for k in (7, 8, 9)}) == 1


def test_busi_conflicting_label_duplicate_kept_out(splits, eval_sets):
    """Acceptance: malignant (145) = benign (433) is reported as a conflicting-label duplicate
    and is in no classification split (nor fold); segmentation keeps both images."""
    a, b = "malignant/malignant (145)", "benign/benign (433)"
    for split in splits["busi_cls"]:
        used = {i for s in SPLITS for i in split["ids"][s]}
        assert a not in used and b not in used
        assert {a, b} <= set(split["excluded"])
        groups = [c for c in split["conflicting_labels"] if a in c["ids"]]
        assert len(groups) == 1 and b in groups[0]["ids"]
        assert [b, a, 1.0, True] in groups[0]["pairs"]  # reported as an exact copy
        # every excluded image belongs to a reported group with two labels
        assert set(split["excluded"]) == {i for c in split["conflicting_labels"] for i in c["ids"]}
        assert all(len(set(c["labels"])) > 1 for c in split["conflicting_labels"])
    seg_used = {i for s in SPLITS for i in splits["busi_seg"][0]["ids"][s]}
    assert {a, b} <= seg_used
    kept = make_splits(
        eval_sets["busi"]["cls"],
        SplitConfig(label_conflicts="keep"),
        fingerprints=eval_sets["busi"]["fingerprints"],
    )
    assert kept["excluded"] == [] and len(kept["conflicting_labels"]) >= 1


def test_splits_deterministic_disjoint_and_folds_cover(splits, eval_sets):
    for task, (fixed, *folds) in splits.items():
        ids = [set(fixed["ids"][s]) for s in SPLITS]
        excluded = set(fixed["excluded"])
        n = len(eval_sets["busi" if task.startswith("busi") else "ddti"]["ids"])
        assert sum(map(len, ids)) == n - len(excluded) == len(set.union(*ids))
        fr = [set(fixed["fractions"][k]) for k in ("0.05", "0.1", "0.2", "0.5")]
        assert all(x < y for x, y in zip(fr, fr[1:], strict=False))
        assert fr[-1] < ids[0]
        where = {i: s for s in SPLITS for i in fixed["ids"][s]}
        for group in fixed["multi_image_groups"]:
            assert len({where[i] for i in group if i in where}) == 1
        # five folds: every image tested exactly once; train, val and test disjoint
        tested = Counter(i for f in folds for i in f["ids"]["test"])
        assert set(tested) == set(where) and set(tested.values()) == {1}
        for f in folds:
            parts = [set(f["ids"][s]) for s in SPLITS]
            assert sum(map(len, parts)) == len(set.union(*parts)) == len(where)
            assert abs(len(parts[2]) - len(where) / 5) <= 0.05 * len(where)
    entry = eval_sets["ddti"]
    again = make_splits(entry["index"], fingerprints=entry["fingerprints"])
    assert again == splits["ddti_seg"][0]
    reseeded = make_splits(entry["index"], SplitConfig(seed=1), fingerprints=entry["fingerprints"])
    assert reseeded["ids"]["test"] != again["ids"]["test"]


def test_split_sizes(splits, busi):
    seg = splits["busi_seg"][0]
    assert [len(seg["ids"][s]) for s in SPLITS] == [544, 156, 80]
    cls = splits["busi_cls"][0]
    label = {r.id: r.label for r in busi[1].records}
    totals = Counter(label[i] for i in label if i not in set(cls["excluded"]))
    for s, share in zip(SPLITS, (0.7, 0.1, 0.2), strict=True):
        counts = Counter(label[i] for i in cls["ids"][s])
        for k, total in totals.items():
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


def _suite(out, shared_data, student, seeds=(0,), tasks=None, **kw) -> SuiteConfig:
    return SuiteConfig(
        out=str(out),
        data_root=str(shared_data),
        encoders=["random:resnet18@R18-Rand", f"student:{student}@R18-Distill"],
        tasks=tasks or ["ddti_seg", "busi_seg", "busi_cls"],
        protocols=["linear", "finetune"],
        fractions=[1.0, 0.5],
        seeds=list(seeds),
        train=TrainSettings(
            seg_image_size=32, cls_image_size=32, epochs=1, seg_batch=8, cls_batch=8, subset=8
        ),
        **kw,
    )


@pytest.mark.slow
def test_smoke_suite_on_real_data(splits_dir, tmp_path, shared_data, fake_student):
    out = tmp_path / "suite"
    (out / "splits").mkdir(parents=True)
    for f in splits_dir.glob("*.json"):
        (out / "splits" / f.name).write_text(f.read_text())
    cfg = _suite(out, shared_data, fake_student, save_models=True)
    tables = run_suite(cfg)
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 3 * 2 * 2 + 3 * 2  # tasks x protocols x encoders + 50% fine-tuning
    names = {p.name for p in tables}
    assert names == {
        "table2_linear_probe.md",
        "table3_finetune.md",
        "table4_label_fractions.md",
        "table7_architectures.md",
        "table8_foundation_models.md",
        "comparisons.md",
    }
    table8 = (out / "tables" / "table8_foundation_models.md").read_text()
    assert "| R18-Distill | timm CNN | resnet18 | 11.2 |" in table8  # family, backbone, params
    # the audit ran first and sits beside the splits
    for task in cfg.tasks:
        audit = json.loads((out / "splits" / f"{task}.audit.json").read_text())
        assert audit["leaks"] == 0 and (out / "splits" / f"{task}.pairs.png").is_file()
    one = json.loads(runs[0].read_text())
    assert one["n"] == {"train": 8, "val": 8, "test": 8} and one["best_epoch"] == 1
    # per-image scores with image ids, and the trivial predictors on the same images
    assert len(one["per_image"]["id"]) == 8 and set(one["per_image"]["id"]) <= set(
        json.loads((out / "splits" / f"{one['task']}.json").read_text())["ids"]["test"]
    )
    ddti = json.loads((out / "runs" / "ddti_seg__finetune__R18-Rand__f1__s0.json").read_text())
    assert ddti["baselines"]["all_background"]["dice"] == 0.0  # every DDTI image has a nodule
    assert 0.0 < ddti["baselines"]["all_foreground"]["dice"] < 0.6
    assert ddti["metric_resolution"] == "original"
    table3 = (out / "tables" / "table3_finetune.md").read_text()
    assert "32 px" in table3 and "1 epochs" in table3 and "seeds 0;" in table3
    assert "| R18-Distill |" in table3 and "ddti_seg Dice" in table3
    assert "mask and prediction are both empty scores 1" in table3  # the empty-mask rule
    assert "| All background (trivial) | 0.0000 |" in table3
    assert "| Majority class (trivial) |" in table3 and "(n=1)" in table3
    cell = table3.split("| R18-Rand | ")[1].split(" | ")[0]  # one seed: no std
    mean, rest = cell.split(" [")
    inside, images = rest.split("]")[0].split("; ")
    low, high = (float(v) for v in inside.split(", "))
    assert low <= float(mean) <= high and images.endswith(" images")
    assert "Paired comparisons against R18-Rand" in (out / "tables" / "comparisons.md").read_text()
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


def test_tables_only_without_finished_runs_is_an_error(tmp_path, shared_data):
    """--tables_only over a folder with no finished run: a one-line error, nothing written
    (it used to write suite.yaml and exit 0 with no table)."""
    out = tmp_path / "suite"
    cfg = SuiteConfig(
        out=str(out),
        data_root=str(shared_data),
        encoders=["random:resnet18@R18-Rand"],
        tasks=["ddti_seg"],
        protocols=["linear"],
        tables_only=True,
    )
    with pytest.raises(UserError, match="no finished run"):
        run_suite(cfg)
    assert not out.exists()


def test_missing_seed_is_said_in_its_cell(splits_dir, tmp_path, shared_data):
    """A suite of two seeds, one run lost: its cell says n=1 of 2 (no bare value under
    "mean ± std"), the complete cells say n=2 with an interval, the trivial rows stay."""
    out = tmp_path / "suite"
    (out / "splits").mkdir(parents=True)
    (out / "splits" / "ddti_seg.json").write_text((splits_dir / "ddti_seg.json").read_text())
    cfg = SuiteConfig(
        out=str(out),
        data_root=str(shared_data),
        encoders=["random:resnet18@R18-Rand"],
        tasks=["ddti_seg"],
        protocols=["linear"],
        seeds=[0, 1],
        train=TrainSettings(seg_image_size=32, epochs=1, seg_batch=8, subset=8),
    )
    run_suite(cfg)
    table = (out / "tables" / "table2_linear_probe.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| R18-Rand |"))
    dice = row.split(" | ")[1]
    assert " ± " in dice and "[" in dice and dice.rstrip(" †").endswith("(n=2)")
    (out / "runs" / "ddti_seg__linear__R18-Rand__f1__s1.json").unlink()
    cfg.tables_only, cfg.resume = True, True
    run_suite(cfg)
    table = (out / "tables" / "table2_linear_probe.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| R18-Rand |"))
    dice = row.split(" | ")[1]
    assert dice.rstrip(" †").endswith("(n=1 of 2)") and " ± " not in dice
    assert "| All background (trivial) | 0.0000 | 0.0000 |" in table


def test_two_shards_make_the_tables_of_one_suite(splits_dir, tmp_path, shared_data):
    """`--shard 1/2` and `--shard 2/2`, each in its own folder (and lock) under OUT/shards, then
    `--tables_only true` on OUT: every table equals the one of the suite run in one folder.
    `--dry_run` gives each shard's time."""

    def suite(out, train=None, **kw):
        return SuiteConfig(
            out=str(out),
            data_root=str(shared_data),
            encoders=["random:resnet18@R18-Rand"],
            tasks=["ddti_seg"],
            protocols=["linear"],
            seeds=[0, 1, 2],
            train=train or TrainSettings(seg_image_size=32, epochs=1, seg_batch=8, subset=8),
            **kw,
        )

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    for folder in (one, sharded / "shards/1-of-2", sharded / "shards/2-of-2"):
        (folder / "splits").mkdir(parents=True)
        (folder / "splits/ddti_seg.json").write_text((splits_dir / "ddti_seg.json").read_text())
    report = dry_run(suite(sharded, train=TrainSettings(), shard="1/2"))  # sizes it can count
    assert "Estimated time per shard (--shard I/2, one device each): 1 of 2: " in report
    run_suite(suite(one))
    for shard in ("1/2", "2/2"):
        run_suite(suite(sharded, shard=shard))
    done = {f.name for f in (sharded / "shards/1-of-2/runs").glob("*.json")}
    assert len(done) == 2 and done.isdisjoint(
        f.name for f in (sharded / "shards/2-of-2/runs").glob("*.json")
    )  # seeds 0 and 2, then seed 1
    run_suite(suite(sharded, tables_only=True))
    tables = sorted(p.name for p in (one / "tables").iterdir())
    assert tables and tables == sorted(p.name for p in (sharded / "tables").iterdir())
    for name in tables:  # the runs' wall times aside
        if name.endswith(".csv"):
            got, expected = (pd.read_csv(d / "tables" / name) for d in (sharded, one))
            got, expected = (f.drop(columns=["wall_s"], errors="ignore") for f in (got, expected))
            pd.testing.assert_frame_equal(got, expected)
        else:
            assert (sharded / "tables" / name).read_text() == (one / "tables" / name).read_text()
    with pytest.raises(UserError, match="--shard 3/2"):
        run_suite(suite(sharded, shard="3/2"))


def test_suite_refuses_straddling_pairs(splits_dir, tmp_path, shared_data, fake_student, capsys):
    """A split file where DDTI 183 and 184 (99.3% identical) sit in train and test: the audit
    finds it and the suite stops before any training, unless told to accept it."""
    out = tmp_path / "suite"
    (out / "splits").mkdir(parents=True)
    split = json.loads((splits_dir / "ddti_seg.json").read_text())
    where = {i: s for s in SPLITS for i in split["ids"][s]}
    moved = "184" if where["183"] != "test" else "183"
    split["ids"][where[moved]].remove(moved)
    split["ids"]["test" if where[moved] != "test" else "train"].append(moved)
    write_json(out / "splits" / "ddti_seg.json", split)
    cfg = _suite(out, shared_data, fake_student, tasks=["ddti_seg"])
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(LeakError, match=r"ddti_seg \(1\), e.g. 18[34] / 18[34]"):
        run_suite(cfg)
    assert sorted(p.name for p in out.rglob("*")) == before  # a refusal leaves nothing behind
    from sonodistill.cli import main as cli_main

    argv = f"evaluate audit --out {out} --data_root {shared_data} --tasks [ddti_seg]"
    assert cli_main(argv.split()) == 1  # the audit writes its report, and says so
    report = (out / "splits" / "ddti_seg.audit.md").read_text()
    assert "183" in report and "184" in report and "**Leaks" in report
    capsys.readouterr()
    argv += " --accept_leaks true --audit_loose 0.85"  # the 0.1 name of the option still works
    assert cli_main(argv.split()) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sonodistill evaluate audit: --audit_loose is deprecated, use --audit_near_duplicate "
        "(accepted until 0.3)"
    ]
    audit = json.loads((out / "splits" / "ddti_seg.audit.json").read_text())
    assert audit["loose_threshold"] == 0.85
