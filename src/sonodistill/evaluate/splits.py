"""Deterministic, leakage-free train/val/test splits, group k-fold cross-validation and nested
label fractions.

Groups before splits: images that must share a split are the connected components of a graph
whose edges are (1) the dataset's own groups (DDTI's dual-view scans, patients from a CSV, a
`group_by` rule, the frames of a clip) and (2) exact and near-duplicate pairs, in the project's
one near-duplicate notion (`data.neardup`). A group always lands in one split.

Classification: a near-duplicate component whose images carry different labels (BUSI's
`malignant (145)` = `benign (433)`) is a conflicting-label duplicate: its images are kept out
of the task (`label_conflicts: drop`, the default) and listed in the split file.

Splits are written to JSON and reused, so every encoder, protocol and seed of a suite sees the
same images.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from sonodistill.data.neardup import (
    CANDIDATE_BITS,
    THRESHOLD,
    Fingerprints,
    cached_fingerprints,
    components,
    fingerprint_batch,
    near_duplicates,
)
from sonodistill.errors import UserError
from sonodistill.evaluate.config import SplitConfig
from sonodistill.evaluate.datasets import DatasetIndex, read_records
from sonodistill.io import read_json, write_json

DDTI_COUNTS = (445, 127, 65)
"""The paper's DDTI split (Sec. 4.1); other segmentation sets use the same proportions."""
CLS_PROPORTIONS = (0.7, 0.1, 0.2)
"""BUSI classification: the paper's tables imply a 157-image test set (about 20%)."""
SPLITS = ("train", "val", "test")
FRACTIONS = (0.05, 0.1, 0.2, 0.5)


def image_fingerprints(index: DatasetIndex) -> Fingerprints:
    """data.neardup fingerprints of the index's records, in record order (cached)."""
    items = [(str(r.image), r.frame) for r in index.records]
    return cached_fingerprints(items, lambda: fingerprint_batch(read_records(index.records)))


@dataclass
class DuplicateStructure:
    """What links the images of a dataset: groups (components), near-duplicate pairs (ids and
    similarity) and conflicting-label duplicate groups."""

    groups: list[list[str]]
    pairs: list[tuple[str, str, float, bool]]
    conflicts: list[dict]


def duplicate_structure(
    index: DatasetIndex, fps: Fingerprints, threshold: float = THRESHOLD
) -> DuplicateStructure:
    ids = [r.id for r in index.records]
    found = near_duplicates(fps, None, threshold, CANDIDATE_BITS)
    pairs = [
        (ids[i], ids[j], round(float(s), 4), bool(e))
        for i, j, s, e in found[["i", "j", "similarity", "exact"]].itertuples(index=False)
    ]
    dup_edges = list(zip(found.i.tolist(), found.j.tolist(), strict=True))
    edges = list(dup_edges)
    first: dict[str, int] = {}
    for k, r in enumerate(index.records):
        if r.group:
            edges.append((k, first.setdefault(r.group, k)))
    groups = _members(ids, components(len(ids), edges))
    conflicts = []
    if index.task_type == "cls":
        label = {r.id: index.classes[r.label] for r in index.records}
        for group in _members(ids, components(len(ids), dup_edges)):
            if len({label[i] for i in group}) < 2:
                continue
            inside = set(group)
            conflicts.append(
                {
                    "ids": group,
                    "labels": [label[i] for i in group],
                    "pairs": [
                        [a, b, sim, exact]
                        for a, b, sim, exact in pairs
                        if a in inside and label[a] != label[b]
                    ],
                }
            )
    return DuplicateStructure(groups, pairs, conflicts)


def _members(ids: list[str], labels) -> list[list[str]]:
    """The ids of each component, components in order of first appearance."""
    members: dict[int, list[str]] = {}
    for id_, label in zip(ids, labels.tolist(), strict=True):
        members.setdefault(label, []).append(id_)
    return list(members.values())


def _targets(n: int, proportions) -> list[int]:
    counts = [int(round(n * p)) for p in proportions]
    counts[0] = n - sum(counts[1:])
    return counts


def assign_groups(groups: list[list[str]], strata: dict[str, int], targets: dict, seed: int):
    """Greedy exact-count assignment: big groups first, each to the bin (split or fold) with
    the largest relative deficit for its stratum (its majority class), so bins fill in
    proportion. `targets`: bin -> stratum -> count; ties go to the earlier bin.

    scikit-learn's GroupShuffleSplit / StratifiedGroupKFold cannot hit given counts such as
    DDTI's 445/127/65, hence this small deterministic rule.
    """
    bins = list(targets)
    rng = random.Random(seed)
    order = sorted(groups, key=lambda g: (len(g), rng.random()), reverse=True)
    filled = {s: {k: 0 for k in targets[s]} for s in bins}
    out: dict = {s: [] for s in bins}
    for group in order:
        labels = [strata[i] for i in group]
        stratum = max(set(labels), key=lambda k: (labels.count(k), -k))
        split = max(
            bins,
            key=lambda s: (
                (targets[s].get(stratum, 0) - filled[s].get(stratum, 0))
                / max(targets[s].get(stratum, 0), 1),
                -bins.index(s),
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


def _proportions(index: DatasetIndex, cfg: SplitConfig) -> tuple[float, ...]:
    if cfg.proportions:
        return tuple(cfg.proportions)
    if index.task_type == "cls":
        return CLS_PROPORTIONS
    counts = cfg.seg_counts or DDTI_COUNTS
    return tuple(c / sum(counts) for c in counts)


def _count_targets(strata: dict[str, int], ids, bins, proportions) -> dict:
    targets: dict[str, dict[int, int]] = {b: {} for b in bins}
    values = [strata[i] for i in ids]
    for k in set(values):
        for b, c in zip(bins, _targets(values.count(k), proportions), strict=True):
            targets[b][k] = c
    return targets


def _prepare(index: DatasetIndex, cfg: SplitConfig, fingerprints: Fingerprints | None):
    """(structure, kept groups, strata, excluded ids) shared by the fixed split and the folds."""
    fps = fingerprints if fingerprints is not None else image_fingerprints(index)
    if len(fps) != len(index.records):
        raise ValueError(f"{len(fps)} fingerprints for {len(index.records)} images")
    structure = duplicate_structure(index, fps, cfg.near_duplicate)
    excluded: set[str] = set()
    if index.task_type == "cls" and cfg.label_conflicts == "drop":
        excluded = {i for c in structure.conflicts for i in c["ids"]}
    groups = [[i for i in g if i not in excluded] for g in structure.groups]
    groups = [g for g in groups if g]
    # Classification is class-stratified; segmentation too when images carry a class (BUSI:
    # normal cases have empty masks and should not cluster in one split).
    strata = {r.id: (r.label if r.label is not None else 0) for r in index.records}
    return structure, groups, strata, excluded


def _describe(index, cfg, structure, groups, excluded) -> dict:
    sizes = [len(g) for g in groups]
    return {
        "dataset": index.name,
        "task_type": index.task_type,
        "config": dataclasses.asdict(cfg),
        "group_rules": list(index.group_rules),
        "n_groups": len(groups),
        "largest_group": max(sizes, default=0),
        "multi_image_groups": sorted((sorted(g) for g in groups if len(g) > 1), key=len)[::-1],
        "near_duplicates": [list(p) for p in structure.pairs],
        "conflicting_labels": structure.conflicts,
        "excluded": sorted(excluded),
    }


def released(index: DatasetIndex) -> bool:
    """The records carry their release's split (`split: folders`)."""
    return any(r.split for r in index.records)


def check_filled(index: DatasetIndex, ids: dict, groups: list[list[str]], what: str = "") -> None:
    """Every split holds an image, and (classification) every class: else a UserError line
    before any run, with what made the groups (one group of every image trains on all)."""
    label = {r.id: r.label for r in index.records}
    sizes = sorted(map(len, groups), reverse=True)
    for s in SPLITS:
        missing = ""
        if not ids[s]:
            missing = "no images"
        elif index.task_type == "cls":
            absent = sorted(set(range(index.num_classes)) - {label[i] for i in ids[s]})
            if absent:
                missing = f"no {', '.join(index.classes[k] for k in absent)} images"
        if missing:
            rules = "; ".join(index.group_rules) or "near duplicates only"
            raise UserError(
                f"{index.name}: {what}the {s} split has {missing} ({len(index.records)} images in "
                f"{len(groups)} groups, the largest {sizes[0] if sizes else 0}; groups by: "
                f"{rules}): check group_by, groups_csv or the folders' split"
            )


def _ordered(index: DatasetIndex, assigned: dict) -> dict[str, list[str]]:
    order = {r.id: i for i, r in enumerate(index.records)}
    return {s: sorted(assigned[s], key=order.__getitem__) for s in SPLITS}


def make_splits(
    index: DatasetIndex,
    cfg: SplitConfig | None = None,
    fingerprints: Fingerprints | None = None,
    fractions=FRACTIONS,
) -> dict:
    """The fixed train/val/test split (the paper's protocol)."""
    cfg = cfg or SplitConfig()
    structure, groups, strata, excluded = _prepare(index, cfg, fingerprints)
    if released(index):  # split: folders, the release's own split
        ids = {
            s: [r.id for r in index.records if r.split == s and r.id not in excluded]
            for s in SPLITS
        }
    else:
        kept = [i for g in groups for i in g]
        targets = _count_targets(strata, kept, SPLITS, _proportions(index, cfg))
        ids = _ordered(index, assign_groups(groups, strata, targets, cfg.seed))
    check_filled(index, ids, groups)
    return {
        **_describe(index, cfg, structure, groups, excluded),
        "ids": ids,
        "fractions": nested_fractions(ids["train"], strata, fractions, cfg.seed),
    }


def make_folds(
    index: DatasetIndex,
    k: int,
    cfg: SplitConfig | None = None,
    fingerprints: Fingerprints | None = None,
    fractions=FRACTIONS,
) -> list[dict]:
    """Group k-fold cross-validation: the groups are dealt into k class-balanced folds; fold f
    tests on fold f and splits the other folds' groups into train and val in the fixed split's
    train:val proportion. Every image is tested exactly once."""
    if k < 2:
        raise ValueError(f"folds must be at least 2, not {k}")
    if released(index):
        raise UserError(
            f"--folds {k}: dataset {index.name} keeps its release's split (split: folders); "
            "cross-validation needs split: grouped"
        )
    cfg = cfg or SplitConfig()
    structure, groups, strata, excluded = _prepare(index, cfg, fingerprints)
    kept = [i for g in groups for i in g]
    if len(groups) < k:
        raise UserError(
            f"--folds {k}: dataset {index.name} has {len(groups)} groups (the largest "
            f"{max(map(len, groups), default=0)} images), too few for {k} folds"
        )
    names = [f"fold{f}" for f in range(k)]
    dealt = assign_groups(
        groups, strata, _count_targets(strata, kept, names, [1 / k] * k), cfg.seed
    )
    train, val, _ = _proportions(index, cfg)
    out = []
    for f, name in enumerate(names):
        rest = [g for g in groups if not set(g) & set(dealt[name])]
        rest_ids = [i for g in rest for i in g]
        targets = _count_targets(
            strata, rest_ids, SPLITS[:2], (train / (train + val), val / (train + val))
        )
        inner = assign_groups(rest, strata, {**targets, "test": {}}, cfg.seed + f + 1)
        inner["test"] = dealt[name]
        ids = _ordered(index, inner)
        check_filled(index, ids, groups, f"fold {f}: ")
        out.append(
            {
                **_describe(index, cfg, structure, groups, excluded),
                "fold": f,
                "folds": k,
                "ids": ids,
                "fractions": nested_fractions(ids["train"], strata, fractions, cfg.seed),
            }
        )
    return out


def _check_stored(splits: dict, index: DatasetIndex, path: Path, cfg: SplitConfig | None):
    stored = {i for s in SPLITS for i in splits["ids"][s]} | set(splits.get("excluded", []))
    if stored != {r.id for r in index.records}:
        raise UserError(f"{path}: split file does not match dataset {index.name}")
    if cfg is not None and splits.get("config") != dataclasses.asdict(cfg):
        raise UserError(
            f"{path} was made with {splits.get('config')}, not {dataclasses.asdict(cfg)}: "
            "use another output folder (or delete the file to re-split)"
        )


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
    _check_stored(splits, index, path, cfg)
    return splits


def fold_path(folder: Path, task: str, fold: int, folds: int) -> Path:
    return folder / f"{task}.cv{folds}-{fold}.json"


def split_ids(splits: dict, split: str, fraction: float = 1.0) -> list[str]:
    if split == "train" and fraction < 1.0:
        key = fraction_key(fraction)
        if key not in splits["fractions"]:
            raise KeyError(
                f"fraction {fraction} not in the split file ({list(splits['fractions'])})"
            )
        return splits["fractions"][key]
    return splits["ids"][split]
