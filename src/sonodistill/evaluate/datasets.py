"""Downstream datasets: BUSI, DDTI (TN-SCUI and original XML layouts) and generic folders.

A loader returns a `DatasetIndex` (records: image path, mask paths or polygons, label, group);
`SegDataset` / `ClsDataset` turn records into tensors: a float grey image (1, H, W) in [0, 1]
and a long mask (H, W) of class indices or a long label.
"""

from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from sonodistill.data.masks import mask_owner, masks_by_image, merge_masks
from sonodistill.data.readers import IMAGE_EXT
from sonodistill.errors import UserError

BUSI_CLASSES = ("normal", "benign", "malignant")
TaskType = Literal["seg", "cls"]
"""What a task predicts: a segmentation mask or a class label (a task's *name* is its key in a
suite, e.g. busi_seg)."""


@dataclass(frozen=True)
class Record:
    """One image and its annotation: mask files (merged), polygons (rasterised) or a label."""

    id: str
    image: Path
    masks: tuple[Path, ...] = ()
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()
    label: int | None = None
    group: str | None = None


@dataclass
class DatasetIndex:
    name: str
    task_type: TaskType
    records: list[Record]
    classes: tuple[str, ...] = ("background", "foreground")
    """Class names: mask values (seg, index 0 = background) or labels (cls)."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, ids: list[str]) -> list[Record]:
        by_id = {r.id: r for r in self.records}
        return [by_id[i] for i in ids]


@dataclass
class DatasetSpec:
    """A dataset in a suite file: built-in (busi, ddti) or a user's folder layout."""

    format: Literal["busi", "ddti", "seg_folder", "cls_folder"] = "seg_folder"
    """The folder layout: busi, ddti (their published layouts), seg_folder (images/ + masks/),
    cls_folder (one sub-folder per class)."""
    root: str = ""
    task_type: TaskType = "seg"
    """seg or cls (BUSI has both)."""
    classes: list[str] | None = None
    """seg_folder: class names by mask value (default binary: any non-zero is foreground)."""
    groups_csv: str | None = None
    """Optional CSV with columns `id,group` (e.g. patient): a group never spans two splits."""
    images: str = "images"
    masks: str = "masks"


# --------------------------------------------------------------------------- reading pixels


def read_grey(path: Path) -> np.ndarray:
    """8-bit grey (H, W). Colour frames (burned-in marks) are converted with PIL's luma."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: unreadable image ({err}); replace or remove it") from err


def rasterise(polygons, size: tuple[int, int]) -> np.ndarray:
    """Filled polygons (x, y in pixels) -> uint8 {0, 1} mask of size (W, H)."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 3:
            draw.polygon([tuple(p) for p in poly], fill=1, outline=1)
    return np.asarray(canvas)


def load_mask(record: Record, shape: tuple[int, int], binary: bool = True) -> np.ndarray:
    """All masks of a record merged (union for binary, max for class indices)."""
    mask = merge_masks(record.masks, shape, binary)
    if record.polygons:
        mask = np.maximum(mask, rasterise(record.polygons, (shape[1], shape[0])))
    return mask


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
        files = _images(folder)
        masks = masks_by_image(files)
        images = [p for p in files if mask_owner(p) is None]
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


def load_ddti(root: str | Path) -> DatasetIndex:
    """DDTI as `image/N.PNG` + `mask/N.PNG` (TN-SCUI 2020) or the original release
    (`CASE_K.jpg` + `CASE.xml` with nodule polygons; the case number is the patient group)."""
    root = Path(root)
    if (root / "image").is_dir() and (root / "mask").is_dir():
        masks = masks_by_image((root / "mask").iterdir(), named_only=False)
        records = []
        for p in sorted(_images(root / "image"), key=lambda p: _natural_key(p.stem)):
            if p.stem not in masks:
                raise FileNotFoundError(f"{p}: no mask in {root / 'mask'}")
            records.append(Record(id=p.stem, image=p, masks=tuple(masks[p.stem])))
        return DatasetIndex("ddti_seg", "seg", records, ("background", "nodule"))
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
    return DatasetIndex("ddti_seg", "seg", records, ("background", "nodule"))


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


def load_seg_folder(
    root: str | Path,
    images: str = "images",
    masks: str = "masks",
    classes: list[str] | None = None,
    name: str | None = None,
) -> DatasetIndex:
    """`images/NAME.*` + `masks/NAME.*` (same stem). Binary unless `classes` (by mask value)."""
    root = Path(root)
    found = masks_by_image((root / masks).iterdir(), named_only=False)
    records = []
    for p in _images(root / images):
        if p.stem not in found:
            raise FileNotFoundError(f"{p}: no mask named {p.stem}.* in {root / masks}")
        records.append(Record(id=p.stem, image=p, masks=tuple(found[p.stem])))
    return DatasetIndex(
        name or root.name,
        "seg",
        records,
        tuple(classes) if classes else ("background", "foreground"),
    )


def load_cls_folder(root: str | Path, name: str | None = None) -> DatasetIndex:
    """One sub-folder per class (sorted names = label order), images inside."""
    root = Path(root)
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise UserError(f"{root}: need at least two class folders (one per class name)")
    records = [
        Record(id=f"{cls}/{p.stem}", image=p, label=label)
        for label, cls in enumerate(classes)
        for p in _images(root / cls)
    ]
    return DatasetIndex(name or root.name, "cls", records, classes)


def load_groups_csv(index: DatasetIndex, path: str | Path) -> DatasetIndex:
    """Attach `group` (patient) ids from a CSV with columns id,group."""
    with open(path, newline="") as fh:
        groups = {row["id"]: row["group"] for row in csv.DictReader(fh)}
    index.records = [
        Record(**{**r.__dict__, "group": groups.get(r.id, r.group)}) for r in index.records
    ]
    return index


def load_dataset(spec: DatasetSpec, name: str | None = None) -> DatasetIndex:
    if spec.format == "busi":
        index = load_busi(spec.root, spec.task_type)
    elif spec.format == "ddti":
        index = load_ddti(spec.root)
    elif spec.format == "seg_folder":
        index = load_seg_folder(spec.root, spec.images, spec.masks, spec.classes, name)
    elif spec.format == "cls_folder":
        index = load_cls_folder(spec.root, name)
    else:
        raise UserError(f"dataset {name}: unknown format {spec.format!r}")
    if name:
        index.name = name
    _check_found(index, spec)
    return load_groups_csv(index, spec.groups_csv) if spec.groups_csv else index


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


def _resize(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((size, size), resample))


class SegDataset(Dataset):
    """(image float (1, S, S) in [0, 1], mask long (S, S)). Decoded once, kept in memory at
    the target size: the sets are small and decoding PNGs every epoch dominates CPU runs."""

    def __init__(self, records: list[Record], size: int, binary: bool = True, hflip: bool = False):
        self.records, self.size, self.binary, self.hflip = records, size, binary, hflip
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            r = self.records[i]
            image = read_grey(r.image)
            mask = load_mask(r, image.shape, self.binary)
            self._cache[i] = (_resize(image, self.size, False), _resize(mask, self.size, True))
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        x = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
        y = torch.from_numpy(mask.astype(np.int64))
        if self.hflip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


class ClsDataset(Dataset):
    """(image float (1, S, S) in [0, 1], label long)."""

    def __init__(self, records: list[Record], size: int, hflip: bool = False):
        if any(r.label is None for r in records):
            raise ValueError("classification records need labels")
        self.records, self.size, self.hflip = records, size, hflip
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            self._cache[i] = _resize(read_grey(self.records[i].image), self.size, False)
        x = torch.from_numpy(self._cache[i].astype(np.float32) / 255.0)[None]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(self.records[i].label, dtype=torch.long)
