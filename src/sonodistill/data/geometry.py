"""Pixel spacing (mm) and frame times (s) of a source file, read from its header.

What `sonodistill predict` needs to turn a mask into mm^2 and a frame index into a time. Only
these fields are read: no other header value (patient, study, device) leaves this module.

Spacing, in order of preference:
- DICOM: `PixelSpacing`, else the 2D tissue region of `SequenceOfUltrasoundRegions` (physical
  units cm -> mm). A region that does not fit inside the image means the image was resampled
  after the region was written (seen in real files): its spacing is then not used.
- MetaImage/NRRD (SimpleITK) and NIfTI: the in-plane spacing of the frames (sequences: y, x;
  volume slices: the two axes other than the slicing axis). Exactly 1 x 1 is the formats'
  default, not a plausible ultrasound pixel (0.05-0.5 mm): it is treated as unknown.
- images and videos carry none.
Frame times: DICOM `FrameTimeVector`, `FrameTime`, `CineRate` or `RecommendedDisplayFrameRate`;
a video's average frame rate; PLUS sequences' `Seq_FrameNNNN_Timestamp`; a NIfTI 2D+t file's
time step. A caller can override either (`Geometry.with_overrides`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sonodistill.data.readers import detect_kind, volume_layout

DEFAULT_SPACING = (1.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    """Spacing (row, column) in mm per pixel and frame timing of one source; None = unknown."""

    spacing_mm: tuple[float, float] | None = None
    spacing_from: str = ""
    """Where the spacing comes from (a header field), or why there is none."""
    frame_interval_s: float | None = None
    timestamps_s: tuple[float, ...] | None = None
    """Per-frame times from the first frame, when the file lists them."""

    def time_of(self, index: int) -> float | None:
        if self.timestamps_s is not None and index < len(self.timestamps_s):
            return self.timestamps_s[index]
        if self.frame_interval_s is not None:
            return index * self.frame_interval_s
        return None

    @property
    def interval_s(self) -> float | None:
        """Time between frames: the stated interval, else the median of the timestamps'."""
        if self.frame_interval_s is not None:
            return self.frame_interval_s
        if self.timestamps_s and len(self.timestamps_s) > 1:
            t = self.timestamps_s
            steps = sorted(t[i + 1] - t[i] for i in range(len(t) - 1))
            return steps[len(steps) // 2] or None
        return None

    @property
    def pixel_area_mm2(self) -> float | None:
        return None if self.spacing_mm is None else self.spacing_mm[0] * self.spacing_mm[1]

    def with_overrides(
        self, spacing_mm: tuple[float, float] | None = None, fps: float | None = None
    ) -> Geometry:
        out = self
        if spacing_mm is not None:
            out = replace(out, spacing_mm=tuple(spacing_mm), spacing_from="given by the user")
        if fps:
            out = replace(out, frame_interval_s=1.0 / fps, timestamps_s=None)
        return out


def read_geometry(
    path: str | Path, kind: str | None = None, layout: str = "auto", axis: int = 0
) -> Geometry:
    """The geometry of a file (see the module docstring); never raises for a missing field."""
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind == "dicom":
        return _dicom(path)
    if kind == "video":
        return _video(path)
    if kind == "itk":
        return _itk(path, layout, axis)
    if kind == "nifti":
        return _nifti(path, layout, axis)
    return Geometry(spacing_from="none in this file type")


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _dicom(path: Path) -> Geometry:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing, source = _dicom_spacing(ds)
    interval, stamps = None, None
    vector = ds.get("FrameTimeVector")
    if vector:  # increments in ms; the first entry is 0
        steps = [float(v) / 1000.0 for v in vector]
        stamps, t = [], 0.0
        for step in steps:
            t += step
            stamps.append(t - steps[0])
        stamps = tuple(stamps)
    elif _number(ds.get("FrameTime")):
        interval = _number(ds.get("FrameTime")) / 1000.0
    else:
        rate = _number(ds.get("CineRate")) or _number(ds.get("RecommendedDisplayFrameRate"))
        interval = 1.0 / rate if rate else None
    return Geometry(spacing, source, interval, stamps)


def _dicom_spacing(ds) -> tuple[tuple[float, float] | None, str]:
    spacing = ds.get("PixelSpacing")
    if spacing and len(spacing) == 2 and all(_number(v) for v in spacing):
        return (float(spacing[0]), float(spacing[1])), "DICOM PixelSpacing"
    regions = [
        r
        for r in ds.get("SequenceOfUltrasoundRegions", [])
        if r.get("RegionSpatialFormat") == 1  # 2D
        and r.get("PhysicalUnitsXDirection") == 3  # cm
        and r.get("PhysicalUnitsYDirection") == 3
        and _number(r.get("PhysicalDeltaX"))
        and _number(r.get("PhysicalDeltaY"))
    ]
    if not regions:
        return None, "no PixelSpacing or 2D ultrasound region in cm"

    def area(r) -> int:
        return (r.RegionLocationMaxX1 - r.RegionLocationMinX0) * (
            r.RegionLocationMaxY1 - r.RegionLocationMinY0
        )

    region = max(regions, key=area)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    # Max X1/Y1 are inclusive; files in the wild also write them exclusive (== Columns/Rows).
    if region.RegionLocationMaxX1 > cols or region.RegionLocationMaxY1 > rows:
        return None, (
            f"ultrasound region x {region.RegionLocationMinX0}-{region.RegionLocationMaxX1}, "
            f"y {region.RegionLocationMinY0}-{region.RegionLocationMaxY1} lies outside the "
            f"{cols}x{rows} image (resampled after the region was written): spacing not used"
        )
    dy, dx = float(region.PhysicalDeltaY) * 10.0, float(region.PhysicalDeltaX) * 10.0
    return (dy, dx), "DICOM SequenceOfUltrasoundRegions (largest 2D region)"


def _video(path: Path) -> Geometry:
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    interval = 1.0 / float(rate) if rate else None
    return Geometry(None, "none in video files", interval)


def _in_plane(spacing_zyx: tuple[float, float, float], sequence: bool, axis: int):
    axes = (1, 2) if sequence else tuple(a for a in (0, 1, 2) if a != axis)
    row, col = spacing_zyx[axes[0]], spacing_zyx[axes[1]]
    if (row, col) == DEFAULT_SPACING:
        return None
    return (row, col) if row > 0 and col > 0 else None


def _itk(path: Path, layout: str, axis: int) -> Geometry:
    import SimpleITK as sitk

    info = volume_layout(path, "itk", layout)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    xyz = tuple(reader.GetSpacing()) + (1.0,) * (3 - reader.GetDimension())
    spacing = _in_plane(tuple(reversed(xyz[:3])), info.sequence, axis)
    stamps = None
    keys = set(reader.GetMetaDataKeys())
    if info.sequence and "Seq_Frame0000_Timestamp" in keys:
        values = []
        for i in range(info.shape[0]):
            key = f"Seq_Frame{i:04d}_Timestamp"
            if key not in keys or _number(reader.GetMetaData(key)) is None:
                break
            values.append(float(reader.GetMetaData(key)))
        if len(values) == info.shape[0]:
            stamps = tuple(v - values[0] for v in values)
    source = "MetaImage/NRRD spacing" if spacing else "header spacing is the 1 x 1 default"
    return Geometry(spacing, source, None, stamps)


def _nifti(path: Path, layout: str, axis: int) -> Geometry:
    import nibabel as nib

    info = volume_layout(path, "nifti", layout)
    header = nib.load(str(path)).header
    zooms = tuple(float(z) for z in header.get_zooms())
    space_unit, time_unit = header.get_xyzt_units()
    scale = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}.get(space_unit, 1.0)
    x, y = zooms[0] * scale, zooms[1] * scale
    z = zooms[2] * scale if len(zooms) > 2 else 1.0
    spacing = _in_plane((z, y, x), info.sequence, axis)
    interval = None
    if info.sequence and len(zooms) == 4 and zooms[3] > 0:
        interval = zooms[3] * {"msec": 1e-3, "usec": 1e-6}.get(time_unit, 1.0)
    source = "NIfTI pixdim" if spacing else "header spacing is the 1 x 1 default"
    return Geometry(spacing, source, interval)
