"""Readers: one per kind of ultrasound file, each yielding `(index, frame)` lazily.

A frame is a uint8 array, HxW (grey) or HxWx3 (RGB). Readers stream: a video or a multi-frame
DICOM is decoded one frame at a time, a MetaImage sequence is read one slice at a time where the
format allows it, so a long clip never sits whole in memory.

Kinds, detected from the file's first bytes and then its extension (`detect_kind`):
- `image`: png, jpg, bmp, tif (Pillow; every page of a multi-page TIFF);
- `video`: mp4, avi, mov, mkv, webm (PyAV);
- `dicom`: single frame or multi-frame cine, any transfer syntax pydicom can decode with the
  pylibjpeg plugins (JPEG baseline/lossless, JPEG 2000, RLE), photometric interpretations
  MONOCHROME1/2, RGB, YBR_* (converted to RGB) and PALETTE COLOR (through its LUT);
- `nifti`: .nii, .nii.gz (nibabel; voxels in stored order, the affine is ignored);
- `itk`: .mha, .mhd, .nrrd, .nhdr (SimpleITK).

3D files are either a *sequence* (2D+t: frames along the last axis, handled like a video) or a
*volume* (exported as slices along a chosen axis); see `volume_layout`.

A file that cannot be read raises `ReadError`. A file that ends before the frames its header
declares (a cut download or copy: the data stops, a frame fails to decode) raises its subclass
`TruncatedFile` once the frames before the cut have been yielded, with the counts: videos,
DICOM, volumes and sequences alike, so that no caller takes part of a file for all of it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sonodistill.data.config import KINDS
from sonodistill.errors import user_error

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
DICOM_EXT = {".dcm", ".dicom", ".dic"}
ITK_EXT = {".mha", ".mhd", ".nrrd", ".nhdr"}
STREAM_BYTES = 256 * 2**20  # 3D files larger than this are read slice by slice when possible


@user_error
class ReadError(Exception):
    """A file that cannot be read as the kind it claims to be (the message names it and why)."""


class TruncatedFile(ReadError):
    """A file that ends before its declared frames: `decoded` frames were read (and yielded) of
    the `declared` ones (None: the header does not say; the decoder reported the cut)."""

    def __init__(self, path: str | Path, decoded: int, declared: int | None, cause: str):
        self.path, self.decoded, self.declared, self.cause = Path(path), decoded, declared, cause
        super().__init__(f"{self.path.name} {self.what}")

    @property
    def what(self) -> str:
        """The reason without the file's name: `ends after 41 of 100 frames (...)`."""
        of = f" of {self.declared}" if self.declared else ""
        return f"ends after {self.decoded}{of} frames ({self.cause})"


def detect_kind(path: str | Path, by_extension: bool = True) -> str | None:
    """The kind of a file from its content (magic bytes), else (`by_extension`) its extension;
    None if neither."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")):
        return "image"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head.startswith(b"\x5c\x01\x00\x00"):
        return "nifti"
    if head.startswith((b"NRRD", b"ObjectType")):
        return "itk"
    if not by_extension:
        return None
    name = path.name.lower()
    ext = path.suffix.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if ext in ITK_EXT:
        return "itk"
    if ext in DICOM_EXT:
        return "dicom"
    if ext in VIDEO_EXT:
        return "video"
    if ext in IMAGE_EXT:
        return "image"
    return None


def to_uint8(array: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """uint8 from any numeric array: kept as is when already 0..255, else scaled from lo..hi."""
    if array.dtype == np.uint8:
        return array
    a = np.asarray(array, dtype=np.float32)
    if lo is None or hi is None:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0 and hi <= 255 and (array.dtype.kind in "iu" or hi > 1.0):
        return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((np.nan_to_num(a, nan=lo) - lo) * scale, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------- images


def read_image(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    from PIL import Image, ImageSequence

    try:
        im = Image.open(path)
    except Exception as exc:  # PIL raises several types for a bad header
        raise ReadError(f"not a readable image: {exc}") from exc
    with im:
        for index, page in enumerate(ImageSequence.Iterator(im)):
            try:
                page.load()
                yield index, _pil_to_array(page)
            except Exception as exc:
                raise ReadError(f"corrupt image data in page {index}: {exc}") from exc


def _pil_to_array(im) -> np.ndarray:
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"))
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_uint8(np.asarray(im))
    if im.mode == "LA":
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- videos


def video_frame_count(path: Path) -> int:
    """The frame count written in the container, else counted by decoding (some omit it)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return int(stream.frames) or sum(1 for _ in container.decode(stream))


def read_video(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """Frames of the first video stream, decoded with frame threads (`thread_type` AUTO), which
    do not report a packet they cannot decode: a cut file is found from the demuxer's
    corrupt-packet flag and the frame count in the container's header instead (TruncatedFile;
    the checks cost nothing measurable: benchmarks/video_decode.py)."""
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise ReadError(f"cannot open video: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ReadError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = int(stream.frames) or None
        index, cause = -1, ""
        try:
            for packet in container.demux(stream):
                if packet.is_corrupt:  # the cut: decode what came before it, then stop
                    packet, cause = None, "a packet is cut short or corrupt"
                for frame in stream.decode(packet):
                    index += 1
                    yield index, frame.to_ndarray(format="rgb24")
                if cause:
                    break
        except av.FFmpegError as exc:
            cause = f"decoding failed: {exc}"
        if cause or (declared and index + 1 < declared):
            raise TruncatedFile(path, index + 1, declared, cause or "the data ends early")
        if index < 0:
            raise ReadError("video has no decodable frame")


# ---------------------------------------------------------------- DICOM


def dicom_header(path: Path):
    """The dataset of a DICOM file without its pixel data (not read); ReadError when it is no
    image: no Rows, or no pixel data element (pydicom stops reading at that element's tag, so
    a file read to its end has none)."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixels = fh.tell() < os.fstat(fh.fileno()).st_size
    except Exception as exc:
        raise ReadError(f"not a readable DICOM file: {exc}") from exc
    if "Rows" not in ds:
        raise ReadError("DICOM file has no image (no Rows attribute)")
    if not pixels:
        raise ReadError("DICOM file has no pixel data")
    return ds


def read_dicom(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    from pydicom.pixels import iter_pixels

    ds = dicom_header(path)
    declared = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    decoded = 0
    try:
        # iter_pixels decodes one frame at a time and converts YBR to RGB (as_rgb=True).
        with _WholeReads(io.FileIO(path)) as fh:
            for frame in iter_pixels(fh):
                yield decoded, _dicom_frame_to_uint8(frame, ds, photometric, bits)
                decoded += 1
    except Exception as exc:
        cause = _cause(exc, path)
        if decoded < declared:
            raise TruncatedFile(path, decoded, declared, cause) from exc
        raise ReadError(f"DICOM pixel data not decodable after frame {decoded}: {cause}") from exc
    if decoded < declared:
        raise TruncatedFile(path, decoded, declared, "the pixel data ends early")


class _WholeReads(io.BufferedReader):
    """A file whose reads return every byte asked for, or none at its end: a read that the end
    of the file cuts short raises EOFError. pydicom hands a fragment cut short to the JPEG
    decoder, which makes half a frame of it without a word; this makes the cut an error, before
    that frame (with an offset table pydicom reads one fragment ahead: the frame before too)."""

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if size is not None and 0 < len(data) < size:
            raise EOFError(f"the file ends inside a value ({len(data)} of {size} bytes)")
        return data


def _dicom_frame_to_uint8(frame: np.ndarray, ds, photometric: str, bits: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return (rgb >> (depth - 8)).astype(np.uint8) if depth > 8 else rgb.astype(np.uint8)
    if frame.ndim == 3:  # RGB (YBR already converted by iter_pixels)
        return frame if frame.dtype == np.uint8 else to_uint8(frame, 0, 2**bits - 1)
    if bits > 8 or frame.dtype != np.uint8:
        windowed = (
            apply_voi_lut(frame, ds) if "WindowCenter" in ds or "VOILUTSequence" in ds else frame
        )
        frame = to_uint8(windowed) if windowed is not frame else to_uint8(frame, 0, 2**bits - 1)
    if photometric == "MONOCHROME1":
        frame = 255 - frame
    return frame


# ---------------------------------------------------------------- 3D: NIfTI and ITK


@dataclass
class VolumeInfo:
    """What a 3D file holds: its shape in (z, y, x) order and whether it is a 2D+t sequence."""

    shape: tuple[int, ...]
    sequence: bool
    dtype: str


def _itk_reader(path: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ReadError(f"not a readable MetaImage/NRRD file: {_first_line(exc)}") from exc
    return reader


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def volume_layout(path: Path, kind: str, mode: str = "auto") -> VolumeInfo:
    """Shape (z, y, x) and sequence-or-volume of a NIfTI/ITK file.

    `mode` "sequence" or "volume" forces the answer. "auto": a PLUS-style sequence (`*.igs.*`
    name, or per-frame `Seq_Frame0001_*` fields in the header) or a 4D NIfTI with one slice per
    time point is a sequence; anything else is a volume.
    """
    name = path.name.lower()
    if kind == "itk":
        reader = _itk_reader(path)
        size = tuple(reversed(reader.GetSize()))  # ITK (x, y, z) -> numpy (z, y, x)
        keys = reader.GetMetaDataKeys()
        dtype = reader.GetPixelIDTypeAsString() if hasattr(reader, "GetPixelIDTypeAsString") else ""
        looks_seq = ".igs." in name or any(k.startswith("Seq_Frame0001_") for k in keys)
        channels = reader.GetNumberOfComponents()
        if channels not in (1, 3, 4):
            raise ReadError(f"{channels} components per pixel: not an image")
    else:
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise ReadError(f"not a readable NIfTI file: {exc}") from exc
        shape = img.shape
        looks_seq = ".igs." in name or (len(shape) == 4 and shape[2] == 1)
        if len(shape) == 4 and shape[2] == 1:
            shape = (shape[0], shape[1], shape[3])
        size = tuple(reversed(shape[:3]))
        dtype = str(img.get_data_dtype())
    if len(size) == 2:
        size = (1, *size)
    if len(size) != 3:
        raise ReadError(f"unsupported dimensionality {len(size)} (shape {size})")
    sequence = {"auto": looks_seq, "sequence": True, "volume": False}[mode]
    return VolumeInfo(shape=tuple(int(s) for s in size), sequence=sequence, dtype=dtype)


def read_volume(
    path: Path, kind: str, mode: str = "auto", axis: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Slices of a 3D file. Sequences: frames along z, one at a time. Volumes: along `axis`
    of the (z, y, x) array (0: axial z-slices, 1: y, 2: x); intensities of a non-uint8 volume are
    scaled with the min/max of the whole volume so that its slices stay comparable."""
    info = volume_layout(path, kind, mode)
    axis = 0 if info.sequence else axis
    if axis not in (0, 1, 2):
        raise ValueError(f"volume axis must be 0, 1 or 2, not {axis}")
    if kind == "itk":
        yield from _read_itk(path, info, axis)
    else:
        yield from _read_nifti(path, info, axis)


def _read_itk(path: Path, info: VolumeInfo, axis: int) -> Iterator[tuple[int, np.ndarray]]:
    import SimpleITK as sitk

    declared, z = info.shape[axis], 0
    try:
        if axis == 0 and "8-bit unsigned" in info.dtype and np.prod(info.shape) > STREAM_BYTES:
            # Large 8-bit file: read one z-slice at a time (MetaImage/NRRD support this).
            reader = _itk_reader(path)
            nx, ny = reader.GetSize()[:2]
            for z in range(declared):
                reader.SetExtractIndex([0, 0, z] if reader.GetDimension() == 3 else [0, 0])
                reader.SetExtractSize([nx, ny, 0] if reader.GetDimension() == 3 else [nx, ny])
                yield z, _channels_last(sitk.GetArrayFromImage(reader.Execute()))
            return
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:  # ITK's message names a wrong cause (errno): say what we know
        raise TruncatedFile(path, z, declared, "SimpleITK cannot read its pixel data") from exc
    if volume.ndim == 2:
        volume = volume[None]
    yield from _slices(volume, axis)


def _read_nifti(path: Path, info: VolumeInfo, axis: int) -> Iterator[tuple[int, np.ndarray]]:
    import nibabel as nib

    img = nib.load(str(path))
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # a cut .nii (bytes missing) or .nii.gz (EOFError)
        raise TruncatedFile(path, 0, info.shape[axis], _cause(exc, path)) from exc
    if data.ndim == 4 and data.shape[2] == 1:
        data = data[:, :, 0, :]
    if data.ndim == 2:
        data = data[:, :, None]
    # NIfTI stores (x, y, z): transpose to (z, y, x), the order SimpleITK and DICOM use.
    yield from _slices(np.transpose(data, (2, 1, 0)), axis)


def _cause(exc: Exception, path: Path) -> str:
    """The first line of a library's message, the file named by its name only."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].replace(str(path), path.name) if lines else type(exc).__name__


def _slices(volume: np.ndarray, axis: int) -> Iterator[tuple[int, np.ndarray]]:
    lo = hi = None
    if volume.dtype != np.uint8:
        finite = volume[np.isfinite(volume)] if volume.dtype.kind == "f" else volume
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for index in range(volume.shape[axis]):
        yield index, _channels_last(to_uint8(np.take(volume, index, axis=axis), lo, hi))


def _channels_last(array: np.ndarray) -> np.ndarray:
    array = np.squeeze(array) if array.ndim > 2 and array.shape[0] == 1 else array
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    return to_uint8(array) if array.dtype != np.uint8 else array


# ---------------------------------------------------------------- dispatch


def read_frames(
    path: str | Path, kind: str | None = None, mode: str = "auto", axis: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Frames of any supported file, lazily; raises ReadError for what cannot be read."""
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind is None:
        raise ReadError("unsupported file type (not an image, video, DICOM or volume)")
    if kind == "image":
        return read_image(path)
    if kind == "video":
        return read_video(path)
    if kind == "dicom":
        return read_dicom(path)
    if kind in ("nifti", "itk"):
        return read_volume(path, kind, mode, axis)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def frame_count(
    path: str | Path, kind: str | None = None, mode: str = "auto", axis: int = 0
) -> int:
    """How many frames a file holds according to its header (0 when it does not say);
    ReadError for a header the readers refuse (a DICOM without an image, say)."""
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind == "video":
        return video_frame_count(path)
    if kind == "dicom":
        return int(dicom_header(path).get("NumberOfFrames", 1) or 1)
    if kind in ("nifti", "itk"):
        info = volume_layout(path, kind, mode)
        return info.shape[0 if info.sequence else axis]
    if kind == "image":
        from PIL import Image

        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    return 0
