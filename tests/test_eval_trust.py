"""Evaluation numbers a reviewer can trust (issue 11), beyond the real-data splits of
test_eval_data.py: mask layouts and thresholds on real files rewritten into other layouts,
outlines and size mismatches, group rules and video clips, the near-duplicate notion's
robustness, labels checked against run configs, statistics, metrics at the original
resolution, group cross-validation and the one image path."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from sonodistill.config import load_config, packaged_configs, resolve_config, save_config
from sonodistill.data import neardup as nd
from sonodistill.data.greys import read_grey
from sonodistill.data.images import ImageFiles
from sonodistill.data.listing import FrameRef, list_source, load_frames
from sonodistill.data.masks import MaskError
from sonodistill.distill.config import DistillConfig
from sonodistill.errors import UserError
from sonodistill.evaluate.audit import mask_report
from sonodistill.evaluate.config import TrainSettings
from sonodistill.evaluate.datasets import (
    ClsDataset,
    DatasetSpec,
    SegDataset,
    load_busi,
    load_dataset,
    load_ddti,
)
from sonodistill.evaluate.splits import SPLITS, SplitConfig, make_splits
from sonodistill.evaluate.stats import holm, interval, paired
from sonodistill.evaluate.suite import SuiteConfig, check_labels, run_suite
from sonodistill.evaluate.train import evaluate, trivial_scores
from sonodistill.models.encoders import EncoderSpec, encoder_label, encoder_recipe

BUSI = Path("busi/Dataset_BUSI_with_GT")
pytestmark = pytest.mark.usefixtures("one_thread")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------- mask layouts and thresholds


def test_same_folder_annotation_layout(shared_data, tmp_path):
    """Real BUSI files rewritten as `NNN_HC.png` + `NNN_HC_Annotation[_k].png` in one folder:
    the annotations pair with their image (second lesions merged) and are never images."""
    busi = load_busi(shared_data / "busi", "seg")
    by_id = {r.id: r for r in busi.records}
    folder = tmp_path / "hc" / "images"
    folder.mkdir(parents=True)
    picks = [
        "benign/benign (4)",
        "benign/benign (100)",
        "normal/normal (1)",
        "malignant/malignant (7)",
    ]
    for k, rid in enumerate(picks):
        r = by_id[rid]
        shutil.copy(r.image, folder / f"{k:03d}_HC.png")
        for m, mask in enumerate(r.masks):
            suffix = "" if m == 0 else f"_{m}"
            shutil.copy(mask, folder / f"{k:03d}_HC_Annotation{suffix}.png")
    for masks in ("images", ""):  # the images folder itself, or empty: masks beside images
        index = load_dataset(
            DatasetSpec(format="seg_folder", root=str(tmp_path / "hc"), masks=masks)
        )
        assert [r.id for r in index.records] == [f"{k:03d}_HC" for k in range(len(picks))]
        for k, rid in enumerate(picks):
            record, original = index.records[k], by_id[rid]
            assert len(record.masks) == len(original.masks)
            shape = read_grey(original.image).shape
            np.testing.assert_array_equal(
                index.load_mask(record, shape), busi.load_mask(original, shape)
            )
    # embedding / export listings skip the annotations too
    assert {Path(f.file).name for f in list_source(str(folder))} == {
        f"{k:03d}_HC.png" for k in range(len(picks))
    }


def test_jpeg_masks_use_the_documented_threshold(shared_data, tmp_path):
    """DDTI masks saved as 8-bit JPEG: foreground is value > 127 (what the PNG masks say, up to
    JPEG's edge noise), not > 0 (which grows every nodule); the audit reports the files."""
    ddti = load_ddti(shared_data / "ddti")
    root = tmp_path / "jpeg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    originals = {}
    for r in ddti.records[::100]:
        shutil.copy(r.image, root / "images" / r.image.name)
        truth = np.asarray(Image.open(r.masks[0]).convert("L")) > 127
        Image.fromarray(truth.astype(np.uint8) * 255).save(
            root / "masks" / f"{r.id}.jpg", quality=75
        )
        originals[r.id] = truth
    index = load_dataset(DatasetSpec(format="seg_folder", root=str(root)))
    assert len(index.records) == len(originals) == 7
    growth = []
    for r in index.records:
        truth = originals[r.id]
        mask = index.load_mask(r, truth.shape).astype(bool)
        assert iou(mask, truth) > 0.98
        at_zero = np.asarray(Image.open(r.masks[0]).convert("L")) > 0
        growth.append(at_zero.sum() / truth.sum() - 1)
    assert np.median(growth) > 0.02  # > 0 would have inflated every mask
    report, empty = mask_report(index)
    assert report["threshold"] == 127 and report["not_binary"] == 7 and report["outlines"] == 0
    assert report["median_growth_at_zero"] == pytest.approx(np.median(growth), rel=1e-6)
    assert not any(empty.values())
    strict = load_dataset(DatasetSpec(format="seg_folder", root=str(root), mask_threshold=250))
    r = strict.records[0]
    assert strict.load_mask(r, originals[r.id].shape).sum() < originals[r.id].sum()


def test_outlines_are_filled_or_refused(shared_data, tmp_path):
    ddti = load_ddti(shared_data / "ddti")
    root = tmp_path / "outline"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    record = ddti.records[3]
    truth = np.asarray(Image.open(record.masks[0]).convert("L")) > 127
    core = cv2.erode(truth.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
    outline = truth & ~core.astype(bool)
    shutil.copy(record.image, root / "images" / "a.png")
    Image.fromarray(outline.astype(np.uint8) * 255).save(root / "masks" / "a.png")
    index = load_dataset(DatasetSpec(format="seg_folder", root=str(root)))
    filled = index.load_mask(index.records[0], truth.shape).astype(bool)
    assert iou(filled, truth) > 0.99 and outline.sum() < 0.5 * truth.sum()
    assert mask_report(index)[0]["outlines"] == 1
    with pytest.raises(MaskError, match="a.png: the annotation is an outline"):  # indexing
        load_dataset(DatasetSpec(format="seg_folder", root=str(root), outline="refuse"))
    # an outline with a gap encloses nothing: it cannot be filled
    ys, xs = np.nonzero(outline)
    gap = outline.copy()
    gap[:, xs.min() : (xs.min() + xs.max()) // 2] = False
    Image.fromarray(gap.astype(np.uint8) * 255).save(root / "masks" / "a.png")
    with pytest.raises(MaskError, match="open contour"):
        index.load_mask(index.records[0], truth.shape)
    with pytest.raises(MaskError, match="open contour"):  # found while indexing, not training
        load_dataset(DatasetSpec(format="seg_folder", root=str(root)))


def test_mask_size_mismatch_is_refused_while_indexing(shared_data, tmp_path):
    ddti = load_ddti(shared_data / "ddti")
    root = tmp_path / "sizes"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for r in ddti.records[:3]:
        shutil.copy(r.image, root / "images" / f"{r.id}.png")
        shutil.copy(r.masks[0], root / "masks" / f"{r.id}.png")
    bad = ddti.records[1].id
    with Image.open(root / "masks" / f"{bad}.png") as im:
        im.resize((im.width // 2, im.height // 2)).save(root / "masks" / f"{bad}.png")
    with pytest.raises(MaskError, match=rf"masks/{bad}.png: mask is 280x180 but its image"):
        load_dataset(DatasetSpec(format="seg_folder", root=str(root)))


# ---------------------------------------------------------------- groups


def test_group_by_rules_keep_groups_in_one_split(tmp_path):
    root = tmp_path / "frames"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for clip in range(10):
        for k in range(4):
            name = f"patient{clip // 2}_clip{clip}_frame{k:03d}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                root / "images" / name
            )
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / name)
    rules = {
        "clip": 10,  # the name without its trailing frame number
        "regex:^images/(?P<group>patient\\d+)_": 5,
        "regex:(clip\\d+)": 10,
        "folder": 1,
    }
    for rule, groups in rules.items():
        index = load_dataset(DatasetSpec(format="seg_folder", root=str(root), group_by=rule))
        assert len({r.group for r in index.records}) == groups, rule
        assert index.group_rules == (f"group_by: {rule}",)
        if groups > 1:
            splits = make_splits(index, SplitConfig(near_duplicate=2.0))  # exact copies only
            where = {i: s for s in SPLITS for i in splits["ids"][s]}
            for g in {r.group for r in index.records}:
                members = [r.id for r in index.records if r.group == g]
                assert len({where[i] for i in members}) == 1, (rule, g)
    with pytest.raises(UserError, match="does not match"):
        load_dataset(DatasetSpec(format="seg_folder", root=str(root), group_by="regex:^nothing"))


def test_video_frames_share_their_clip(shared_data, tmp_path):
    """A classification folder of clips: each video gives evenly spaced frames, one group per
    clip, so no clip is split between train and test."""
    clips = sorted((shared_data / "corpus/covid_blues/lus_videos").glob("patient_1*.mp4"))[:6]
    for k, clip in enumerate(clips):
        folder = tmp_path / "lus" / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / clip.name).symlink_to(clip)
    index = load_dataset(
        DatasetSpec(
            format="cls_folder", root=str(tmp_path / "lus"), task_type="cls", frames_per_video=3
        )
    )
    assert len(index.records) == 18 and len({r.group for r in index.records}) == 6
    assert all(r.frame >= 0 for r in index.records)
    splits = make_splits(index, SplitConfig(proportions=[0.34, 0.33, 0.33]))
    where = {i: s for s in SPLITS for i in splits["ids"][s]}
    for g in {r.group for r in index.records}:
        assert len({where[r.id] for r in index.records if r.group == g and r.id in where}) == 1
    x, y = ClsDataset(index.records[:3], 32)[2]
    assert x.shape == (1, 32, 32) and x.std() > 0 and int(y) in (0, 1)


# ---------------------------------------------------------------- the near-duplicate notion


def test_near_duplicates_survive_speckle_crops_and_jpeg(shared_data):
    rng = np.random.default_rng(0)
    files = [shared_data / BUSI / "benign/benign (12).png", shared_data / "ddti/image/10004.PNG"]
    for f in files:
        grey = read_grey(f)
        h, w = grey.shape
        crop = grey[int(0.015 * h) :, int(0.015 * w) :].astype(np.float32)
        noisy = np.clip(crop * rng.gamma(8, 1 / 8, crop.shape), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(
            ".jpg", cv2.resize(noisy, (w * 3 // 4, h * 3 // 4)), [cv2.IMWRITE_JPEG_QUALITY, 80]
        )
        copy = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
        a, b = nd.fingerprint(grey), nd.fingerprint(copy)
        assert nd.similarity(a, b, [0], [0])[0] >= nd.THRESHOLD
        assert len(nd.near_duplicates(a, b)) == 1
    # the two views of one DDTI scan are different images: linked by their ids, not by pixels
    halves = nd.fingerprint_batch(
        [read_grey(shared_data / "ddti/image" / n) for n in ("10004.PNG", "20004.PNG")]
    )
    assert nd.similarity(halves, halves, [0], [1])[0] < nd.LOOSE
    table = halves.to_frame()
    again = nd.Fingerprints.from_frame(table)
    assert np.array_equal(again.thumbs, halves.thumbs) and np.array_equal(
        again.simhash, halves.simhash
    )


def test_candidate_index_misses_no_pair(eval_sets):
    """The SimHash index against scoring every pair, on the DDTI and BUSI images involved in
    near pairs (independent correlation >= 0.88) plus others: nothing at the looser threshold
    is missed."""
    for entry in eval_sets.values():
        corr = entry["correlation"]
        involved = np.flatnonzero(np.triu(corr >= 0.88, 1).any(0) | np.triu(corr >= 0.88, 1).any(1))
        rng = np.random.default_rng(1)
        rest = rng.choice(np.setdiff1d(np.arange(len(corr)), involved), 40, replace=False)
        pick = np.sort(np.concatenate([involved[:110], rest]))
        fps = entry["fingerprints"].take(pick)
        ia, ib = np.triu_indices(len(pick), 1)
        every = nd.similarity(fps, fps, ia, ib)
        found = nd.near_duplicates(fps, None, nd.LOOSE)
        truth = {(int(i), int(j)) for i, j, s in zip(ia, ib, every, strict=True) if s >= nd.LOOSE}
        assert len(truth) > 20
        assert set(zip(found.i.tolist(), found.j.tolist(), strict=True)) == truth


# ---------------------------------------------------------------- labels against configs


def _fake_runs(tmp_path, suite: str) -> list[str]:
    """The suite's student encoders, each a run folder whose config.yaml is the packaged
    config that trains it (matched by its `out`)."""
    configs = {}
    for name in packaged_configs():
        if name.startswith("paper_distill"):
            cfg = load_config(DistillConfig, resolve_config(name))
            configs[cfg.out] = cfg
    encoders = yaml.safe_load(Path(resolve_config(suite)).read_text())["encoders"]
    out = []
    for text in encoders:
        if not isinstance(text, str) or not text.startswith("student:"):
            out.append(text)
            continue
        run, label = text[len("student:") :].split("@")
        assert run in configs, f"{suite}: no packaged config trains {run}"
        folder = tmp_path / Path(run).name
        folder.mkdir(exist_ok=True)
        save_config(configs[run], folder / "config.yaml")  # what `sonodistill distill` writes
        out.append(f"student:{folder}@{label}")
    return out


def test_six_students_have_configs_and_labels_match(tmp_path):
    ablation = yaml.safe_load(Path(resolve_config("suites/paper_ablation")).read_text())
    for suite in ("suites/paper", "suites/paper_ablation", "suites/paper_fm_compare"):
        encoders = _fake_runs(tmp_path, suite)
        specs = [EncoderSpec.parse(e) for e in encoders]
        labels = [encoder_label(s) for s in specs]
        rows = ablation["ablation"] if suite.endswith("ablation") else []
        recipes = check_labels(specs, labels, rows)
        if "R50-Distill-Default" in recipes:
            assert recipes["R50-Distill-Default"]["mixup"] is False
        assert recipes["R50-Distill-US"] == {
            "init": "distilled",
            "augmentation": "US-aware",
            "mixup": True,
            "head": "mlp",
            "student": "resnet50",
            "teacher": "vit_base_patch16_dinov3_qkvb",
        }
    students = {p for p in packaged_configs() if p.startswith("paper_distill")}
    assert len(students) == 7  # the paper's six and the two-teacher R50 (paper_fm_compare)
    multi = _fake_runs(tmp_path, "suites/paper_fm_compare")[-1]
    assert encoder_recipe(multi)["teacher"] == "dinov3 + sam2_hiera_base_plus"
    # a label that says what the run did not do is an error, as is an ablation row
    encoders = _fake_runs(tmp_path, "suites/paper_ablation")
    default = next(e for e in encoders if e.endswith("@R50-Distill-Default"))
    wrong = default.replace("@R50-Distill-Default", "@R50-Distill-US")
    with pytest.raises(UserError, match="says augmentation 'US-aware'"):
        check_labels([EncoderSpec.parse(wrong)], ["R50-Distill-US"], [])
    row = {"encoder": "R50-Distill-Default", "augmentation": "Default", "mixup": True}
    with pytest.raises(UserError, match="says mixup True"):
        check_labels([EncoderSpec.parse(default)], ["R50-Distill-Default"], [row])
    with pytest.raises(UserError, match="says student 'resnet18'"):
        check_labels([EncoderSpec.parse("random:resnet50")], ["R18-Rand"], [])


# ---------------------------------------------------------------- statistics


def test_paired_comparison_interval_and_holm_by_hand():
    ids = [f"i{k}" for k in range(12)]
    base = np.linspace(0.2, 0.8, 12)
    ref = [{"seed": s, "per_image": {"id": ids, "dice": list(base)}} for s in (0, 1)]
    better = [{"seed": s, "per_image": {"id": ids, "dice": list(base + 0.1)}} for s in (0, 1)]
    r = paired(ref, better, "dice")
    assert r["delta"] == pytest.approx(0.1) and r["images"] == 12
    assert r["low"] == pytest.approx(0.1) and r["high"] == pytest.approx(0.1)
    assert r["p"] < 0.001  # every image better: Wilcoxon's exact two-sided p = 2 / 2^12
    ci = interval(ref, "dice")
    assert ci["low"] < base.mean() < ci["high"] and ci["images"] == 12
    labels = [0, 1, 2] * 4
    preds = [0, 1, 2] * 3 + [1, 2, 0]
    cls = [{"seed": 0, "per_image": {"id": ids, "label": labels, "pred": preds}}]
    perfect = [{"seed": 0, "per_image": {"id": ids, "label": labels, "pred": labels}}]
    r = paired(cls, perfect, "acc", 3)
    assert r["delta"] == pytest.approx(3 / 12)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


# ---------------------------------------------------------------- metrics at the original size


class _Replay(nn.Module):
    """Returns prepared logits batch after batch (a model whose output is known)."""

    def __init__(self, logits: torch.Tensor, batch: int):
        super().__init__()
        self.logits, self.batch, self.k = logits, batch, 0

    def forward(self, x):
        out = self.logits[self.k : self.k + len(x)]
        self.k += len(x)
        return out


def test_metrics_at_the_original_resolution(shared_data):
    ddti = load_ddti(shared_data / "ddti")
    records = ddti.records[:3]
    s = TrainSettings(seg_image_size=64, seg_batch=2)
    data = SegDataset.of(ddti, records, 64)
    # a model that predicts the training-size mask exactly
    logits = torch.stack(
        [torch.from_numpy(data.load(k)[1]).float()[None] * 20 - 10 for k in range(3)]
    )
    at_train = TrainSettings(seg_image_size=64, seg_batch=2, metric_resolution="train")
    batches = DataLoader(data, batch_size=2)
    train = evaluate(_Replay(logits, 2), batches, "seg", 2, "cpu", settings=at_train)
    assert train["dice"] == pytest.approx(1.0)
    original = evaluate(_Replay(logits, 2), batches, "seg", 2, "cpu", settings=s)
    assert 0.8 < original["dice"] < 1.0  # the resize back costs the outline
    assert original["per_image"]["id"] == [r.id for r in records]
    # all foreground on the original masks, by hand: 2|M| / (|M| + HW)
    by_hand = []
    for r in records:
        m = np.asarray(Image.open(r.masks[0]).convert("L")) > 127
        by_hand.append(2 * m.sum() / (m.sum() + m.size))
    base = trivial_scores(ddti, {"test": data, "train": data}, s)
    assert base["all_foreground"]["dice"] == pytest.approx(np.mean(by_hand))
    assert base["all_background"]["dice"] == 0.0


def test_group_cross_validation_suite(shared_data, tmp_path):
    cfg = SuiteConfig(
        out=str(tmp_path / "cv"),
        data_root=str(shared_data),
        encoders=["random:resnet18@R18-Rand"],
        tasks=["ddti_seg"],
        protocols=["linear"],
        seeds=[0],
        folds=3,
        train=TrainSettings(seg_image_size=32, epochs=1, seg_batch=8, subset=6),
    )
    tables = run_suite(cfg)
    runs = sorted((tmp_path / "cv" / "runs").glob("*.json"))
    names = [p.name for p in runs]
    assert names == [f"ddti_seg__linear__R18-Rand__f1__s0__cv3-{f}.json" for f in range(3)]
    table = next(p for p in tables if p.name == "table2_linear_probe.md").read_text()
    assert "group 3-fold cross-validation" in table and "(n=3)" in table
    folds = [
        yaml.safe_load((tmp_path / "cv" / "splits" / f"ddti_seg.cv3-{f}.json").read_text())
        for f in range(3)
    ]
    tested = [i for f in folds for i in f["ids"]["test"]]
    assert len(tested) == len(set(tested)) == 637


# ---------------------------------------------------------------- one image path


def test_one_image_path_for_distill_evaluate_embed_and_export(shared_data):
    """The same file at the same size gives the same pixels to distillation (ImageFiles),
    evaluation (SegDataset), embedding and export (load_frames): one grey conversion (colour
    BUSI files included) and one resize (area when shrinking)."""
    busi = load_busi(shared_data / "busi", "seg")
    colour = next(r for r in busi.records if Image.open(r.image).mode == "RGB")
    ddti = load_ddti(shared_data / "ddti").records[0]
    for record in (colour, ddti):
        distill = ImageFiles([record.image], 96)[0][0].numpy()
        evaluate_px = (SegDataset([record], 96)[0][0][0].numpy() * 255).round().astype(np.uint8)
        embed = next(load_frames([FrameRef("x", str(record.image))], 96))
        np.testing.assert_array_equal(distill, evaluate_px)
        np.testing.assert_array_equal(distill, embed)
        grey = np.asarray(Image.open(record.image).convert("L"))
        area = cv2.resize(grey, (96, 96), interpolation=cv2.INTER_AREA)
        assert np.abs(distill.astype(int) - area).max() <= 1  # PIL's luma: within one level
