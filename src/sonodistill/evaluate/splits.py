"""Deterministic, leakage-free train/val/test splits and nested label fractions.

Exact duplicates (same grey pixels) and near-duplicates (perceptual hash within a Hamming
distance) are grouped with a dataset's own group column (patient) as connected components of
a "must share a split" graph, and a group always lands in one split. Splits are written to
JSON and reused, so every encoder, protocol and seed of a suite sees the same images.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from sonodistill.data.hashing import hex_to_uint64, near_pairs, phash, pixel_sha1
from sonodistill.errors import UserError
from sonodistill.evaluate.datasets import DatasetIndex, read_grey
from sonodistill.io import read_json, write_json

DDTI_COUNTS = (445, 127, 65)
"""The paper's DDTI split (Sec. 4.1); other segmentation sets use the same proportions."""
CLS_PROPORTIONS = (0.7, 0.1, 0.2)
"""BUSI classification: the paper's tables imply a 157-image test set (about 20%)."""
SPLITS = ("train", "val", "test")
FRACTIONS = (0.05, 0.1, 0.2, 0.5)


@dataclass
class SplitConfig:
    seed: int = 0
    phash_distance: int = 4
    """Near-duplicate threshold: Hamming distance between 64-bit perceptual hashes."""
    seg_counts: list[int] | None = None
    """Segmentation (train, val, test) proportions as counts; default DDTI's 445/127/65, which
    a 637-image set gets exactly and other sets get scaled to their size."""
    proportions: list[float] | None = None
    """(train, val, test) proportions; overrides the defaults above."""


def image_hashes(index: DatasetIndex) -> dict[str, tuple[str, str]]:
    """{id: (sha1 of the grey pixels, perceptual hash hex)}: the corpus builder's fingerprints."""
    out = {}
    for r in index.records:
        grey = read_grey(r.image)
        out[r.id] = (pixel_sha1(grey), phash(grey))
    return out


def duplicate_groups(
    index: DatasetIndex, hashes: dict[str, tuple[str, str]], phash_distance: int = 4
) -> list[list[str]]:
    """Groups of ids that must share a split: same pixels, near-identical phash, same group."""
    ids = [r.id for r in index.records]
    edges: list[tuple[int, int]] = []
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(index.records):
        keys = [("sha", hashes[r.id][0])] + ([("group", r.group)] if r.group else [])
        for key in keys:
            edges.append((i, first.setdefault(key, i)))
    if phash_distance >= 0:
        values = hex_to_uint64([hashes[i][1] for i in ids])
        edges += [(i, j) for i, j, _ in near_pairs(values, values, phash_distance, same=True)]
    rows, cols = zip(*edges, strict=True) if edges else ((), ())
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[str]] = {}
    for id_, label in zip(ids, labels.tolist(), strict=True):
        groups.setdefault(label, []).append(id_)
    return list(groups.values())


def _targets(n: int, proportions) -> list[int]:
    counts = [int(round(n * p)) for p in proportions]
    counts[0] = n - sum(counts[1:])
    return counts


def assign_groups(groups: list[list[str]], strata: dict[str, int], targets: dict, seed: int):
    """Greedy exact-count assignment: big groups first, each to the split with the largest
    relative deficit for its stratum (its majority class), so the splits fill in proportion.

    scikit-learn's GroupShuffleSplit / StratifiedGroupKFold cannot hit given counts such as
    DDTI's 445/127/65, hence this small deterministic rule.
    """
    rng = random.Random(seed)
    order = sorted(groups, key=lambda g: (len(g), rng.random()), reverse=True)
    filled = {s: {k: 0 for k in targets[s]} for s in SPLITS}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for group in order:
        labels = [strata[i] for i in group]
        stratum = max(set(labels), key=lambda k: (labels.count(k), -k))
        split = max(
            SPLITS,
            key=lambda s: (
                (targets[s][stratum] - filled[s][stratum]) / max(targets[s][stratum], 1),
                -SPLITS.index(s),
            ),
        )
        out[split].extend(group)
        for k in labels:
            filled[split][k] = filled[split].get(k, 0) + 1
    return out


def nested_fractions(
    train: list[str], strata: dict[str, int], fractions, seed: int
) -> dict[str, list[str]]:
    """Prefixes of one seeded permutation per stratum: every fraction contains the smaller ones,
    and each class keeps its share (at least one image)."""
    rng = random.Random(seed + 1)
    per_class: dict[int, list[str]] = {}
    for id_ in train:
        per_class.setdefault(strata[id_], []).append(id_)
    for ids in per_class.values():
        rng.shuffle(ids)
    out = {}
    for f in sorted(fractions):
        chosen = set()
        for ids in per_class.values():
            chosen.update(ids[: max(1, int(round(f * len(ids))))])
        out[fraction_key(f)] = [i for i in train if i in chosen]
    return out


def fraction_key(f: float) -> str:
    return f"{f:g}"


def make_splits(
    index: DatasetIndex,
    cfg: SplitConfig | None = None,
    hashes: dict[str, tuple[str, str]] | None = None,
    fractions=FRACTIONS,
) -> dict:
    cfg = cfg or SplitConfig()
    hashes = hashes or image_hashes(index)
    groups = duplicate_groups(index, hashes, cfg.phash_distance)
    # Classification is class-stratified; segmentation too when images carry a class (BUSI:
    # normal cases have empty masks and should not cluster in one split).
    stratified = index.task_type == "cls"
    strata = {r.id: (r.label if r.label is not None else 0) for r in index.records}
    if cfg.proportions:
        proportions = cfg.proportions
    elif stratified:
        proportions = CLS_PROPORTIONS
    else:
        counts = cfg.seg_counts or DDTI_COUNTS
        proportions = tuple(c / sum(counts) for c in counts)
    targets: dict[str, dict[int, int]] = {s: {} for s in SPLITS}
    for k in set(strata.values()):
        n_k = sum(1 for v in strata.values() if v == k)
        for s, c in zip(SPLITS, _targets(n_k, proportions), strict=True):
            targets[s][k] = c
    assigned = assign_groups(groups, strata, targets, cfg.seed)
    order = {r.id: i for i, r in enumerate(index.records)}
    ids = {s: sorted(assigned[s], key=order.__getitem__) for s in SPLITS}
    return {
        "dataset": index.name,
        "task_type": index.task_type,
        "config": dataclasses.asdict(cfg),
        "n_groups": len(groups),
        "multi_image_groups": sorted((sorted(g) for g in groups if len(g) > 1), key=len)[::-1],
        "ids": ids,
        "fractions": nested_fractions(ids["train"], strata, fractions, cfg.seed),
    }


def load_or_make_splits(
    index: DatasetIndex, path: str | Path, cfg: SplitConfig | None = None, **kwargs
) -> dict:
    """Reuse `path` when it exists (and covers exactly this dataset's ids), else write it."""
    splits = read_splits(index, path, cfg)
    if splits is None:
        splits = make_splits(index, cfg, **kwargs)
        write_json(path, splits, indent=1)
    return splits


def read_splits(index: DatasetIndex, path: str | Path, cfg: SplitConfig | None = None):
    """The splits stored at `path` for this dataset and config; None when there are none (an
    empty or cut file counts as none, after a warning); UserError when they do not match."""
    path = Path(path)
    splits = read_json(path, "split file")
    if not (isinstance(splits, dict) and "ids" in splits):
        return None
    stored = {i for s in SPLITS for i in splits["ids"][s]}
    if stored != {r.id for r in index.records}:
        raise UserError(f"{path}: split file does not match dataset {index.name}")
    if cfg is not None and splits.get("config") != dataclasses.asdict(cfg):
        raise UserError(
            f"{path} was made with {splits.get('config')}, not {dataclasses.asdict(cfg)}: "
            "use another output folder (or delete the file to re-split)"
        )
    return splits


def split_ids(splits: dict, split: str, fraction: float = 1.0) -> list[str]:
    if split == "train" and fraction < 1.0:
        key = fraction_key(fraction)
        if key not in splits["fractions"]:
            raise KeyError(
                f"fraction {fraction} not in the split file ({list(splits['fractions'])})"
            )
        return splits["fractions"][key]
    return splits["ids"][split]
