"""What a file's header declares, read before a single pixel is decoded: the files its data
lies in, and the size of its frames.

A file from someone else (the app's uploads) is parsed whole before it is trusted:

- `external_references(path, kind)`: every other file or location its reader would open for
  its pixels (NRRD `data file`, MetaImage `ElementDataFile`, the `.img` of a NIfTI/ANALYZE
  header, a DICOM file-set directory or JPIP-referenced pixel data). Empty for a
  self-contained file. It opens nothing but `path`: SimpleITK's NRRD reader opens the data
  file even to read the header, so the NRRD and MetaImage headers are parsed here, as text,
  the way teem and MetaIO split them. A header-only file pointing at a sibling is legitimate
  on the command line; only the app refuses every reference.
- `declared_size(path, kind)`: width, height and frame count from the header (Pillow, PyAV,
  pydicom, nibabel, SimpleITK, none of which decodes pixels for it; call it after
  `external_references` for files from others). For compressed DICOM it also checks that each
  frame's codestream is the Rows x Columns the header declares, since the decoder sizes its
  buffer from the codestream.
- `check_pixel_budget(size, ...)`: `TooLarge` when one frame, or all the frames that would be
  decoded, hold more pixels than allowed.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sonodistill.data.readers import ReadError, volume_layout

DICOM_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (a DICOMDIR)
DICOM_JPIP = {"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"}  # pixel data at a URL
METAIMAGE_LOCAL = {"LOCAL", "Local", "local"}  # the spellings MetaIO takes for "data follows"


class TooLarge(ReadError):
    """A file whose header declares more pixels than the caller's budget."""


@dataclass(frozen=True)
class Declared:
    """Frame size and count a header declares (frames in reading order: a volume's z)."""

    width: int
    height: int
    frames: int | None
    """None when the header does not say (some video containers)."""
    whole: bool = False
    """Read at once (3D volumes): all frames are decoded, whatever the frame cap."""

    @property
    def frame_pixels(self) -> int:
        return self.width * self.height


# ---------------------------------------------------------------- external references


def external_references(path: str | Path, kind: str) -> tuple[str, ...]:
    """The other files or locations the header of `path` points its reader at (as
    `field value` strings); empty when the data lies in the file itself. ReadError for a
    header that cannot be parsed."""
    path = Path(path)
    # Images (Pillow) hold their pixels; FFmpeg's mov demuxer ignores external data
    # references (`enable_drefs` is off by default) and magic bytes pin the demuxer.
    parse = {"itk": _itk_references, "nifti": _nifti_references, "dicom": _dicom_references}
    return _as_read_error(parse[kind], path, kind) if kind in parse else ()


def _as_read_error(parse, path: Path, kind: str):
    """`parse(path)`, any library's failure on a malformed file turned into a ReadError."""
    try:
        return parse(path)
    except ReadError:
        raise
    except Exception as exc:  # the libraries raise many types for a bad header
        raise ReadError(f"not a readable {kind} file: {exc}") from exc


def _itk_references(path: Path) -> tuple[str, ...]:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _nrrd_references(path) if magic == b"NRRD" else _metaimage_references(path)


def _header_lines(path: Path):
    """Lines of a text header, split as teem and MetaIO split them (\\n, \\r\\n or \\r)."""
    with open(path, "rb") as fh:
        for raw in fh:
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            yield from (part.decode("latin-1") for part in raw.split(b"\r"))


def _nrrd_references(path: Path) -> tuple[str, ...]:
    """NRRD fields end at the first empty line (attached data follows) or at the end of a
    detached header; `data file` (or `datafile`, any case) names the data: one file, a
    printf-style pattern with its range, or LIST followed by one file per line."""
    lines = _header_lines(path)
    next(lines, None)  # NRRD000X
    for line in lines:
        if not line:
            return ()
        if line.startswith("#"):
            continue
        key, _, value = line.partition(":")
        if "".join(key.split()).lower() == "datafile":
            value = value.lstrip("=").strip()
            listed = [f for f in lines if f] if value.split()[:1] == ["LIST"] else []
            return (f"data file: {value}", *listed)
    return ()


def _metaimage_references(path: Path) -> tuple[str, ...]:
    """MetaIO reads `key = value` (or `key : value`) fields up to ElementDataFile, after
    which the data follows when it is LOCAL; anything else (a file, `LIST` and one file per
    line, or a pattern with its range) lies elsewhere. Keys are matched in any case here,
    MetaIO matches them exactly: stricter, never looser."""
    lines = _header_lines(path)
    for line in lines:
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0 or line[:cut].strip().lower() != "elementdatafile":
            continue
        value = line[cut + 1 :].lstrip("=: \t").strip()
        if value in METAIMAGE_LOCAL:
            return ()
        listed = [f for f in lines if f.strip()] if value.split()[:1] == ["LIST"] else []
        return (f"ElementDataFile = {value}", *listed)
    raise ReadError("MetaImage header without ElementDataFile: no image data")


def _nifti_references(path: Path) -> tuple[str, ...]:
    """A single-file NIfTI says so in its magic (`n+1`, `n+2`); `ni1`/`ni2` and ANALYZE 7.5
    headers keep their voxels in the `.img` file beside them."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:
            head = fh.read(548)
    except (OSError, EOFError) as exc:
        raise ReadError(f"corrupt gzip data ({exc})") from exc
    if len(head) < 348:
        raise ReadError("NIfTI header shorter than 348 bytes")
    size = struct.unpack("<i", head[:4])[0]
    if size not in (348, 540):
        size = struct.unpack(">i", head[:4])[0]
    magic = head[344:348] if size == 348 else head[4:8]
    if magic in (b"n+1\x00", b"n+2\x00"):
        return ()
    what = "NIfTI pair" if magic in (b"ni1\x00", b"ni2\x00") else "ANALYZE header"
    return (f"{what}: voxels in {path.stem}.img",)


def _dicom_references(path: Path) -> tuple[str, ...]:
    """The whole data set (sequences included): a DICOMDIR lists other files (group 0004,
    e.g. ReferencedFileID), JPIP-referenced pixel data lies at PixelDataProviderURL."""
    import pydicom

    ds = pydicom.dcmread(path)
    meta = getattr(ds, "file_meta", None) or {}
    found = []
    if str(meta.get("MediaStorageSOPClassUID", "")) == DICOM_DIRECTORY:
        found.append("a DICOMDIR (Media Storage Directory): it lists other files")
    if str(meta.get("TransferSyntaxUID", "")) in DICOM_JPIP:
        found.append("pixel data referenced by JPIP (PixelDataProviderURL)")
    for elem in ds.iterall():
        if elem.tag.group == 0x0004 or elem.keyword == "PixelDataProviderURL":
            value = "" if elem.VR == "SQ" else f" = {elem.value}"
            found.append(f"{elem.keyword or elem.tag}{value}")
    return tuple(dict.fromkeys(found))


# ---------------------------------------------------------------- declared size


def declared_size(path: str | Path, kind: str) -> Declared:
    """Width, height and frames as the header of `path` declares them (3D files: slices
    along z, as the app and `read_frames` read them by default). ReadError when the header
    cannot be read; TooLarge from Pillow's own decompression-bomb limit."""
    sizes = {
        "image": _image_size,
        "video": _video_size,
        "dicom": _dicom_size,
        "nifti": partial(_volume_size, kind="nifti"),
        "itk": partial(_volume_size, kind="itk"),
    }
    if kind not in sizes:
        raise ValueError(f"unknown kind {kind!r}")
    return _as_read_error(sizes[kind], Path(path), kind)


def _volume_size(path: Path, kind: str) -> Declared:
    z, y, x = volume_layout(path, kind).shape
    return Declared(width=x, height=y, frames=z, whole=True)


def _image_size(path: Path) -> Declared:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
            frames = int(getattr(im, "n_frames", 1))
            if im.format == "TIFF":  # pages may differ in size: take the largest
                for page in range(1, frames):
                    im.seek(page)
                    width, height = max((width, height), im.size, key=lambda s: s[0] * s[1])
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"{exc}".split(", could be")[0]) from exc
    return Declared(width, height, frames)


def _video_size(path: Path) -> Declared:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ReadError("no video stream")
        stream = container.streams.video[0]
        frames = int(stream.frames) or None
        if frames is None and stream.average_rate and (stream.duration or container.duration):
            seconds = (
                float(stream.duration * stream.time_base)
                if stream.duration
                else container.duration / av.time_base
            )
            frames = max(1, round(seconds * float(stream.average_rate)))
        return Declared(stream.codec_context.width, stream.codec_context.height, frames)


def _dicom_size(path: Path) -> Declared:
    import pydicom

    ds = pydicom.dcmread(path)
    if "Rows" not in ds or "Columns" not in ds:
        raise ReadError("DICOM file has no image (no Rows/Columns attribute)")
    size = Declared(int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames") or 1))
    _check_codestreams(ds, size)
    return size


def _check_codestreams(ds, size: Declared) -> None:
    """ReadError unless every frame of a JPEG, JPEG-LS or JPEG 2000 DICOM codes an image of
    the declared Columns x Rows: its decoder allocates what the codestream says, so a 64 x 64
    header over a 16384 x 16384 codestream would slip past any budget. Native and RLE data
    are decoded into Rows x Columns and need no check."""
    import openjpeg
    from pydicom.encaps import generate_fragmented_frames
    from pydicom.pixels.utils import _get_jpg_parameters  # the parser pydicom's decoder runs
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    jpeg = syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes
    if not (jpeg or syntax in JPEG2000TransferSyntaxes) or "PixelData" not in ds:
        return
    frames = generate_fragmented_frames(ds.PixelData, number_of_frames=size.frames)
    for index, fragments in enumerate(frames):
        if jpeg:
            info = _get_jpg_parameters(fragments[0])
            coded = (info.get("width"), info.get("height"))
        else:
            try:
                info = openjpeg.get_parameters(fragments[0])
            except Exception:  # openjpeg raises several types for a bad header
                info = {}
            coded = (info.get("columns"), info.get("rows"))
        if coded != (size.width, size.height):
            what = "unreadable" if None in coded else f"{coded[0]} x {coded[1]}"
            raise ReadError(
                f"frame {index}'s codestream is {what}, not the {size.width} x {size.height} "
                "(Columns x Rows) its DICOM header declares"
            )


# ---------------------------------------------------------------- pixel budget


def check_pixel_budget(
    size: Declared,
    max_frame_pixels: int,
    max_pixels: int,
    max_frames: int | None = None,
    options: tuple[str, str] = ("--max_frame_pixels", "--max_pixels"),
) -> None:
    """TooLarge when one frame holds more than `max_frame_pixels`, or the frames that would
    be decoded (the first `max_frames` of a stream, every slice of a volume; one when the
    header does not say) more than `max_pixels`. `options` name the limits in the message."""
    w, h = size.width, size.height
    if size.frame_pixels > max_frame_pixels:
        raise TooLarge(
            f"{w} x {h} = {size.frame_pixels:,} pixels per frame, more than {options[0]} "
            f"{max_frame_pixels:,}"
        )
    frames = size.frames or 1
    if max_frames and not size.whole:
        frames = min(frames, max_frames)
    total = size.frame_pixels * frames
    if total > max_pixels:
        raise TooLarge(
            f"{w} x {h} x {frames} frames = {total:,} pixels, more than {options[1]} {max_pixels:,}"
        )
