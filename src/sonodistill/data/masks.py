"""Where an image's segmentation masks are, and how a mask file is read: the one place that
knows the layouts (BUSI `X.png` + `X_mask.png`, `X_mask_1.png` beside it; DDTI/TN-SCUI
`image/N.PNG` + `mask/N.PNG`; a user's `images/` + `masks/` with the same stem or `X_mask`).

Used by the evaluation loaders, the frame listing (masks are not frames) and `export`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from sonodistill.data.readers import IMAGE_EXT

MASK_DIRS = ("mask", "masks", "label", "labels", "annotations")
IMAGE_DIRS = ("image", "images")
_MASK_STEM = re.compile(r"^(?P<owner>.+?)_mask(_\d+)?$", re.IGNORECASE)


def mask_owner(path: str | Path) -> str | None:
    """The stem of the image a mask belongs to by its name (`X_mask`, `X_mask_2` -> X)."""
    match = _MASK_STEM.match(Path(path).stem)
    return match["owner"] if match else None


def is_mask(path: str | Path) -> bool:
    """A mask by its name, or any file in a mask folder (`mask/`, `masks/`, `labels/`, ...)."""
    path = Path(path)
    return mask_owner(path) is not None or path.parent.name.lower() in MASK_DIRS


def masks_by_image(files: Iterable[Path], named_only: bool = True) -> dict[str, list[Path]]:
    """{image stem: its mask files, sorted} for the image files of one folder. `named_only`
    false: a file without the `_mask` suffix is the mask of the image with its stem (the layout
    of a separate masks folder)."""
    found: dict[str, list[Path]] = {}
    for f in files:
        if f.suffix.lower() not in IMAGE_EXT:
            continue
        owner = mask_owner(f) or (None if named_only else f.stem)
        if owner is not None:
            found.setdefault(owner, []).append(f)
    return {k: sorted(v) for k, v in found.items()}


def mask_files(image: str | Path) -> list[Path]:
    """Masks of an image: `X_mask*.EXT` beside it, else the same name in a `mask/` or `masks/`
    folder next to its `image/` or `images/` folder."""
    image = Path(image)
    beside = masks_by_image(image.parent.iterdir()).get(image.stem, [])
    if beside or image.parent.name.lower() not in IMAGE_DIRS:
        return beside
    for name in ("mask", "masks"):
        folder = image.parent.parent / name
        if folder.is_dir():
            return masks_by_image(folder.iterdir(), named_only=False).get(image.stem, [])
    return []


def read_mask_file(path: str | Path, binary: bool = True) -> np.ndarray:
    """A mask in any PIL mode -> uint8 (H, W): {0, 1} when binary, else the pixel values.

    1-bit, grey and RGB masks: the brightest channel; RGBA: the colour channels, or the alpha
    channel when the colour is constant (masks drawn as transparency).
    """
    with Image.open(path) as im:
        if im.mode == "1":
            arr = np.asarray(im.convert("L"))
        elif im.mode in ("RGB", "RGBA", "LA", "P"):
            rgba = np.asarray(im.convert("RGBA"))
            arr = rgba[..., :3].max(axis=-1)
            if im.mode in ("RGBA", "LA") and arr.min() == arr.max():
                arr = rgba[..., 3]
        else:
            arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: mask must be a single plane, got shape {arr.shape}")
    return (arr > 0).astype(np.uint8) if binary else arr.astype(np.uint8)


def merge_masks(
    files: Iterable[Path], shape: tuple[int, int] | None = None, binary: bool = True
) -> np.ndarray:
    """Mask files merged (union for binary, max for class indices) into one (H, W) uint8 map
    of `shape` (default: the first file's); a file of another size is an error naming it."""
    mask = None if shape is None else np.zeros(shape, np.uint8)
    for path in files:
        m = read_mask_file(path, binary)
        if mask is None:
            mask = np.zeros_like(m)
        if m.shape != mask.shape:
            raise ValueError(f"{path}: mask {m.shape} does not match image {mask.shape}")
        mask = np.maximum(mask, m)
    if mask is None:
        raise ValueError("no mask file to merge and no shape given")
    return mask


def image_mask(image: str | Path, size: int | None = None) -> np.ndarray:
    """The union of an image's masks (`mask_files`) as {0, 1} uint8, resized (nearest) to
    size x size when given; FileNotFoundError when the image has none."""
    files = mask_files(image)
    if not files:
        raise FileNotFoundError(f"no mask found for {image}")
    mask = merge_masks(files)
    if size is None:
        return mask
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
