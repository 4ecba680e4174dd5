"""Downstream datasets: BUSI, DDTI (TN-SCUI and original XML layouts) and generic folders.

A loader returns a `DatasetIndex` (records: image path or video frame, mask paths or polygons,
label, group); `SegDataset` / `ClsDataset` turn records into tensors: a float grey image
(1, S, S) in [0, 1] and a long mask (S, S) of class indices or a long label.

Groups (images that must share a split) are set by the loaders where the files prove them:
DDTI's dual-view halves (`10000+N` and `20000+N` are the two views of scan N, TN-SCUI
layout), DDTI's original cases (`CASE_K.jpg`), the frames of one video; and by the dataset's
`group_by` rule or `groups_csv` (see `DatasetSpec`). Near-duplicate images are grouped later,
by the splits (`data.neardup`).

Every image goes through `data.greys` (the project's one image path); masks through
`data.masks` (pairing rules, the 8-bit threshold, outlines), and an image whose masks have
another size is refused while indexing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from sonodistill.config import checked, to_dict
from sonodistill.data.greys import read_grey, read_greys, resize_mask, resize_square
from sonodistill.data.listing import spread
from sonodistill.data.masks import (
    MASK_THRESHOLD,
    Outline,
    binarise,
    check_sizes,
    images_and_masks,
    is_binary_file,
    is_outline,
    mask_owner,
    masks_by_image,
    merge_masks,
    read_mask_file,
    read_mask_values,
)
from sonodistill.data.neardup import cache_dir, file_stamp
from sonodistill.data.readers import IMAGE_EXT, VIDEO_EXT, ReadError, video_frame_count
from sonodistill.errors import UserError, unknown_name
from sonodistill.evaluate.config import (
    DATASET_FORMATS,
    GROUP_RULES,
    DatasetFormat,
    DatasetSpec,
    FolderPair,
    TaskType,
)
from sonodistill.io import write_json

BUSI_CLASSES = ("normal", "benign", "malignant")
DDTI_CLASSES = ("background", "nodule")


@dataclass(frozen=True)
class Record:
    """One image (or video frame) and its annotation: mask files (merged), polygons
    (rasterised) or a label; `group`: images of one group always share a split."""

    id: str
    image: Path
    masks: tuple[Path, ...] = ()
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()
    label: int | None = None
    group: str | None = None
    frame: int = -1
    """Frame index in a video file (-1: a still image)."""
    split: str | None = None
    """The release's split (train, val, test) under `split: folders`; None: the tool splits."""


@dataclass
class DatasetIndex:
    name: str
    task_type: TaskType
    records: list[Record]
    classes: tuple[str, ...] = ("background", "foreground")
    """Class names: mask values (seg, index 0 = background) or labels (cls)."""
    mask_threshold: int = MASK_THRESHOLD
    outline: Outline = "fill"
    group_rules: tuple[str, ...] = ()
    """How the records' groups were set (for the audit): loader rules, group_by, groups_csv."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, ids: list[str]) -> list[Record]:
        by_id = {r.id: r for r in self.records}
        return [by_id[i] for i in ids]

    def load_mask(self, record: Record, shape: tuple[int, int]) -> np.ndarray:
        """The record's masks merged (binary sets: {0, 1}; multi-class: class indices)."""
        return load_mask(record, shape, self.num_classes == 2, self.mask_threshold, self.outline)


# --------------------------------------------------------------------------- reading pixels


def _grey(path: Path, frame: int = -1) -> np.ndarray:
    """`data.greys.read_grey`, an unreadable evaluation image being the user's to fix."""
    try:
        return read_grey(path, frame)
    except ReadError as err:
        raise UserError(f"{path}: unreadable image ({err}); replace or remove it") from err


def rasterise(polygons, size: tuple[int, int]) -> np.ndarray:
    """Filled polygons (x, y in pixels) -> uint8 {0, 1} mask of size (W, H)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 3:
            draw.polygon([tuple(p) for p in poly], fill=1, outline=1)
    return np.asarray(canvas)


def load_mask(
    record: Record,
    shape: tuple[int, int],
    binary: bool = True,
    threshold: int = MASK_THRESHOLD,
    outline: Outline = "fill",
) -> np.ndarray:
    """All masks of a record merged (union for binary, max for class indices)."""
    mask = merge_masks(record.masks, shape, binary, threshold, outline)
    if record.polygons:
        mask = np.maximum(mask, rasterise(record.polygons, (shape[1], shape[0])))
    return mask


def read_records(records: list[Record]) -> Iterator[np.ndarray]:
    """Grey frames of records, in order (`data.greys`; videos decoded once per clip run)."""
    try:
        yield from read_greys([(r.image, r.frame) for r in records])
    except ReadError as err:
        raise UserError(f"unreadable image: {err}; replace or remove it") from err


# --------------------------------------------------------------------------- loaders


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def load_busi(root: str | Path, task_type: TaskType = "seg") -> DatasetIndex:
    """BUSI's published layout: `{benign,malignant,normal}/NAME.png` + `NAME_mask[_k].png`."""
    root = Path(root)
    if (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    records = []
    for label, cls in enumerate(BUSI_CLASSES):
        folder = root / cls
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: BUSI class folder missing")
        images, masks = images_and_masks(folder)
        for p in sorted(images, key=lambda p: _natural_key(p.stem)):
            if task_type == "seg" and p.stem not in masks:
                raise FileNotFoundError(f"{p}: no mask file")
            records.append(
                Record(
                    id=f"{cls}/{p.stem}",
                    image=p,
                    masks=tuple(masks.get(p.stem, [])),
                    label=label,
                )
            )
    classes = BUSI_CLASSES if task_type == "cls" else ("background", "lesion")
    return DatasetIndex(f"busi_{task_type}", task_type, records, classes)


def ddti_scan(image_id: str) -> str | None:
    """TN-SCUI's DDTI numbering: `10000+N` and `20000+N` are the two halves of dual-view scan N
    (one nodule, one patient; the renumbering removed N itself). None for single-view ids."""
    if not image_id.isdigit() or int(image_id) < 10000:
        return None
    return f"scan{int(image_id) % 10000}"


def load_ddti(root: str | Path) -> DatasetIndex:
    """DDTI as `image/N.PNG` + `mask/N.PNG` (TN-SCUI 2020; the halves of a dual-view scan are
    one group) or the original release (`CASE_K.jpg` + `CASE.xml` with nodule polygons; the
    case number is the group)."""
    root = Path(root)
    if (root / "image").is_dir() and (root / "mask").is_dir():
        masks = masks_by_image((root / "mask").iterdir(), named_only=False)
        records = []
        for p in sorted(_images(root / "image"), key=lambda p: _natural_key(p.stem)):
            if p.stem not in masks:
                raise FileNotFoundError(f"{p}: no mask in {root / 'mask'}")
            records.append(
                Record(id=p.stem, image=p, masks=tuple(masks[p.stem]), group=ddti_scan(p.stem))
            )
        rule = "ddti: ids 10000+N and 20000+N are the two views of scan N"
        return DatasetIndex("ddti_seg", "seg", records, DDTI_CLASSES, group_rules=(rule,))
    xmls = sorted(root.glob("*.xml"), key=lambda p: _natural_key(p.stem))
    if not xmls:
        raise FileNotFoundError(f"{root}: neither image/+mask/ nor DDTI *.xml files")
    records = []
    for xml_path in xmls:
        for image_no, polygons in parse_ddti_xml(xml_path).items():
            image = root / f"{xml_path.stem}_{image_no}.jpg"
            if image.is_file():
                records.append(
                    Record(id=image.stem, image=image, polygons=polygons, group=xml_path.stem)
                )
    rule = "ddti: the images of one case (CASE_K.jpg) are one group"
    return DatasetIndex("ddti_seg", "seg", records, DDTI_CLASSES, group_rules=(rule,))


_POINT = re.compile(r'"x"\s*:\s*(-?[\d.]+)\s*,\s*"y"\s*:\s*(-?[\d.]+)')


def parse_ddti_xml(path: Path) -> dict[str, tuple]:
    """{image number: polygons} from a DDTI case file (`<mark><image>K</image><svg>JSON</svg>`).

    A few released files have truncated JSON, so points are read with a regex per polygon
    (`"points": [...]` block) instead of json.loads.
    """
    tree = ET.parse(path)
    out: dict[str, tuple] = {}
    for mark in tree.getroot().iter("mark"):
        image_no = (mark.findtext("image") or "").strip()
        svg = mark.findtext("svg") or ""
        polygons = []
        for block in svg.split('"points"')[1:]:
            pts = tuple((float(x), float(y)) for x, y in _POINT.findall(block.split("]")[0]))
            if len(pts) >= 3:
                polygons.append(pts)
        if image_no:
            out[image_no] = out.get(image_no, ()) + tuple(polygons)
    return out


def folder_pairs(root: Path, pairs) -> list[tuple[Path, Path | None, str | None]]:
    """(images folder, masks folder or None for masks beside, split) of each `FolderPair`-like
    (images, masks, split), globs expanded: each `*` of `masks` is what `images` matched."""
    out = []
    for images, masks, split in pairs:
        if "*" not in images:
            found = [(root / images, [])]
        else:
            pattern = re.compile("^" + re.escape(images).replace(r"\*", "([^/]*)") + "$")
            found = []
            for d in sorted(p for p in root.glob(images) if p.is_dir()):
                match = pattern.match(d.relative_to(root).as_posix())
                if match:
                    found.append((d, list(match.groups())))
            if not found:
                raise UserError(f"{root}: images glob {images!r} matches no folder")
        for image_dir, parts in found:
            if not image_dir.is_dir():
                raise UserError(f"{image_dir}: images folder not found")
            if not masks or masks == images:
                out.append((image_dir, None, split))
                continue
            mask_rel = masks
            for part in parts:
                mask_rel = mask_rel.replace("*", part, 1)
            if not (root / mask_rel).is_dir():
                raise UserError(f"{root / mask_rel}: masks folder not found (for {image_dir})")
            out.append((image_dir, root / mask_rel, split))
    return out


def load_seg_folder(
    root: str | Path,
    images: str = "images",
    masks: str | None = "masks",
    classes: list[str] | None = None,
    name: str | None = None,
    folders: list | None = None,
) -> DatasetIndex:
    """`images/NAME.*` + `masks/NAME.*` (same stem), or masks beside their images with a
    suffix (`masks` equal to `images`, or empty); with `folders`, several such pairs (ids
    FOLDER/NAME; each folder's `split` kept on its records). Binary unless `classes`."""
    root = Path(root)
    pairs = [(f.images, f.masks, f.split) for f in folders] if folders else [(images, masks, None)]
    expanded = folder_pairs(root, pairs)
    records = []
    for image_dir, mask_dir, split in expanded:
        if mask_dir is None:
            files, found = images_and_masks(image_dir)
            where = f"beside it in {image_dir} (NAME_mask.png, NAME_Annotation.png, ...)"
        else:
            files = [p for p in _images(image_dir) if mask_owner(p) is None]
            found = masks_by_image(mask_dir.iterdir(), named_only=False)
            where = f"named {{stem}}.* in {mask_dir}"
        prefix = f"{image_dir.relative_to(root).as_posix()}/" if folders else ""
        for p in files:
            if p.stem not in found:
                raise UserError(f"{p}: no mask {where.format(stem=p.stem)}")
            records.append(
                Record(id=prefix + p.stem, image=p, masks=tuple(found[p.stem]), split=split)
            )
    if not records:
        raise UserError(f"{', '.join(str(d) for d, _, _ in expanded)}: no images")
    return DatasetIndex(
        name or root.name,
        "seg",
        records,
        tuple(classes) if classes else ("background", "foreground"),
    )


def load_cls_folder(
    root: str | Path, name: str | None = None, frames_per_video: int = 8
) -> DatasetIndex:
    """One sub-folder per class (sorted names = label order), images or videos inside; a
    video gives `frames_per_video` evenly spaced frames that share the video's group."""
    root = Path(root)
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise UserError(f"{root}: need at least two class folders (one per class name)")
    records = []
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).iterdir()):
            suffix = p.suffix.lower()
            if suffix in IMAGE_EXT:
                records.append(Record(id=f"{cls}/{p.stem}", image=p, label=label))
            elif suffix in VIDEO_EXT:
                clip = f"clip:{cls}/{p.stem}"
                for k in spread(video_frame_count(p), frames_per_video):
                    rid = f"{cls}/{p.stem}#{k}"
                    records.append(Record(id=rid, image=p, label=label, group=clip, frame=k))
    videos = any(r.frame >= 0 for r in records)
    rules = ("videos: the frames of one clip are one group",) if videos else ()
    return DatasetIndex(name or root.name, "cls", records, classes, group_rules=rules)


def load_groups_csv(index: DatasetIndex, path: str | Path) -> DatasetIndex:
    """Attach `group` (patient) ids from a CSV with columns id,group."""
    with open(path, newline="") as fh:
        groups = {row["id"]: row["group"] for row in csv.DictReader(fh)}
    index.records = [replace(r, group=groups.get(r.id, r.group)) for r in index.records]
    index.group_rules += (f"groups_csv: {path}",)
    return index


_CLIP_FRAME = re.compile(
    r"^(?P<clip>.*?)[_\-. ]*(?:frame|frm|f)?[_\-. ]*(?<!\d)(?P<frame>\d+)$", re.IGNORECASE
)
"""`group_by: clip`: CLIP_0012, clip7-frame3, video.f12: the clip name before the trailing
frame number (a name without one is its own clip)."""
_TRAILING_NUMBER = re.compile(r"^(?P<prefix>.*?)(?<!\d)(?P<number>\d+)$")


def check_group_by(rule: str, where: str) -> None:
    """A `group_by` value one of GROUP_RULES, its regex compiled; a UserError line otherwise."""
    kind, _, arg = rule.partition(":")
    if kind == "regex" and arg:
        try:
            re.compile(arg)
        except re.error as err:
            raise UserError(f"{where}: group_by {rule}: not a regular expression ({err})") from None
    elif kind == "sequence" and arg:
        if not (arg.isdigit() and int(arg) >= 1):
            raise UserError(f"{where}: group_by {rule}: N must be a whole number >= 1")
    elif arg or kind not in ("folder", "clip", "sequence"):
        raise unknown_name("group_by rule", rule, GROUP_RULES, f"{where}: group_by")


def group_of(record: Record, root: Path, rule: str, where: str = "dataset") -> str:
    """The group a `folder`, `clip` or `regex:` rule gives a record (see DatasetSpec.group_by)."""
    try:
        rel = record.image.relative_to(root)
    except ValueError:
        rel = Path(record.image.name)
    if rule == "folder":
        return rel.parent.as_posix()
    if rule == "clip":
        match = _CLIP_FRAME.match(record.image.stem)
        if match and not match["clip"]:
            raise UserError(
                f"{where}: group_by clip: {rel.as_posix()} has no clip name before its frame "
                "number; use group_by: folder (one folder per clip), sequence[:N] (consecutive "
                "frame numbers are one clip) or regex:PATTERN, or a groups_csv"
            )
        return (rel.parent / (match["clip"] if match else record.image.stem)).as_posix()
    match = re.search(rule.removeprefix("regex:"), rel.as_posix())
    if match is None:
        raise UserError(
            f"{where}: group_by {rule} does not match {rel.as_posix()} (the path under root); "
            "every image needs a group"
        )
    if "group" in match.groupdict():
        return match["group"]
    return match.group(1) if match.groups() else match.group(0)


def sequence_groups(records: list[Record], root: Path, gap: int, where: str) -> list[str]:
    """`group_by: sequence[:N]`: per folder and name prefix, frames sorted by their trailing
    number; a new clip starts where the number jumps by more than `gap`."""
    keyed = []
    for k, r in enumerate(records):
        match = _TRAILING_NUMBER.match(r.image.stem)
        if match is None:
            raise UserError(
                f"{where}: group_by sequence: {r.image.name} has no trailing frame number"
            )
        folder = r.image.parent.as_posix()
        keyed.append(((folder, match["prefix"]), int(match["number"]), k))
    out = [""] * len(records)
    last: dict[tuple, tuple[int, str]] = {}
    for series, number, k in sorted(keyed):
        previous = last.get(series)
        if previous is None or number - previous[0] > gap:
            folder = Path(series[0])
            rel = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else folder
            previous = (number, f"{rel}/{series[1]}{number}")
        last[series] = (number, previous[1])
        out[k] = previous[1]
    return out


def apply_group_by(
    index: DatasetIndex, root: str | Path, rule: str, where: str = "dataset"
) -> DatasetIndex:
    """Set every record's group by a `group_by` rule (video frames keep their clip's group)."""
    root = Path(root)
    still = [r for r in index.records if r.frame < 0]
    if rule.partition(":")[0] == "sequence":
        gap = int(rule.partition(":")[2] or 1)
        groups = dict(zip(map(id, still), sequence_groups(still, root, gap, where), strict=True))
    else:
        groups = {id(r): group_of(r, root, rule, where) for r in still}
    index.records = [
        replace(r, group=f"{rule}:{groups[id(r)]}") if r.frame < 0 else r for r in index.records
    ]
    index.group_rules += (f"group_by: {rule}",)
    return index


def check_index_sizes(index: DatasetIndex) -> None:
    """Every image opens and every mask has its image's size (file headers only)."""
    for r in index.records:
        if r.masks and r.frame < 0:
            try:
                check_sizes(r.image, r.masks)
            except (OSError, Image.DecompressionBombError) as err:  # PIL: not an image
                raise UserError(f"unreadable image or mask of {r.image}: {err}") from None


def check_unique_ids(index: DatasetIndex) -> None:
    """One id per image: `002.png` beside `002.jpg` would be one id twice in a split."""
    seen: dict[str, Path] = {}
    for r in index.records:
        if r.frame < 0 and r.id in seen and seen[r.id] != r.image:
            raise UserError(
                f"{r.image}: same name as {seen[r.id].name} (id {r.id!r}); rename or remove one"
            )
        seen.setdefault(r.id, r.image)


def two_valued(values: np.ndarray, k: int = 2) -> float:
    """Share of the pixels holding the k most frequent values (a mask: about 1)."""
    counts = np.bincount(values.ravel(), minlength=256)
    return float(np.sort(counts)[-k:].sum() / max(values.size, 1))


SWAP_SAMPLE = 16
"""Images (and masks) read to tell masks from images: evenly spaced over the dataset."""


def check_not_swapped(index: DatasetIndex, mask_values: dict[Path, float]) -> None:
    """Masks are more nearly k-valued than their images (k = classes); swapped `images:` and
    `masks:` folders are refused, naming both."""
    records = [r for r in index.records if r.masks and r.frame < 0]
    if not records:
        return
    picked = [records[k] for k in spread(len(records), SWAP_SAMPLE)]
    k = index.num_classes
    images = np.median([two_valued(_grey(r.image), k) for r in picked])
    masks = np.median([mask_values[r.masks[0]] for r in picked])
    if masks < images:
        raise UserError(
            f"{index.name}: the masks (e.g. {picked[0].masks[0]}) look less like masks than the "
            f"images (e.g. {picked[0].image}): {100 * masks:.0f}% of mask pixels against "
            f"{100 * images:.0f}% of image pixels hold {k} values; are images: and masks: swapped?"
        )


def mask_report(index: DatasetIndex) -> tuple[dict, dict[str, bool]]:
    """Every mask file read as training reads it (an outline it cannot fill, an unreadable
    file or swapped folders: a UserError naming the file, while indexing): the report of
    the audit (files that are not two-valued, e.g. JPEG, the foreground they would gain if
    binarised at > 0 instead of > threshold, outline annotations) and which images have an
    empty mask. Cached, keyed by the mask files' paths, sizes and times (segmentation only)."""
    if index.task_type != "seg":
        return {}, {}
    stamp = [(r.id, [file_stamp(m) for m in r.masks]) for r in index.records]
    key = [2, index.num_classes, index.mask_threshold, index.outline, stamp]
    cached = cache_dir() / f"masks-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20]}.json"
    if cached.is_file():
        with contextlib.suppress(ValueError, OSError):
            report, empty = json.loads(cached.read_text())
            return report, empty
    report, empty = _mask_report(index)
    with contextlib.suppress(OSError, UserError):  # a read-only cache only costs time
        write_json(cached, [report, empty])
    return report, empty


def _mask_report(index: DatasetIndex) -> tuple[dict, dict[str, bool]]:
    threshold, binary = index.mask_threshold, index.num_classes == 2
    not_binary, growth, outlines, empty, values_of = [], [], [], {}, {}
    for r in index.records:
        fg = 0
        for path in r.masks:
            try:
                values = read_mask_values(path)
            except (OSError, Image.DecompressionBombError) as err:
                raise UserError(f"{path}: unreadable mask ({err})") from None
            values_of[path] = two_valued(values, index.num_classes)
            read_mask_file(path, binary, threshold, index.outline)  # refuses what it cannot use
            if not binary:
                fg += int(np.count_nonzero(values))
                continue
            mask = binarise(values, threshold)
            fg += int(mask.sum())
            if not is_binary_file(values):
                not_binary.append(str(path))
                if mask.sum():
                    growth.append(float((values > 0).sum() / mask.sum() - 1))
            if is_outline(mask):
                outlines.append(str(path))
        empty[r.id] = fg == 0 and not r.polygons
    check_not_swapped(index, values_of)
    if not binary:
        return {"files": sum(len(r.masks) for r in index.records), "classes": index.num_classes}, {}
    report = {
        "threshold": threshold,
        "rule": f"foreground = value > {threshold} (index masks 0/1: value 1)",
        "files": sum(len(r.masks) for r in index.records),
        "not_binary": len(not_binary),
        "not_binary_examples": not_binary[:10],
        "median_growth_at_zero": float(np.median(growth)) if growth else 0.0,
        "outlines": len(outlines),
        "outline_policy": index.outline,
        "outline_examples": outlines[:10],
    }
    return report, empty


# --------------------------------------------------------------------------- formats

DATASET_FORMATS.register(
    "busi",
    DatasetFormat(
        lambda spec, name: load_busi(spec.root, spec.task_type),
        ("seg", "cls"),
        "BUSI's layout: CLASS/NAME.png + NAME_mask.png",
    ),
)
DATASET_FORMATS.register(
    "ddti",
    DatasetFormat(
        lambda spec, name: load_ddti(spec.root),
        ("seg",),
        "DDTI: image/ + mask/, or CASE_K.jpg + CASE.xml",
    ),
)
DATASET_FORMATS.register(
    "seg_folder",
    DatasetFormat(
        lambda spec, name: load_seg_folder(
            spec.root, spec.images, spec.masks, spec.classes, name, spec.folders
        ),
        ("seg",),
        "images/ + masks/, or masks beside their images",
    ),
)
DATASET_FORMATS.register(
    "cls_folder",
    DatasetFormat(
        lambda spec, name: load_cls_folder(spec.root, name, spec.frames_per_video),
        ("cls",),
        "one sub-folder of images or videos per class",
    ),
)


def check_dataset(spec: DatasetSpec | dict, name: str | None = None) -> DatasetSpec:
    """A dataset spec (or its mapping) checked, as `config.checked` checks a spec (an unknown key
    with its close match, every value by its type), its task type one its format holds, its
    `group_by` a known rule and `folders` / `split: folders` consistent; a UserError line
    starting `datasets.NAME:` otherwise."""
    where = f"datasets.{name}" if name else "dataset"
    values = to_dict(spec) if isinstance(spec, DatasetSpec) else spec
    folders = None
    if isinstance(values, dict) and values.get("folders"):  # checked one by one below
        values, folders = {**values, "folders": None}, values["folders"]
    spec = checked(DatasetSpec, values, where)
    if folders:
        if not isinstance(folders, list):
            raise UserError(f"{where}: folders: expected a list of {{images, masks, split}}")
        spec.folders = [
            checked(
                FolderPair, to_dict(f) if isinstance(f, FolderPair) else f, f"{where}.folders[{k}]"
            )
            for k, f in enumerate(folders)
        ]
    layout = DATASET_FORMATS.get(spec.format, f"{where}: format")
    if spec.task_type not in layout.task_types:
        raise UserError(
            f"{where}: format {spec.format} holds {' or '.join(layout.task_types)} tasks, not "
            f"task_type {spec.task_type}"
        )
    if spec.group_by:
        check_group_by(spec.group_by, where)
    if spec.folders and spec.format != "seg_folder":
        raise UserError(f"{where}: folders: only the seg_folder format reads several folders")
    if spec.split == "folders":
        missing = [f.images for f in spec.folders or [] if f.split is None]
        if not spec.folders or missing:
            raise UserError(
                f"{where}: split: folders keeps a release's split: list `folders` with a "
                f"`split` (train, val or test) each{f' (none for {missing[0]})' if missing else ''}"
            )
    return spec


def load_dataset(spec: DatasetSpec | dict, name: str | None = None) -> DatasetIndex:
    """The index of a dataset, checked as training will use it: its format's loader
    (`DATASET_FORMATS`), its groups (`group_by`, `groups_csv`), one id per image, every image
    and mask opened (sizes, masks readable and fillable, not swapped with their images) and
    every class found; a UserError line naming the file otherwise. The audit and the suite
    both index before their first write."""
    where = f"datasets.{name}" if name else "dataset"
    spec = check_dataset(spec, name)
    index = DATASET_FORMATS.get(spec.format).load(spec, name)
    if name:
        index.name = name
    index.mask_threshold, index.outline = spec.mask_threshold, spec.outline
    if spec.split == "grouped":  # the release's split is kept only when asked for
        index.records = [replace(r, split=None) for r in index.records]
    check_unique_ids(index)
    if spec.group_by:
        apply_group_by(index, spec.root, spec.group_by, where)
    if spec.groups_csv:
        load_groups_csv(index, spec.groups_csv)
    _check_found(index, spec)
    check_index_sizes(index)
    mask_report(index)
    return index


def _check_found(index: DatasetIndex, spec: DatasetSpec) -> None:
    """Every class has images (a dataset laid out in nested folders finds none)."""
    counts = {c: 0 for c in index.classes} if index.task_type == "cls" else {}
    for r in index.records:
        if index.task_type == "cls":
            counts[index.classes[r.label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if not index.records or empty:
        where = f" (class folders without images: {', '.join(empty)})" if empty else ""
        raise UserError(
            f"{spec.root}: no images found for dataset {index.name}{where}; images are read "
            f"directly inside the {spec.format} layout's folders, not in folders nested below them"
        )


def builtin_datasets(data_root: str | Path) -> dict[str, DatasetSpec]:
    """The paper's three tasks under a data root laid out like ../shared/data."""
    root = Path(data_root)
    return {
        "ddti_seg": DatasetSpec("ddti", str(root / "ddti"), "seg"),
        "busi_seg": DatasetSpec("busi", str(root / "busi"), "seg"),
        "busi_cls": DatasetSpec("busi", str(root / "busi"), "cls"),
    }


# --------------------------------------------------------------------------- torch datasets


class SegDataset(Dataset):
    """(image float (1, S, S) in [0, 1], mask long (S, S)). Decoded once, kept in memory at
    the target size: the sets are small and decoding PNGs every epoch dominates CPU runs.
    `original_mask(i)` is the full-resolution mask (metrics at the original resolution)."""

    def __init__(
        self,
        records: list[Record],
        size: int,
        binary: bool = True,
        hflip: bool = False,
        threshold: int = MASK_THRESHOLD,
        outline: Outline = "fill",
    ):
        self.records, self.size, self.binary, self.hflip = records, size, binary, hflip
        self.threshold, self.outline = threshold, outline
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._full: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, index: DatasetIndex, records: list[Record], size: int, hflip: bool = False):
        binary = index.num_classes == 2
        return cls(records, size, binary, hflip, index.mask_threshold, index.outline)

    def __len__(self) -> int:
        return len(self.records)

    def original_mask(self, i: int) -> np.ndarray:
        if i not in self._full:
            r = self.records[i]
            with Image.open(r.image) as im:
                shape = (im.height, im.width)
            self._full[i] = load_mask(r, shape, self.binary, self.threshold, self.outline)
        return self._full[i]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            r = self.records[i]
            image = _grey(r.image)
            mask = load_mask(r, image.shape, self.binary, self.threshold, self.outline)
            self._cache[i] = (resize_square(image, self.size), resize_mask(mask, self.size))
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        x = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
        y = torch.from_numpy(mask.astype(np.int64))
        if self.hflip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


class ClsDataset(Dataset):
    """(image float (1, S, S) in [0, 1], label long); video frames are decoded once per clip."""

    def __init__(self, records: list[Record], size: int, hflip: bool = False):
        if any(r.label is None for r in records):
            raise ValueError("classification records need labels")
        self.records, self.size, self.hflip = records, size, hflip
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _fill(self, i: int) -> None:
        r = self.records[i]
        if r.frame < 0:
            self._cache[i] = resize_square(_grey(r.image), self.size)
            return
        same = [k for k, o in enumerate(self.records) if o.image == r.image and o.frame >= 0]
        same.sort(key=lambda k: self.records[k].frame)
        for k, grey in zip(same, read_records([self.records[k] for k in same]), strict=True):
            self._cache[k] = resize_square(grey, self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            self._fill(i)
        x = torch.from_numpy(self._cache[i].astype(np.float32) / 255.0)[None]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(self.records[i].label, dtype=torch.long)
