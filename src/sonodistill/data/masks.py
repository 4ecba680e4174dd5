"""Segmentation masks: where an image's masks are, how a mask file is read, and what is refused.

Pairing rules (the one place that knows them; loaders, the frame listing and `export` use it):
1. A separate folder by stem: `images/NAME.png` + `masks/NAME.png` (also `image/`+`mask/`,
   `labels/`, `annotations/`; DDTI/TN-SCUI's layout). A file there may carry a mask suffix too
   (`masks/NAME_mask.png`).
2. One folder, the mask named after its image with a suffix: `NAME_mask.png`,
   `NAME_Annotation.png`, `NAME_seg.png`, `NAME_label.png`, `NAME_gt.png` (any case, `_` or `-`),
   optionally numbered (`NAME_mask_1.png`: BUSI's second lesion). Several masks of one image
   are merged. A file with a mask suffix is never taken as an image.

Reading (`read_mask_file`): the brightest channel of 1-bit, grey, RGB and palette files (RGBA:
the alpha channel when the colour is constant). Binary masks: foreground = value > `threshold`
(default 127: lossy JPEG masks carry ringing around their edges, and `> 0` grows thyroid masks
by a median 13.5%); a mask whose values are only 0 and 1 (an index mask) is foreground where 1.

Outline-only annotations (a closed contour drawn around the object, e.g. HC18's head
circumferences) are detected (`is_outline`: filling the holes more than doubles the area) and
filled, or refused when `outline="refuse"`; an open thin contour cannot be filled and is
refused. An image and its masks of different sizes are an error found while indexing
(`check_sizes`), before any training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sonodistill.data.config import MASK_THRESHOLD, Outline
from sonodistill.data.greys import resize_mask
from sonodistill.data.readers import IMAGE_EXT
from sonodistill.errors import UserError

MASK_DIRS = ("mask", "masks", "label", "labels", "annotations")
IMAGE_DIRS = ("image", "images")
MASK_SUFFIXES = ("mask", "annotation", "seg", "label", "gt")
_MASK_STEM = re.compile(
    rf"^(?P<owner>.+?)[_-](?:{'|'.join(MASK_SUFFIXES)})(?:[_-]?\d+)?$", re.IGNORECASE
)


class MaskError(UserError):
    """A mask that cannot be used as it is (the message names the file and what to do)."""


def mask_owner(path: str | Path) -> str | None:
    """The stem of the image a mask belongs to by its name (`X_mask`, `X_Annotation_2` -> X)."""
    match = _MASK_STEM.match(Path(path).stem)
    return match["owner"] if match else None


def is_mask(path: str | Path) -> bool:
    """A mask by its name, or any file in a mask folder (`mask/`, `masks/`, `labels/`, ...)."""
    path = Path(path)
    return mask_owner(path) is not None or path.parent.name.lower() in MASK_DIRS


def masks_by_image(files: Iterable[Path], named_only: bool = True) -> dict[str, list[Path]]:
    """{image stem: its mask files, sorted} for the files of one folder. `named_only` false:
    a file without a mask suffix is the mask of the image with its stem (the layout of a
    separate masks folder)."""
    found: dict[str, list[Path]] = {}
    for f in files:
        if f.suffix.lower() not in IMAGE_EXT:
            continue
        owner = mask_owner(f) or (None if named_only else f.stem)
        if owner is not None:
            found.setdefault(owner, []).append(f)
    return {k: sorted(v) for k, v in found.items()}


def images_and_masks(folder: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """Rule 2: the images of one folder (mask-suffixed files excluded) and their masks."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)
    return [p for p in files if mask_owner(p) is None], masks_by_image(files)


def mask_files(image: str | Path) -> list[Path]:
    """Masks of an image: suffixed masks beside it (rule 2), else the same stem in a mask
    folder next to its `image/` or `images/` folder (rule 1)."""
    image = Path(image)
    beside = masks_by_image(image.parent.iterdir()).get(image.stem, [])
    if beside or image.parent.name.lower() not in IMAGE_DIRS:
        return beside
    for name in MASK_DIRS:
        folder = image.parent.parent / name
        if folder.is_dir():
            return masks_by_image(folder.iterdir(), named_only=False).get(image.stem, [])
    return []


def read_mask_values(path: str | Path) -> np.ndarray:
    """The pixel values of a mask file as uint8 (H, W), whatever its PIL mode."""
    with Image.open(path) as im:
        if im.mode == "1":
            arr = np.asarray(im.convert("L"))
        elif im.mode in ("RGB", "RGBA", "LA", "P"):
            rgba = np.asarray(im.convert("RGBA"))
            arr = rgba[..., :3].max(axis=-1)
            if im.mode in ("RGBA", "LA") and arr.min() == arr.max():
                arr = rgba[..., 3]
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(im)
            if values.max() > 255:
                raise MaskError(f"{path}: 16-bit mask values above 255 are not supported")
            arr = values
        else:
            arr = np.asarray(im)
    if arr.ndim != 2:
        raise MaskError(f"{path}: mask must be a single plane, got shape {arr.shape}")
    return arr.astype(np.uint8)


def binarise(values: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """{0, 1} foreground: value > threshold, or value > 0 for an index mask (max value 1)."""
    return (values > (0 if values.max(initial=0) <= 1 else threshold)).astype(np.uint8)


def is_binary_file(values: np.ndarray) -> bool:
    """Only two values, 0 and one other (what a lossless binary mask holds)."""
    return len(np.unique(values)) <= 2 and values.min(initial=0) == 0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region's holes filled (the outer contours drawn filled)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled | (mask > 0)


def is_outline(mask: np.ndarray, ratio: float = 2.0) -> bool:
    """A closed contour rather than a filled region: filling its holes multiplies the
    foreground area by at least `ratio`."""
    area = int(np.count_nonzero(mask))
    return area > 0 and int(np.count_nonzero(fill_holes(mask))) >= ratio * area


def is_open_contour(mask: np.ndarray, min_area: int = 200) -> bool:
    """A thin curve that encloses nothing: two 3x3 erosions remove more than 95% of a large
    foreground (a filled lesion keeps its interior)."""
    area = int(np.count_nonzero(mask))
    if area < min_area:
        return False
    core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
    return np.count_nonzero(core) < 0.05 * area and not is_outline(mask)


def read_mask_file(
    path: str | Path,
    binary: bool = True,
    threshold: int = MASK_THRESHOLD,
    outline: Outline = "fill",
) -> np.ndarray:
    """A mask file -> uint8 (H, W): {0, 1} when binary (outlines filled or refused), else the
    pixel values (class indices)."""
    values = read_mask_values(path)
    if not binary:
        return values
    mask = binarise(values, threshold)
    if is_outline(mask):
        if outline == "refuse":
            raise MaskError(
                f"{path}: the annotation is an outline, not a filled region "
                "(set the dataset's `outline: fill` to fill it)"
            )
        return fill_holes(mask)
    if is_open_contour(mask):
        raise MaskError(f"{path}: the annotation is a thin open contour; it cannot be filled")
    return mask


def merge_masks(
    files: Iterable[Path],
    shape: tuple[int, int] | None = None,
    binary: bool = True,
    threshold: int = MASK_THRESHOLD,
    outline: Outline = "fill",
) -> np.ndarray:
    """Mask files merged (union for binary, max for class indices) into one (H, W) uint8 map
    of `shape` (default: the first file's); a file of another size is an error naming it."""
    mask = None if shape is None else np.zeros(shape, np.uint8)
    for path in files:
        m = read_mask_file(path, binary, threshold, outline)
        if mask is None:
            mask = np.zeros_like(m)
        if m.shape != mask.shape:
            raise MaskError(f"{path}: mask {m.shape} does not match image {mask.shape}")
        mask = np.maximum(mask, m)
    if mask is None:
        raise ValueError("no mask file to merge and no shape given")
    return mask


def check_sizes(image: Path, masks: Iterable[Path]) -> None:
    """MaskError when a mask's size differs from its image's (file headers only: fast)."""
    with Image.open(image) as im:
        size = im.size
    for m in masks:
        with Image.open(m) as mi:
            if mi.size != size:
                raise MaskError(
                    f"{m}: mask is {mi.size[0]}x{mi.size[1]} but its image {image.name} is "
                    f"{size[0]}x{size[1]}"
                )


def image_mask(image: str | Path, size: int | None = None) -> np.ndarray:
    """The union of an image's masks (`mask_files`) as {0, 1} uint8, resized (nearest) to
    size x size when given; FileNotFoundError when the image has none."""
    files = mask_files(image)
    if not files:
        raise FileNotFoundError(f"no mask found for {image}")
    mask = merge_masks(files)
    if size is None:
        return mask
    return resize_mask(mask, size)
