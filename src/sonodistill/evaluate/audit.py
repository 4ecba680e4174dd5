"""`sonodistill evaluate audit`: what a reviewer would check before trusting a split.

For each task (and each fold of a cross-validation): images per split and their class
balance, the groups used (the rules that made them, how many, the largest), near-duplicate
pairs within and across splits at the chosen similarity (the split's own decision,
`data.neardup.near_duplicates`: across splits they are leaks) and close pairs at a looser one
(never leaks), explicit groups that straddle splits, names sharing a leading id across splits
(possibly one patient), conflicting-label duplicates, masks that are not binary (with the
threshold used) or were drawn as outlines, and a contact sheet of the closest cross-split
pairs. `audit_report` computes it in memory (a suite does so for every task before writing
anything, and refuses to start while pairs or groups straddle splits unless `accept_leaks`);
`write_audit` writes it beside the split files (`TASK.audit.md|json`, `TASK.pairs.png`)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sonodistill.data.greys import resize_square
from sonodistill.data.neardup import (
    CANDIDATE_BITS,
    LOOSE,
    Fingerprints,
    candidate_pairs,
    near_duplicates,
    similarity,
    unshifted_similarity,
)
from sonodistill.errors import UserError
from sonodistill.evaluate.datasets import DatasetIndex, mask_report, read_records
from sonodistill.evaluate.splits import SPLITS
from sonodistill.io import atomic_path, write_json, write_text

SHEET_PAIRS = 12


class LeakError(UserError):
    """Pairs of near-identical images (or one group) straddle the splits of a suite."""


def _split_of(splits: dict) -> dict[str, str]:
    return {i: s for s in SPLITS for i in splits["ids"][s]}


def split_table(index: DatasetIndex, splits: dict, empty: dict[str, bool]) -> list[dict]:
    """Per split: images, groups, count per class (labels) and empty masks (segmentation)."""
    by_id = {r.id: r for r in index.records}
    label_names = index.classes if index.task_type == "cls" else None
    rows = []
    for s in SPLITS:
        ids = splits["ids"][s]
        groups = {by_id[i].group or i for i in ids}
        row = {"split": s, "images": len(ids), "explicit_groups": len(groups)}
        labels = [by_id[i].label for i in ids if by_id[i].label is not None]
        if labels:
            names = label_names or _stratum_names(index)
            row["classes"] = {names[k]: v for k, v in sorted(Counter(labels).items())}
        if empty:
            row["empty_masks"] = sum(empty.get(i, False) for i in ids)
        rows.append(row)
    return rows


def _stratum_names(index: DatasetIndex) -> tuple[str, ...]:
    """Image-level classes of a segmentation set (BUSI's normal/benign/malignant)."""
    if index.name.startswith("busi"):
        from sonodistill.evaluate.datasets import BUSI_CLASSES

        return BUSI_CLASSES
    top = max(r.label for r in index.records if r.label is not None)
    return tuple(str(k) for k in range(top + 1))


def all_pairs(index: DatasetIndex, fps: Fingerprints, level: float) -> list[tuple]:
    """(id a, id b, similarity, exact) of the pairs at least `level` similar."""
    ids = [r.id for r in index.records]
    found = near_duplicates(fps, None, level, CANDIDATE_BITS)
    return [
        (ids[i], ids[j], float(sim), bool(exact))
        for i, j, sim, exact in found[["i", "j", "similarity", "exact"]].itertuples(index=False)
    ]


def closest_across(index: DatasetIndex, splits: dict, fps: Fingerprints, k: int) -> list[list]:
    """The k most similar cross-split pairs among the candidates, whatever their similarity:
    ranked by the cheap unshifted correlation, then scored in full."""
    where = _split_of(splits)
    ids = [r.id for r in index.records]
    ia, ib = candidate_pairs(fps, None, CANDIDATE_BITS)
    across = np.array(
        [
            ids[i] in where and ids[j] in where and where[ids[i]] != where[ids[j]]
            for i, j in zip(ia, ib, strict=True)
        ],
        dtype=bool,
    )
    ia, ib = ia[across], ib[across]
    rough = unshifted_similarity(fps, fps, ia, ib)
    top = np.argsort(-rough)[: 3 * k]
    full = similarity(fps, fps, ia[top], ib[top])
    exact = fps.sha1[ia[top]] == fps.sha1[ib[top]]
    rows = [
        [ids[i], ids[j], round(float(1.0 if e else s), 4), bool(e), where[ids[i]], where[ids[j]]]
        for i, j, s, e in zip(ia[top], ib[top], full, exact, strict=True)
    ]
    return sorted(rows, key=lambda r: -r[2])[:k]


def pair_report(
    index: DatasetIndex, splits: dict, pairs: list[tuple], threshold: float, loose: float
) -> dict:
    """Near-duplicate pairs (from `all_pairs`) within and across splits at `threshold` and at
    `loose`, and explicit groups split across splits."""
    where = _split_of(splits)
    rows = [[a, b, s, e, where[a], where[b]] for a, b, s, e in pairs if a in where and b in where]
    out = {}
    for name, level in (("chosen", threshold), ("loose", loose)):
        at = [r for r in rows if r[2] >= level]
        across = [r for r in at if r[4] != r[5]]
        out[name] = {
            "similarity": level,
            "within": len(at) - len(across),
            "across": len(across),
            "across_pairs": across[:50],
        }
    by_id = {r.id: r for r in index.records}
    straddle = {}
    for i, s in where.items():
        g = by_id[i].group
        if g:
            straddle.setdefault(g, set()).add(s)
    out["groups_across"] = sorted(g for g, s in straddle.items() if len(s) > 1)
    return out


def contact_sheet(index: DatasetIndex, pairs: list[list], path: Path, side: int = 160) -> Path:
    """The closest cross-split pairs side by side, with ids, splits and similarity."""
    pairs = pairs[:SHEET_PAIRS]
    by_id = {r.id: r for r in index.records}
    records = [by_id[p[k]] for p in pairs for k in (0, 1)]
    greys = list(read_records(records)) if records else []
    caption = 30
    width = 2 * side + 12
    sheet = Image.new("L", (width, max(1, len(pairs)) * (side + caption + 14) + 4), 255)
    draw = ImageDraw.Draw(sheet)
    if not pairs:
        draw.text((6, 6), "no cross-split candidate pair", fill=0)
    for row, p in enumerate(pairs):
        y = row * (side + caption + 14) + 4
        exact = " (exact copy)" if p[3] else ""
        draw.text((4, y), f"similarity {p[2]:.3f}{exact}", fill=0)
        for k in (0, 1):
            x = 4 + k * (side + 4)
            draw.text((x, y + 12), str(p[k])[-26:], fill=0)
            draw.text((x, y + 24), f"[{p[4 + k]}]", fill=0)
            thumb = Image.fromarray(resize_square(greys[2 * row + k], side))
            sheet.paste(thumb, (x, y + caption + 8))
    with atomic_path(path) as tmp:
        sheet.save(tmp)
    return path


_LEADING_ID = re.compile(r"^(?P<id>[^_\s]+)_.+$")
SAME_PATIENT_RULE = r"regex:([^/_]+)_[^/]*$"
"""The `group_by` that joins images named PATIENT_REST (`012_a.png`, `012_b.png`)."""


def same_prefix_across(index: DatasetIndex, splits: dict) -> dict:
    """File names sharing a leading id (the text before the first `_`) in different splits:
    possibly one patient's images, which pixel similarity cannot see; with the group_by that
    would join them. Only where several images share such an id and no group joins them."""
    where = _split_of(splits)
    by_prefix: dict[str, list] = {}
    for r in index.records:
        match = _LEADING_ID.match(r.image.stem)
        if match and r.id in where and r.frame < 0:
            key = f"{r.image.parent.as_posix()}/{match['id']}"
            by_prefix.setdefault(key, []).append(r)
    across = []
    for key, records in sorted(by_prefix.items()):
        splits_of = {where[r.id] for r in records}
        if len(splits_of) > 1 and len({r.group for r in records} - {None}) != 1:
            across.append([Path(key).name, sorted(r.id for r in records), sorted(splits_of)])
    return {
        "prefixes_across": len(across),
        "examples": across[:20],
        "group_by": SAME_PATIENT_RULE if across else None,
    }


def audit_report(
    index: DatasetIndex,
    split_list: list[dict],
    fps: Fingerprints,
    task: str,
    threshold: float,
    loose: float = LOOSE,
) -> dict:
    """Audit one task's split(s) in memory (nothing written; see `write_audit`)."""
    masks, empty = mask_report(index)
    pairs = all_pairs(index, fps, min(threshold, loose))
    parts = []
    for splits in split_list:
        name = f"fold {splits['fold']}" if "fold" in splits else "fixed split"
        found = pair_report(index, splits, pairs, threshold, loose)
        parts.append(
            {
                "split": name,
                "table": split_table(index, splits, empty),
                **found,
                "same_prefix": same_prefix_across(index, splits),
            }
        )
    first = split_list[0]
    return {
        "task": task,
        "dataset": index.name,
        "images": len(index.records),
        "group_rules": list(index.group_rules),
        "groups": first["n_groups"],
        "largest_group": first["largest_group"],
        "multi_image_groups": len(first["multi_image_groups"]),
        "near_duplicate_threshold": threshold,
        "loose_threshold": loose,
        "conflicting_labels": first.get("conflicting_labels", []),
        "excluded": first.get("excluded", []),
        "masks": masks,
        "splits": parts,
        "leaks": sum(p["chosen"]["across"] + len(p["groups_across"]) for p in parts),
        "closest_across": closest_across(index, first, fps, SHEET_PAIRS),
    }


def write_audit(report: dict, index: DatasetIndex, out: Path) -> dict:
    """TASK.audit.json|md and TASK.pairs.png of an `audit_report` into `out`."""
    task = report["task"]
    report["contact_sheet"] = contact_sheet(
        index, report["closest_across"], out / f"{task}.pairs.png"
    ).name
    write_json(out / f"{task}.audit.json", report, indent=1)
    write_text(out / f"{task}.audit.md", audit_markdown(report))
    return report


def leak_summary(report: dict) -> dict:
    """What an accepted leak is, for the tables' notes and each run's JSON."""
    first = report["splits"][0]
    return {
        "leaks": report["leaks"],
        "pairs_across": sum(p["chosen"]["across"] for p in report["splits"]),
        "groups_across": sum(len(p["groups_across"]) for p in report["splits"]),
        "near_duplicate": report["near_duplicate_threshold"],
        "examples": [p[:3] for p in first["chosen"]["across_pairs"][:5]]
        + [["group", g] for g in first["groups_across"][:5]],
    }


def audit_markdown(r: dict) -> str:
    rules = r["group_rules"] + [f"near duplicates at similarity >= {r['near_duplicate_threshold']}"]
    lines = [
        f"# Audit of {r['task']} ({r['dataset']}, {r['images']} images)",
        "",
        f"Groups: {r['groups']} ({r['multi_image_groups']} with several images, largest "
        f"{r['largest_group']}); rules: {'; '.join(rules)}.",
        "",
    ]
    for part in r["splits"]:
        lines += [f"## {part['split']}", ""]
        classes = sorted({c for row in part["table"] for c in row.get("classes", {})})
        head = ["split", "images", "explicit groups", *classes]
        if any("empty_masks" in row for row in part["table"]):
            head.append("empty masks")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in part["table"]:
            cells = [row["split"], row["images"], row["explicit_groups"]]
            cells += [row.get("classes", {}).get(c, 0) for c in classes]
            if "empty_masks" in row:
                cells.append(row["empty_masks"])
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines += [
            "",
            "| near duplicates | similarity | within splits | across splits |",
            "|---|---|---|---|",
        ]
        for name in ("chosen", "loose"):
            p = part[name]
            label = (
                "chosen (grouped; across = leak)" if name == "chosen" else "close pairs (a look)"
            )
            lines.append(f"| {label} | >= {p['similarity']} | {p['within']} | {p['across']} |")
        if part["groups_across"]:
            lines.append(f"\nGroups split across splits: {', '.join(part['groups_across'][:20])}")
        if part["loose"]["across_pairs"]:
            lines += ["", "Close pairs across splits (not leaks; first 20):", ""]
            for a, b, sim, exact, sa, sb in part["loose"]["across_pairs"][:20]:
                lines.append(f"- {a} [{sa}] / {b} [{sb}]: {sim:.3f}" + (" exact" if exact else ""))
        same = part.get("same_prefix", {})
        if same.get("prefixes_across"):
            lines += [
                "",
                f"Possible same-patient images across splits: {same['prefixes_across']} leading "
                f"ids (the name before `_`) are in several splits; `group_by: "
                f'"{same["group_by"]}"` would keep each in one split. First:',
                "",
            ]
            for prefix, ids, where in same["examples"][:10]:
                lines.append(f"- {prefix}: {', '.join(ids[:6])} ({', '.join(where)})")
        lines.append("")
    if r["conflicting_labels"]:
        lines += ["## Conflicting-label duplicates", ""]
        kept_out = f"Kept out of the task: {len(r['excluded'])} images."
        lines += [kept_out if r["excluded"] else "Kept in the task (label_conflicts: keep).", ""]
        for c in r["conflicting_labels"]:
            pairs = "; ".join(
                f"{a} / {b} ({'exact copy' if e else f'similarity {s:.3f}'})"
                for a, b, s, e in c["pairs"]
            )
            lines.append(f"- {', '.join(c['ids'])}: labels {', '.join(c['labels'])} — {pairs}")
        lines.append("")
    m = r["masks"]
    if "rule" in m:
        lines += [
            "## Masks",
            "",
            f"{m['files']} mask files; {m['rule']}. Not two-valued: {m['not_binary']} "
            f"(binarised at > 0 instead they would grow by a median "
            f"{100 * m['median_growth_at_zero']:.1f}%). Outline annotations: {m['outlines']} "
            f"(policy: {m['outline_policy']}).",
            "",
        ]
    lines += [
        f"Contact sheet of the closest cross-split pairs: {r['contact_sheet']}.",
        "",
        f"**Leaks (pairs at the chosen similarity or groups across splits): {r['leaks']}**",
    ]
    return "\n".join(lines) + "\n"


def summary_line(r: dict) -> str:
    across = sum(p["loose"]["across"] for p in r["splits"])
    same = sum(p.get("same_prefix", {}).get("prefixes_across", 0) for p in r["splits"])
    return (
        f"{r['task']}: {r['images']} images, {r['groups']} groups (largest {r['largest_group']}), "
        f"{len(r['conflicting_labels'])} conflicting-label groups ({len(r['excluded'])} images "
        f"left out), leaks {r['leaks']}, cross-split pairs at >= {r['loose_threshold']}: {across}"
        + (f", masks not binary: {r['masks']['not_binary']}" if "not_binary" in r["masks"] else "")
        + (f", possible same-patient ids across splits: {same} (see the audit)" if same else "")
    )
