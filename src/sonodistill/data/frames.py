"""Frame cleaning and selection: B-mode checks, blank/low-information frames, coloured marks,
field-of-view crop, and the near-duplicate filter of a clip.

`FrameSettings` (in the light `data.config`) holds every threshold; `FrameSelector` applies them
to the frames of one file in order and says, for each frame, either "keep" (with the cleaned grey
frame) or why it is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from sonodistill.data import hashing
from sonodistill.data.config import FrameSettings

# Drop reasons (the manifest's `reason` column; "" for kept frames).
COLOUR = "colour"  # colour-dominated: Doppler, elastography or a colour UI
BLANK = "blank"
LOW_INFO = "low_information"
TOO_SMALL = "too_small"
NEAR_DUP = "near_duplicate"  # of a kept frame of the same file
CLIP_CAP = "clip_cap"
SUBSAMPLED = "subsampled"  # skipped by frame_step
CORPUS_DUP = "corpus_duplicate"  # exact or near copy of a kept frame of another file
UNREADABLE = "unreadable"  # the file (row with frame -1) or the rest of it
TRUNCATED = "truncated"  # the file ends before its declared frames (row with frame -1)
EXCLUDED = "excluded"  # matches an evaluation set (reason "excluded:NAME")


def _channel_range(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = cv2.max(cv2.max(r, g), b)
    return hi, cv2.subtract(hi, cv2.min(cv2.min(r, g), b))


def colour_mask(rgb: np.ndarray, saturation: int) -> np.ndarray:
    """Pixels whose channels differ by more than `saturation` grey levels."""
    return _channel_range(rgb)[1] > saturation


def colour_fraction(rgb: np.ndarray, saturation: int = 40) -> float:
    """Share of the non-dark pixels (max channel > 20) that are coloured (0 for grey)."""
    if rgb.ndim != 3:
        return 0.0
    hi, spread = _channel_range(rgb)
    lit = hi > 20
    n = cv2.countNonZero(lit.view(np.uint8))
    return cv2.countNonZero((lit & (spread > saturation)).view(np.uint8)) / n if n else 0.0


def to_grey(frame: np.ndarray, remove_marks: bool = False, saturation: int = 40) -> np.ndarray:
    """Grey uint8; with `remove_marks`, coloured pixels (calipers, arrows, text) are inpainted
    from their surroundings instead of leaving grey ghosts."""
    if frame.ndim == 2:
        return frame
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    if remove_marks:
        mask = colour_mask(frame, saturation)
        if mask.any():
            mask = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
            grey = cv2.inpaint(grey, mask, 3, cv2.INPAINT_TELEA)
    return grey


def entropy(grey: np.ndarray) -> float:
    """Shannon entropy (bits) of the grey-level histogram."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / grey.size
    return float(-(p * np.log2(p)).sum())


def fov_box(grey: np.ndarray, level: int = 8, min_area: float = 0.1) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the ultrasound field of view: the bounding box of the
    largest connected bright region after an opening that detaches text and thin marks. The whole
    frame when no region covers `min_area` of it."""
    h, w = grey.shape
    mask = (grey > level).astype(np.uint8)
    k = max(3, min(h, w) // 60) | 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return 0, h, 0, w
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, _ = stats[best]
    if bw * bh < min_area * h * w:
        return 0, h, 0, w
    return int(y), int(y + bh), int(x), int(x + bw)


def downsample(grey: np.ndarray, size: int = 32) -> np.ndarray:
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)


@dataclass
class Decision:
    keep: bool
    reason: str = ""
    grey: np.ndarray | None = None  # the cleaned frame (kept frames)
    phash: str = ""
    sha1: str = ""
    orig_shape: tuple[int, int] = (0, 0)


class FrameSelector:
    """Frame-by-frame decisions for one file (a clip, a sequence, a volume or an image)."""

    def __init__(self, settings: FrameSettings) -> None:
        self.s = settings
        self.kept_bits: list[np.ndarray] = []
        self.kept_small: list[np.ndarray] = []
        self.seen = 0

    def __call__(self, index: int, frame: np.ndarray) -> Decision:
        s = self.s
        self.seen += 1
        shape = tuple(frame.shape[:2])
        if index % s.frame_step:
            return Decision(False, SUBSAMPLED, orig_shape=shape)
        if frame.ndim == 3 and colour_fraction(frame, s.colour_saturation) > s.max_colour:
            return Decision(False, COLOUR, orig_shape=shape)
        grey = to_grey(frame, s.remove_marks, s.colour_saturation)
        if s.crop_fov:
            top, bottom, left, right = fov_box(grey)
            grey = np.ascontiguousarray(grey[top:bottom, left:right])
        if min(grey.shape) < s.min_size:
            return Decision(False, TOO_SMALL, orig_shape=shape)
        if grey.std() < s.blank_std or (grey > 16).mean() < s.min_content:
            return Decision(False, BLANK, orig_shape=shape)
        if entropy(grey) < s.min_entropy:
            return Decision(False, LOW_INFO, orig_shape=shape)
        ph = hashing.phash(grey)
        if s.dup_method == "phash":
            bits = hashing.hex_to_bits([ph])[0]
            if (
                self.kept_bits
                and (np.stack(self.kept_bits) != bits).sum(1).min() <= s.dup_threshold
            ):
                return Decision(False, NEAR_DUP, orig_shape=shape, phash=ph)
        else:
            bits = downsample(grey)
            if (
                self.kept_small
                and min(float(np.abs(bits - k).mean()) for k in self.kept_small) <= s.dup_threshold
            ):
                return Decision(False, NEAR_DUP, orig_shape=shape, phash=ph)
        if s.max_per_clip and len(self.kept_bits) + len(self.kept_small) >= s.max_per_clip:
            return Decision(False, CLIP_CAP, orig_shape=shape, phash=ph)
        (self.kept_bits if s.dup_method == "phash" else self.kept_small).append(bits)
        return Decision(True, "", grey, ph, hashing.pixel_sha1(grey), shape)
