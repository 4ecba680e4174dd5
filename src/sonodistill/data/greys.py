"""The one image path: any image or video frame -> 8-bit grey -> a square of the model's size.

Distillation (`images.ImageFiles`, `pack`), evaluation (`evaluate.datasets`), embedding and
export (`listing.load_frames`) all read and resize through these functions, so a model sees the
same pixels in training, evaluation and deployment:
- grey: the corpus reader (`readers.read_image`; 16-bit images scaled to 8 bits) and
  `frames.to_grey` (OpenCV's BT.601 luma for colour frames, within one grey level of PIL's "L");
- resize: a plain resize to size x size (no crop, no letterbox: the aspect ratio is not kept),
  OpenCV area interpolation when shrinking (averages speckle, no aliasing), bilinear when
  enlarging; masks nearest-neighbour.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from sonodistill.data.frames import to_grey
from sonodistill.data.readers import ReadError, read_image, read_video


def resize_square(grey: np.ndarray, size: int) -> np.ndarray:
    """A grey uint8 frame resized to size x size (area when shrinking, bilinear otherwise)."""
    h, w = grey.shape[:2]
    if (h, w) == (size, size):
        return np.array(grey)  # a writable copy, like cv2.resize's result
    interp = cv2.INTER_AREA if h > size or w > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(grey), (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """A label map resized nearest-neighbour to size x size, or to (height, width)."""
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape[:2] == (h, w):
        return mask
    return cv2.resize(np.ascontiguousarray(mask), (w, h), interpolation=cv2.INTER_NEAREST)


def read_grey(path: str | Path, frame: int = -1) -> np.ndarray:
    """8-bit grey (H, W) of an image file (its first page), or of frame `frame` of a video."""
    path = Path(path)
    try:
        if frame < 0:
            _, array = next(read_image(path))
            return to_grey(array)
        for index, rgb in read_video(path):
            if index == frame:
                return to_grey(rgb)
    except StopIteration:
        pass
    except ReadError as err:
        raise ReadError(f"{path}: {err}") from err
    raise ReadError(f"{path}: no frame {max(frame, 0)}")


def read_greys(items: Sequence[tuple[str | Path, int]]) -> Iterator[np.ndarray]:
    """Grey frames of (file, frame) items in order (frame -1: a still image); each video is
    decoded once per run of consecutive items from it."""
    i = 0
    while i < len(items):
        path, frame = items[i]
        if frame < 0:
            yield read_grey(path)
            i += 1
            continue
        j = i
        while j < len(items) and items[j][0] == path and items[j][1] >= 0:
            j += 1
        wanted = {items[k][1] for k in range(i, j)}
        got: dict[int, np.ndarray] = {}
        for index, rgb in read_video(Path(path)):
            if index in wanted:
                got[index] = to_grey(rgb)
            if index >= max(wanted):
                break
        for k in range(i, j):
            if items[k][1] not in got:
                raise ReadError(f"{path}: frame {items[k][1]} could not be decoded")
            yield got[items[k][1]]
        i = j
