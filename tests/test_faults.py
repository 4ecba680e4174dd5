"""Fault and attack tables of issue 22, one table per part of it: each case a damaged or hostile
input (made from a real file of ../shared/data where one exists) and the outcome every command must
give for it (exit code or HTTP status, one line, what is written, failed or served, the counts,
and that nothing is left behind).

Refusal rows run the command in-process through the CLI's `main` (`conftest.assert_refused`):
exit code 2, exactly one line on stderr naming the option or file at fault (and nothing it must
not say), no traceback, and every file under the test's folder unchanged.
"""

from __future__ import annotations

import errno
import functools
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import (
    BUSI,
    CORPUS,
    DISTILL,
    EVALUATE,
    EXPORT,
    RESUME,
    TEACHER,
    VIDEOS,
    assert_refused,
    running_app,
)
from conftest import Refusal as Row

from sonodistill import io as sio
from sonodistill.cli import main as cli
from sonodistill.data.readers import ReadError, TruncatedFile, frame_count, read_frames
from sonodistill.distill import recipe as recipe_module
from sonodistill.errors import UserError
from sonodistill.utils.rundir import lock_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")

# --- outputs whole, truncation (issue 22.1-2) ---------------------------------------------------
# A file cut short (a download or copy that stopped) must be said to be cut, with its counts,
# by the readers and by every command on them: predict fails that source (exit 1, the others
# written), corpus build keeps the frames read before the cut and names the file truncated, the
# app fails the session. Expected counts come from the intact file, read by the libraries
# directly (PyAV packet positions, pydicom fragments, SimpleITK/nibabel headers).

LUNG = f"{VIDEOS}/patient_10_L1.mp4"
CINE = "corpus/dicom/examples_ybr_color.dcm"
SEQUENCE = "corpus/plus/TestImages/UltrasonixCurvilinearScanConvertedData.igs.mha"
NIFTI = "corpus/plus/nifti_derived/UltrasonixCurvilinearScanConvertedData.nii.gz"
STILL = f"{BUSI}/benign/benign (1).png"


@dataclass
class Damaged:
    """A damaged copy of a real file, and what its intact header and bytes say."""

    file: Path
    declared: int | None
    """Frames its header declares (None: no image to read at all)."""
    usable: int
    """Frames the readers deliver before the cut (each whole, equal to the intact file's)."""
    intact: Path | None = None


def _half(data: bytes, out: Path) -> int:
    cut = len(data) // 2
    out.write_bytes(data[:cut])
    return cut


def mp4_faststart_cut(shared: Path, folder: Path) -> Damaged:
    """The lung clip remuxed with its index (moov) at the front, cut at 50 %: the frames of
    the packets wholly before the cut are decodable, the rest are gone."""
    fast = folder / "lung_faststart.mp4"
    with (
        av.open(str(shared / LUNG)) as src,
        av.open(str(fast), "w", options={"movflags": "faststart"}) as dst,
    ):
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    data = fast.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # the index is at the front
    with av.open(str(fast)) as video:
        declared = video.streams.video[0].frames
        packets = [(p.pos, p.size) for p in video.demux(video=0) if p.size]
    cut = _half(data, folder / "lung_cut.mp4")
    whole = sum(pos + size <= cut for pos, size in packets)
    return Damaged(folder / "lung_cut.mp4", declared, whole, fast)


def dicom_cine_cut(shared: Path, folder: Path) -> Damaged:
    """The 30-frame JPEG cine cut at 50 %: the frames whose fragment lies wholly before the cut,
    less one where a Basic Offset Table makes pydicom read a fragment ahead (the frame before
    the cut is read with the cut fragment)."""
    data = (shared / CINE).read_bytes()
    ds = pydicom.dcmread(shared / CINE)
    declared = int(ds.NumberOfFrames)
    cut = _half(data, folder / "cine_cut.dcm")
    end, whole = 0, 0
    for frame in pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=declared):
        end = data.find(frame, end) + len(frame)
        whole += end <= cut
    offsets = pydicom.encaps.parse_basic_offsets(pydicom.filebase.DicomBytesIO(ds.PixelData))
    return Damaged(folder / "cine_cut.dcm", declared, whole - bool(offsets), shared / CINE)


def dicom_cine_declaring_more(shared: Path, folder: Path) -> Damaged:
    """The whole cine with a header that declares 10 frames more than its pixel data holds
    (pydicom decodes the 30 there without a word)."""
    ds = pydicom.dcmread(shared / CINE)
    frames = int(ds.NumberOfFrames)
    ds.NumberOfFrames = frames + 10
    ds.save_as(folder / "cine_short.dcm")
    return Damaged(folder / "cine_short.dcm", frames + 10, frames, shared / CINE)


def mha_sequence_cut(shared: Path, folder: Path) -> Damaged:
    """A PLUS 2D+t MetaImage cut at 50 %: read whole, so no frame comes before the error."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(shared / SEQUENCE))
    reader.ReadImageInformation()
    _half((shared / SEQUENCE).read_bytes(), folder / "sequence_cut.igs.mha")
    return Damaged(folder / "sequence_cut.igs.mha", reader.GetSize()[2], 0)


def nifti_gz_cut(shared: Path, folder: Path) -> Damaged:
    """The same data as a gzipped NIfTI volume cut at 50 % (its slices along z)."""
    _half((shared / NIFTI).read_bytes(), folder / "volume_cut.nii.gz")
    return Damaged(folder / "volume_cut.nii.gz", nib.load(shared / NIFTI).shape[2], 0)


def dicom_without_pixels(shared: Path, folder: Path) -> Damaged:
    """The cine's header with its pixel data removed: an image header, no image."""
    ds = pydicom.dcmread(shared / CINE)
    del ds.PixelData
    ds.save_as(folder / "no_pixels.dcm")
    return Damaged(folder / "no_pixels.dcm", None, 0)


# (maker, predict's exit code, the file's row in a corpus)
TRUNCATION = [
    pytest.param(mp4_faststart_cut, 1, "truncated", id="mp4-faststart-cut-50%"),
    pytest.param(dicom_cine_cut, 1, "truncated", id="dicom-cine-cut-50%"),
    pytest.param(dicom_cine_declaring_more, 1, "truncated", id="dicom-cine-declaring-40-of-30"),
    pytest.param(mha_sequence_cut, 1, "unreadable", id="mha-sequence-cut-50%"),
    pytest.param(nifti_gz_cut, 1, "unreadable", id="nii.gz-volume-cut-50%"),
    pytest.param(dicom_without_pixels, 2, "unreadable", id="dicom-without-pixel-data"),
]


def _reason(case: Damaged) -> str:
    """The reason every caller gives, after the file's name."""
    if case.declared is None:
        return "DICOM file has no pixel data"
    return f"ends after {case.usable} of {case.declared} frames ("


@pytest.mark.parametrize(("make", "exit_code", "corpus_row"), TRUNCATION)
def test_readers_stop_at_the_cut_and_say_so(make, exit_code, corpus_row, shared_data, tmp_path):
    case = make(shared_data, tmp_path)
    if case.declared is None:
        with pytest.raises(ReadError, match=_reason(case)):
            frame_count(case.file)
        with pytest.raises(ReadError, match=_reason(case)) as err:
            list(read_frames(case.file))
        assert not isinstance(err.value, TruncatedFile)
        return
    assert frame_count(case.file) == case.declared  # the header is intact: it says all
    frames = []
    with pytest.raises(TruncatedFile) as err:
        frames.extend(read_frames(case.file))
    cut = err.value
    assert (
        (cut.decoded, cut.declared) == (case.usable, case.declared) == (len(frames), cut.declared)
    )
    assert str(cut).startswith(f"{case.file.name} {_reason(case)}") and "\n" not in str(cut)
    if case.intact:  # every frame given is whole: the intact file's, pixel for pixel
        intact = dict(read_frames(case.intact))
        assert all(np.array_equal(frame, intact[i]) for i, frame in frames)


@pytest.mark.slow
@pytest.mark.parametrize(("make", "exit_code", "corpus_row"), TRUNCATION)
def test_predict_fails_the_damaged_source_and_writes_the_others(
    make, exit_code, corpus_row, busi_seg_head, shared_data, tmp_path, capsys
):
    case = make(shared_data, tmp_path)
    out = tmp_path / "pred"
    argv = ["predict", "--inputs+", str(case.file), "--inputs+", str(shared_data / STILL)]
    argv += ["--model", str(busi_seg_head), "--out", str(out), "--progress", "false"]
    assert cli(argv) == exit_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    if exit_code == 2:  # no image at all: refused before anything is written
        assert str(case.file) in err and _reason(case) in err and not out.exists()
        return
    summary = json.loads((out / "summary.json").read_text())
    damaged, still = summary["sources"]
    failed = f"sonodistill predict: 1 of 2 sources failed: {damaged['name']}: {_reason(case)}"
    assert err.startswith(failed)
    assert damaged["status"].startswith(f"failed: {_reason(case)}") and still["status"] == "ok"
    assert summary["failed"] == [damaged["name"]]
    n = case.usable  # the frames before the cut are written, and counted
    assert damaged["counts"] == {
        "declared": case.declared,
        "decoded": n,
        "rows": n,
        "masks": n,
        "overlay_frames": n,
    }
    rows = pd.read_csv(out / "predictions.csv")
    assert (rows.source == damaged["name"]).sum() == n and (rows.source == still["name"]).sum() == 1
    assert len(list((out / "masks").glob(f"{damaged['name']}/*.png"))) == n
    video = out / "overlays" / f"{damaged['name']}.mp4"
    if n:
        with av.open(str(video)) as overlay:
            assert sum(1 for _ in overlay.decode(video=0)) == n
    else:
        assert not video.exists()
    assert (out / "overlays" / f"{still['name']}.png").is_file()
    assert f"failed: {_reason(case)}" in (out / "summary.md").read_text()
    if not n:  # alone, no frame at all: still a whole summary that says why, exit 1
        alone = tmp_path / "alone"
        argv = ["predict", "--inputs+", str(case.file), "--model", str(busi_seg_head)]
        assert cli([*argv, "--out", str(alone), "--progress", "false"]) == 1
        text = (alone / "summary.md").read_text()
        assert "No frame was decoded" in text and f"failed: {_reason(case)}" in text


@pytest.mark.slow
@pytest.mark.parametrize(("make", "exit_code", "corpus_row"), TRUNCATION)
def test_corpus_build_keeps_what_was_read_and_names_the_cut(
    make, exit_code, corpus_row, shared_data, tmp_path
):
    download = tmp_path / "download"
    download.mkdir()
    case = make(shared_data, download)
    for extra in download.iterdir():  # only the damaged file, and one intact sequence
        if extra != case.file:
            extra.unlink()
    shutil.copy(shared_data / SEQUENCE, download / "intact.igs.mha")
    sources = tmp_path / "sources.yaml"
    spec = {"sources": [{"dataset": "faults", "anatomy": "mixed", "path": str(download)}]}
    sources.write_text(yaml.safe_dump(spec))
    out = tmp_path / "corpus"
    argv = ["corpus", "build", str(sources), "--out", str(out), "--workers", "1"]
    assert cli([*argv, "--quiet", "true"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    mine = m[m.source == str(case.file)]
    (reason,) = mine[mine.frame < 0].reason
    assert reason.startswith(f"{corpus_row}: {_reason(case)}")
    assert list(mine[mine.frame >= 0].frame) == list(range(case.usable))  # read, then selected
    summary = json.loads((out / "summary.json").read_text())
    truncated = {r["source"]: r for r in summary["truncated_files"]}
    skipped = {r["source"] for r in summary["skipped_files"]}
    if corpus_row == "truncated":  # not "skipped": its frames are in the corpus's count
        assert str(case.file) not in skipped and summary["files_truncated"] == 1
        assert truncated[str(case.file)]["frames"] == case.usable
        assert truncated[str(case.file)]["kept"] == int(mine.kept.sum())
        assert "Truncated files" in (out / "summary.md").read_text()
    else:
        assert str(case.file) in skipped and not truncated and summary["files_unreadable"] == 1
    log = (out / "build.log").read_text()
    assert f"{case.file} {reason}" in log or f"skipped {case.file}: {reason}" in log


@pytest.mark.slow
@pytest.mark.parametrize(("make", "exit_code", "corpus_row"), TRUNCATION)
def test_app_session_fails_with_the_reason(
    make, exit_code, corpus_row, busi_seg_head, shared_data, tmp_path
):
    from sonodistill.deploy.app.sessions import Session, run_session, upload_kind
    from sonodistill.deploy.pipeline import FramePredictor
    from sonodistill.deploy.runtimes import open_model_folder, open_runner

    case = make(shared_data, tmp_path)
    kind, suffix = upload_kind(case.file)
    upload = tmp_path / "session" / f"upload{suffix}"  # stored as the app stores uploads
    upload.parent.mkdir()
    shutil.copy(case.file, upload)
    folder = open_model_folder(busi_seg_head)
    predictor = FramePredictor(open_runner(folder, "torch", 1), folder.spec, folder.image_size)
    session = Session("s1", "m0", "torch", "scan from the ward.dat", upload.parent, kind=kind)
    session.classes = ["background", "lesion"]
    assert run_session(session, upload, predictor, folder.spec, max_frames=1000) == "failed"
    if case.declared is not None:  # named as the user knows it, with the counts
        assert session.error.startswith(f"scan from the ward.dat {_reason(case)}")
    assert _reason(case) in session.error and "\n" not in session.error
    assert "upload" not in session.error  # no server path
    assert len(session.rows) == case.usable  # the frames before the cut were shown


@pytest.mark.slow
def test_an_overlay_that_loses_a_frame_fails_its_source(
    busi_seg_head, shared_data, tmp_path, capsys, monkeypatch
):
    from sonodistill.deploy.pipeline import VideoWriter

    write = VideoWriter.write
    written = []

    def lossy(self, rgb):  # the first video (the clip's) drops its 5th frame
        written.append(self)
        if not (self is written[0] and written.count(self) == 5):
            write(self, rgb)

    monkeypatch.setattr(VideoWriter, "write", lossy)
    out = tmp_path / "pred"
    argv = ["predict", "--inputs+", str(shared_data / LUNG), "--inputs+", str(shared_data / CINE)]
    argv += ["--model", str(busi_seg_head), "--out", str(out), "--max_frames", "12"]
    assert cli([*argv, "--progress", "false"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "sonodistill predict: 1 of 2 sources failed: patient_10_L1: 12 frames decoded but "
        "overlay frames 11"
    )
    clip, cine = json.loads((out / "summary.json").read_text())["sources"]
    assert clip["counts"]["overlay_frames"] == 11 and clip["counts"]["rows"] == 12
    assert cine["status"] == "ok" and cine["counts"]["overlay_frames"] == 12  # still written
    assert len(pd.read_csv(out / "predictions.csv")) == 24


@pytest.mark.slow
def test_max_frames_before_the_cut_reads_no_further(busi_seg_head, shared_data, tmp_path):
    case = mp4_faststart_cut(shared_data, tmp_path)
    out = tmp_path / "pred"
    argv = ["predict", "--inputs+", str(case.file), "--model", str(busi_seg_head)]
    argv += ["--out", str(out), "--max_frames", str(case.usable), "--progress", "false"]
    assert cli(argv) == 0  # every frame asked for is there
    (entry,) = json.loads((out / "summary.json").read_text())["sources"]
    assert entry["status"] == "ok" and entry["counts"]["declared"] == case.usable


# --- the app opens only what was uploaded (issue 22.3)

PLUS = "corpus/plus/TestImages"


@dataclass
class AppRow:
    id: str
    do: str
    """upload FILE | get HOST | post ORIGIN | cli ARGS | budget W H FRAMES | start | stop SIG"""
    expect: int
    """HTTP status, or exit code (cli, stop), or 0 for a budget or a start that went right."""
    says: str = ""
    """Text the answer (its detail, the error line, the stop line) must hold."""
    options: dict = field(default_factory=dict)
    """AppConfig fields of the app under test."""


APP_ROWS = [
    # -- references outside the upload, found by parsing the whole header
    AppRow(
        "NRRD header over 4 KB ending with data file: /etc/passwd",
        "upload nrrd_data_file",
        415,
        "refers to data outside the upload (data file: /etc/passwd)",
    ),
    AppRow("NRRD data file LIST", "upload nrrd_list", 415, "(data file: LIST)"),
    AppRow(
        "NRRD printf-style data file",
        "upload nrrd_pattern",
        415,
        "(data file: /etc/slice%03d.raw 1 4 1)",
    ),
    AppRow(
        "MetaImage header over 4 KB ending with ElementDataFile = /etc/passwd",
        "upload mha_data_file",
        415,
        "refers to data outside the upload (ElementDataFile = /etc/passwd)",
    ),
    AppRow("MetaImage ElementDataFile = LIST", "upload mha_list", 415, "(ElementDataFile = LIST)"),
    AppRow("NIfTI pair header (ni1)", "upload nifti_pair", 415, "(NIfTI pair: voxels in"),
    AppRow(
        "DICOM naming another file (ReferencedFileID)",
        "upload dicom_referenced_file",
        415,
        "(ReferencedFileID = ",
    ),
    AppRow(
        "a real PLUS sequence with a 15 KB header is accepted",
        "upload plus_sequence",
        201,
        "itk",
    ),
    AppRow("a NRRD with its data attached is accepted", "upload nrrd_attached", 201, "itk"),
    # -- the pixel budget, from the header, before decoding
    AppRow(
        "JPEG DICOM with one 16384 x 16384 frame (3 MB)",
        "upload dicom_16384",
        413,
        "16384 x 16384 = 268,435,456 pixels per frame, more than --max_frame_pixels 16,777,216",
    ),
    AppRow(
        "DICOM declaring 64 x 64 over a 16384 x 16384 JPEG",
        "upload dicom_16384_as_64",
        415,
        "frame 0's codestream is 16384 x 16384, not the 64 x 64",
    ),
    AppRow(
        "PNG over --max_frame_pixels",
        "upload busi_png",
        413,
        "558 x 471 = 262,818 pixels per frame, more than --max_frame_pixels 100,000",
        {"max_frame_pixels": 100_000},
    ),
    AppRow(
        "mp4 over --max_pixels",
        "upload lung_mp4",
        413,
        "350 x 350 x 100 frames = 12,250,000 pixels, more than --max_pixels 10,000,000",
        {"max_pixels": 10_000_000},
    ),
    AppRow(
        "MetaImage sequence over --max_pixels",
        "upload plus_sequence",
        413,
        "820 x 616 x 21 frames",
        {"max_pixels": 10_000_000},
    ),
    AppRow("a 1024 x 1024 cine of 1000 frames is within the defaults", "budget 1024 1024 1000", 0),
    AppRow(
        "a 16384 x 16384 frame is not",
        "budget 16384 16384 1",
        413,
        "more than --max_frame_pixels",
    ),
    # -- DNS rebinding and other sites' pages
    AppRow(
        "Host evil.example under --host 0.0.0.0",
        "get evil.example",
        400,
        "Invalid host header",
        {"host": "0.0.0.0"},
    ),
    AppRow(
        "Host evil.example under --host 127.0.0.2",
        "get evil.example",
        400,
        "Invalid host header",
        {"host": "127.0.0.2"},
    ),
    AppRow("the bind address is a host", "get 127.0.0.2", 200, '"models"', {"host": "127.0.0.2"}),
    AppRow(
        "--allowed_hosts admits a name",
        "get scanner.ward.example",
        200,
        '"models"',
        {"host": "0.0.0.0", "allowed_hosts": ["scanner.ward.example"]},
    ),
    AppRow(
        "--allowed_hosts admits that name only",
        "get evil.example",
        400,
        "Invalid host header",
        {"host": "0.0.0.0", "allowed_hosts": ["scanner.ward.example"]},
    ),
    AppRow(
        "a page of another site posts with our header",
        "post http://evil.example",
        403,
        "request from http://evil.example refused",
    ),
    # -- options checked before binding, stale folders, a clean stop
    AppRow(
        "--port 99999",
        "cli --port 99999",
        2,
        "sonodistill app: error: --port 99999: must be >= 0 and <= 65535",
    ),
    AppRow(
        "--allowed_hosts '*' would turn the check off",
        "cli --allowed_hosts+ *",
        2,
        "--allowed_hosts *: must be a host name, an address or *.domain",
    ),
    AppRow(
        "--max_pixels 0",
        "cli --max_pixels 0",
        2,
        "--max_pixels 0: must be > 0",
    ),
    AppRow(
        "temp folder of a killed app cleared at start, a live app's kept",
        "start",
        0,
        "stale: removed; live: kept",
    ),
    pytest.param(
        AppRow(
            "SIGTERM with an upload in flight",
            "stop SIGTERM",
            0,
            "sonodistill app: stopped (SIGTERM); 1 upload(s) in progress dropped",
        ),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        AppRow(
            "SIGINT with an upload in flight",
            "stop SIGINT",
            130,
            "sonodistill app: stopped (SIGINT); 1 upload(s) in progress dropped",
        ),
        marks=pytest.mark.slow,
    ),
]


@pytest.fixture(scope="module")
def head_models(tmp_path_factory) -> Path:
    """A folder holding one untrained ResNet-18 U-Net head (no row looks at its masks)."""
    import torch

    from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, save_head

    spec = HeadSpec(
        task_type="seg",
        encoder="random:resnet18",
        num_classes=2,
        class_names=["background", "lesion"],
        image_size=64,
    )
    torch.manual_seed(0)
    models = tmp_path_factory.mktemp("fault_models")
    save_head(build_head_model(spec).eval(), spec, models / "r18" / "head")
    return models


@functools.cache
def _jpeg_dicom(size: int, rows: int) -> bytes:
    """A JPEG baseline DICOM whose frame is size x size, mostly black (3 MB at 16384), and
    whose header declares rows x rows."""
    from PIL import Image, ImageDraw
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    image = Image.new("L", (size, size))
    ImageDraw.Draw(image).rectangle((100, 100, 300, 300), fill=200)
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=50)
    del image
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "US", rows, rows, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dicom_referencing(data: Path) -> bytes:
    """The real RGB DICOM with a ReferencedFileID nested in a sequence item."""
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(data / "corpus/dicom/examples_rgb_color.dcm")
    item = Dataset()
    item.ReferencedFileID = ["ETC", "PASSWD"]
    ds.ReferencedImageSequence = [item]
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _nrrd_attached(data: Path, tmp: Path) -> bytes:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data / PLUS / "SpinePhantomFreehandReconstructed.mha"))
    sitk.WriteImage(image, str(tmp / "volume.nrrd"), useCompression=True)
    return (tmp / "volume.nrrd").read_bytes()


def _nifti_pair() -> bytes:
    import nibabel as nib
    import numpy as np

    return nib.Nifti1Pair(np.zeros((4, 4, 2), np.uint8), np.eye(4)).header.binaryblock


NRRD = b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 8 4\nencoding: raw\n"
MHA = b"ObjectType = Image\nNDims = 2\nDimSize = 8 4\nElementType = MET_UCHAR\n"
PADDING = b"".join(
    b"# a comment line to push the field past 4096 bytes %03d\n" % i for i in range(90)
)
MHA_PADDING = PADDING.replace(b"# a comment", b"Comment = a")
UPLOADS = {
    "nrrd_data_file": lambda data, tmp: NRRD + PADDING + b"data file: /etc/passwd\n",
    "nrrd_list": lambda data, tmp: NRRD + b"data file: LIST\n/etc/passwd\n/etc/hostname\n",
    "nrrd_pattern": lambda data, tmp: NRRD + b"data file: /etc/slice%03d.raw 1 4 1\n",
    "mha_data_file": lambda data, tmp: MHA + MHA_PADDING + b"ElementDataFile = /etc/passwd\n",
    "mha_list": lambda data, tmp: MHA + b"ElementDataFile = LIST\n/etc/passwd\n",
    "nifti_pair": lambda data, tmp: _nifti_pair(),
    "dicom_referenced_file": lambda data, tmp: _dicom_referencing(data),
    "plus_sequence": lambda data, tmp: (data / PLUS / "BoneUltrasound_L14.igs.mha").read_bytes(),
    "nrrd_attached": _nrrd_attached,
    "dicom_16384": lambda data, tmp: _jpeg_dicom(16384, 16384),
    "dicom_16384_as_64": lambda data, tmp: _jpeg_dicom(16384, 64),
    "busi_png": lambda data, tmp: (data / BUSI / "benign" / "benign (3).png").read_bytes(),
    "lung_mp4": lambda data, tmp: (data / VIDEOS / "patient_10_L1.mp4").read_bytes(),
}


def _running_app(models: Path, work: Path, **options):
    """The app in a thread. It binds --host when that is this machine (127.0.0.2), else
    127.0.0.1: under 0.0.0.0 only the Host rule matters, not who can reach the socket."""
    host = options.get("host", "127.0.0.1")
    return running_app(models, work, host if host.startswith("127.") else "127.0.0.1", **options)


def _request(app, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(app.address, app.port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _app_answer(row: AppRow, models: Path, tmp: Path, data: Path, monkeypatch) -> tuple[int, str]:
    action, _, arg = row.do.partition(" ")
    work = tmp / "work"
    if action == "upload":
        body = UPLOADS[arg](data, tmp)
        decoded = []
        if row.expect != 201:  # any decoding is a failure: the header alone must refuse it
            import pydicom.pixels

            from sonodistill.deploy.app import sessions

            fail = lambda *a, **k: decoded.append(a) or iter(())  # noqa: E731
            monkeypatch.setattr(sessions, "read_frames", fail)
            monkeypatch.setattr(pydicom.pixels, "iter_pixels", fail)
        with _running_app(models, work, **row.options) as app:
            headers = {"X-Sonodistill": "1"}
            status, text = _request(app, "POST", "/api/sessions?model=m0&name=f", body, headers)
            state = app.state
            if status == 201:
                info = json.loads(text)
                _request(app, "DELETE", f"/api/sessions/{info['id']}", headers=headers)
                return status, info["kind"]
            assert state.sessions == {} and decoded == []  # nothing decoded, nothing to serve
            assert _files(work) == []  # the refused upload is gone
        return status, json.loads(text)["detail"]
    if action in ("get", "post"):
        with _running_app(models, work, **row.options) as app:
            if action == "get":
                return _request(app, "GET", "/api/models", headers={"Host": arg})
            headers = {"X-Sonodistill": "1", "Origin": arg}
            png = (data / BUSI / "benign" / "benign (3).png").read_bytes()
            status, text = _request(app, "POST", "/api/sessions?model=m0", png, headers)
            assert app.state.sessions == {}
            return status, text
    if action == "cli":
        from sonodistill.deploy.app import server

        # A check that lets the option through must fail the row, not serve forever.
        monkeypatch.setattr(server._Server, "run", lambda self, sockets=None: None)
        argv = ["app", "--models+", str(models), "--work_dir", str(work), "--port", "0"]
        return _cli([*argv, *arg.split()])
    if action == "budget":
        from sonodistill.data.headers import Declared, TooLarge, check_pixel_budget
        from sonodistill.deploy.app.server import AppConfig

        cfg = AppConfig()
        w, h, frames = map(int, arg.split())
        try:
            check_pixel_budget(
                Declared(w, h, frames), cfg.max_frame_pixels, cfg.max_pixels, cfg.max_frames
            )
        except TooLarge as exc:
            return 413, str(exc)
        return 0, ""
    if action == "start":
        return _start(models, work)
    if action == "stop":
        return _stop(models, work, getattr(signal, arg))
    raise ValueError(row.do)


def _cli(argv: list[str]) -> tuple[int, str]:
    """`sonodistill ARGV` in-process: (exit code, stderr), which must be one line."""
    from contextlib import redirect_stderr

    from sonodistill.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    return code, lines[0]


def _start(models: Path, work: Path) -> tuple[int, str]:
    """A killed app's folder (its process is gone) and a live one's, then an app starts."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = work / f"sonodistill-app-{gone.pid}-k9k9k9k9" / "s-1234"
    live = work / f"sonodistill-app-{os.getpid()}-a1a1a1a1" / "s-5678"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / ".upload.partial.tmp").write_bytes(b"\x89PNG half an upload")
    with _running_app(models, work):
        pass
    answer = (
        f"stale: {'kept' if stale.parent.exists() else 'removed'}; "
        f"live: {'kept' if live.parent.exists() else 'removed'}"
    )
    return 0, answer


def _stop(models: Path, work: Path, sig: signal.Signals) -> tuple[int, str]:
    """A real `sonodistill app` process stopped by `sig` while an upload is arriving: a quiet
    stop (no traceback; exit 0 after SIGTERM, 130 after Ctrl-C), the partial upload gone, the
    client told (503)."""
    cmd = [sys.executable, "-m", "sonodistill.cli", "app", "--models+", str(models)]
    cmd += ["--port", "0", "--work_dir", str(work)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        first = process.stdout.readline()
        port = int(re.search(r":(\d+)/$", first.strip())[1])
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(
            b"POST /api/sessions?model=m0 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sonodistill: 1\r\n"
            b"Content-Length: 1000000\r\n\r\n\x89PNG" + bytes(5000)
        )
        for _ in range(300):  # until the partial upload is on disk
            if _files(work):
                break
            time.sleep(0.05)
        assert _files(work), "the upload never started"
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        reply = client.recv(4096).decode("latin-1")
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in err and "ERROR" not in err, err
    assert reply.startswith("HTTP/1.1 503") and "the app is stopping" in reply
    assert list(work.iterdir()) == []  # the partial upload and the app's folder are gone
    return process.returncode, out.strip().splitlines()[-1]


@pytest.mark.parametrize("row", APP_ROWS, ids=lambda r: r.id)
def test_the_app_opens_only_what_was_uploaded(row, head_models, shared_data, tmp_path, monkeypatch):
    code, text = _app_answer(row, head_models, tmp_path, shared_data, monkeypatch)
    assert code == row.expect, text
    assert row.says in text


# --- one error path, nothing left behind (issue 22.4-5)

BENCH = (
    "bench --teacher '{{family: dinov3, weights: random, model_kwargs: "
    + TEACHER.replace("{", "{{").replace("}", "}}")
    + "}}' --student random:test_resnet --image_size 32 --warmup 0 --runs 1 "
    "--backends [torch_fp32] --gpu off --out {tmp}/bench"
)
EMBED = (
    "embed --sources+ ddti={mini}/images --encoders [random:test_resnet] --max_per_source 2 "
    "--image_size 32 --out {tmp}/embed"
)
AUDIT = EVALUATE.replace("evaluate ", "evaluate audit ", 1)
PREDICT = "predict --inputs+ {mini}/images --model {head} --out {tmp}/predict"
OUTPUTS = {  # every command, its output option at {OUT}, and what it needs first
    "corpus build": (CORPUS.replace("{tmp}/corpus", "{OUT}"), "sources"),
    "corpus pack": ("corpus pack {tmp}/corpus --out {OUT}", "corpus"),
    "corpus check-leakage": (
        "corpus check-leakage {tmp}/corpus --against+ ddti={mini}/images --report {OUT}/p.csv",
        "corpus",
    ),
    "distill": (DISTILL.replace("{tmp}/run", "{OUT}"), ""),
    "evaluate": (EVALUATE.replace("{tmp}/suite", "{OUT}"), ""),
    "evaluate audit": (AUDIT.replace("{tmp}/suite", "{OUT}"), ""),
    "embed": (EMBED.replace("{tmp}/embed", "{OUT}"), ""),
    "analyze": ("analyze --embeddings {embeddings} --out {OUT}", ""),
    "export": (EXPORT.replace("{tmp}/export", "{OUT}"), ""),
    "bench": (BENCH.replace("{tmp}/bench", "{OUT}"), ""),
    "predict": (PREDICT.replace("{tmp}/predict", "{OUT}"), ""),
    "demo": ("demo --out {OUT}", ""),
    "report": ("report {run} --out {OUT}/report.html", ""),
}


def nan_from_the_first_step(monkeypatch) -> None:
    real_step = recipe_module.train_step

    def diverging(*args, **kwargs):
        loss, metrics = real_step(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(recipe_module, "train_step", diverging)


def nan_gradients_from_the_first_step(monkeypatch) -> None:
    """A loss, and so every gradient, not finite: what the gradient clip sees."""
    real_step = recipe_module.train_step

    def diverging(fabric, teacher, student, augment, objective, *args, **kwargs):
        def nan_objective(pred, target):
            loss, metrics = objective(pred, target)
            return loss * float("nan"), metrics

        return real_step(fabric, teacher, student, augment, nan_objective, *args, **kwargs)

    monkeypatch.setattr(recipe_module, "train_step", diverging)


ONE_ERROR_PATH = [
    # -- an output that cannot be written: the one line names it, in every command
    *(
        Row(
            f"{name} --out a file",
            argv.replace("{OUT}", "{tmp}/file"),
            ("cannot write {tmp}/file", "a file is in the way of the folder"),
            f"{needs} file",
        )
        for name, (argv, needs) in OUTPUTS.items()
        if name != "report"
    ),
    Row(
        "report --out a folder",
        "report {run} --out {tmp}/folder",
        ("cannot write {tmp}/folder: a folder is in the way",),
        "folder",
    ),
    Row(
        "distill --out below a file",
        DISTILL.replace("{tmp}/run", "{tmp}/file/run"),
        ("cannot write {tmp}/file/run: a part of the path is a file",),
        "file",
    ),
    *(
        Row(
            f"{name} --out on a read-only file system",
            argv.replace("{OUT}", "{tmp}/ro/out"),
            ("cannot write {tmp}/ro/out",),
            f"{needs} read_only",
        )
        for name, (argv, needs) in OUTPUTS.items()
    ),
    # -- abbreviations, unknown options and misspelt keys: one line with the close match
    Row(
        "--overw true replaces no finished run",
        DISTILL + " --overw true",
        ("--overw: unknown option; did you mean --overwrite",),
        "run",
    ),
    Row(
        "--epoch 3 is not --epochs", DISTILL + " --epoch 3", ("--epoch: unknown option", "--epochs")
    ),
    Row(
        "corpus build --work 1",
        CORPUS + " --work 1",
        ("--work: unknown option", "--workers"),
        "sources",
    ),
    Row(
        "a misspelt nested flag",
        AUDIT + " --train.epoch 1",
        ("--train.epoch: unknown option; did you mean --train.epochs",),
    ),
    Row(
        "an unknown option without a close match",
        EXPORT + " --zzz 1",
        ("--zzz: unknown option; see sonodistill export --help",),
    ),
    Row(
        "exclud: in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: exclud: unknown key; did you mean exclude?",),
        "sources_exclud",
    ),
    Row(
        "a misspelt build setting in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: settings:", "'frames.max_per_clp': unknown option", "max_per_clip"),
        "sources_max_per_clp",
    ),
    Row(
        "a misspelt key of a source in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: source 'echo': anatomyy: unknown key; did you mean anatomy?",),
        "sources_anatomyy",
    ),
    Row(
        "a misspelt nested key in a --config YAML",
        DISTILL + " --config {tmp}/lrr.yaml",
        ("--config {tmp}/lrr.yaml: optim.lrr: unknown key; did you mean optim.lr",),
        "config_lrr",
    ),
    Row(
        "a misspelt top-level key in a --config YAML",
        DISTILL + " --config {tmp}/epoch.yaml",
        ("--config {tmp}/epoch.yaml: epoch: unknown key; did you mean epochs",),
        "config_epoch",
    ),
    Row(
        "a misspelt subcommand",
        "corpus biuld {tmp}/sources.yaml",
        ("'biuld': unknown command; did you mean build?",),
    ),
    Row("a misspelt evaluate audit", AUDIT.replace("audit", "audt"), ("'audt'", "audit?")),
    Row("a word for a number", DISTILL + " --batch_size eight", ("--batch_size eight",)),
    Row(
        "a choice not offered",
        DISTILL + " --augment usx",
        ("--augment usx: unknown augmentation policy; did you mean us?",),
    ),
    # -- numbers out of range, in every command, before anything is written
    Row(
        "distill val fraction 1", DISTILL + " --val_fraction 1", ("--val_fraction 1: must be >= 0",)
    ),
    Row(
        "distill beta 1",
        DISTILL + " --optim.betas [0.9,1]",
        ("--optim.betas 1: must be >= 0 and < 1",),
    ),
    Row("distill 0 teacher blocks", DISTILL + " --teacher.n_blocks 0", ("--teacher.n_blocks 0",)),
    Row(
        "distill prefetch 0",
        DISTILL + " --prefetch_factor 0",
        ("--prefetch_factor 0: must be > 0",),
    ),
    Row(
        "corpus content fraction 2",
        CORPUS + " --frames.min_content 2",
        ("--frames.min_content 2: must be >= 0 and <= 1",),
        "sources",
    ),
    Row(
        "corpus workers 0 in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: settings: workers 0: must be > 0",),
        "sources_workers_0",
    ),
    Row(
        "a source's clip cap -1 in sources.yaml",
        CORPUS,
        ("{tmp}/sources.yaml: source 'echo': frames.max_per_clip -1: must be >= 0",),
        "sources_max_per_clip_negative",
    ),
    Row(
        "check-leakage near_duplicate 0",
        "corpus check-leakage {corpus} --against+ ddti={mini}/images --near_duplicate 0",
        ("--near_duplicate 0: must be > 0",),
    ),
    Row("evaluate fraction 0", EVALUATE + " --fractions [1,0]", ("--fractions 0: must be > 0",)),
    Row("evaluate 1 fold", EVALUATE + " --folds 1", ("--folds 1: must be == 0 or >= 2",)),
    Row("evaluate seed -2", EVALUATE + " --seeds [0,-2]", ("--seeds -2: must be >= 0",)),
    Row("evaluate lr 0", EVALUATE + " --train.lr 0", ("--train.lr 0: must be > 0",)),
    Row(
        "evaluate a misspelt protocol",
        EVALUATE.replace("[linear]", "[linaer]"),
        ("--protocols linaer: unknown protocol; did you mean linear?",),
    ),
    Row(
        "evaluate an unknown decoder",
        EVALUATE + " --train.seg_decoder unet2",
        ("--train.seg_decoder unet2: unknown segmentation decoder; did you mean unet?",),
    ),
    Row(
        "evaluate precision 32-true",
        EVALUATE + " --train.precision 32-true",
        ("--train.precision 32-true: must be one of 'auto', 'fp32', 'bf16'",),
    ),
    Row(
        "evaluate a misspelt dataset key",
        EVALUATE.replace("format: seg_folder", "fromat: seg_folder"),
        ("--datasets: fromat: unknown key; did you mean format",),
    ),
    Row(
        "evaluate a classification layout for a segmentation task",
        EVALUATE.replace("format: seg_folder", "format: cls_folder"),
        ("datasets.mini: format cls_folder holds cls tasks, not task_type seg",),
    ),
    Row("embed device gpu", EMBED + " --device gpu", ("--device gpu: must be auto, cpu",)),
    Row("export opset 99", EXPORT + " --opset 99", ("--opset 99: must be >= 7 and <= 23",)),
    Row("export tolerance -1", EXPORT + " --tolerance -1", ("--tolerance -1: must be > 0",)),
    Row("bench runs 0", BENCH + " --runs 0", ("--runs 0: must be > 0",)),
    Row("predict threshold 1", PREDICT + " --threshold 1", ("--threshold 1: must be > 0 and < 1",)),
    Row("predict 0 frames", PREDICT + " --max_frames 0", ("--max_frames 0: must be > 0",)),
    Row("embed batch 0", EMBED + " --batch_size 0", ("--batch_size 0: must be > 0",)),
    Row(
        "analyze 10 t-SNE steps",
        "analyze --embeddings {embeddings} --tsne_iter 10",
        ("--tsne_iter 10: must be >= 250",),
    ),
    Row("demo 0 bench runs", "demo --out {tmp}/demo --bench_runs 0", ("--bench_runs 0",)),
    # -- messages name only options the command has, and what exists
    Row(
        "export over an export offers no --resume",
        EXPORT,
        ("already holds a sonodistill export run", "--overwrite true"),
        "export",
        lacks=("--resume",),
    ),
    Row(
        "pack over a pack offers no --resume",
        "corpus pack {tmp}/corpus --out {tmp}/pack",
        ("already holds a sonodistill corpus pack run", "--overwrite true"),
        "corpus pack",
        lacks=("--resume",),
    ),
    Row(
        "predict over predictions offers no --resume",
        PREDICT,
        ("{tmp}/predict already holds a sonodistill predict run", "--overwrite true"),
        "predictions",
        lacks=("--resume",),
    ),
    Row(
        "predict over a stopped predict offers no --resume",
        PREDICT,
        ("already holds a sonodistill predict run (.partial)", "--overwrite true"),
        "partial",
        lacks=("--resume",),
    ),
    Row(
        "--conf is not --config", EXPORT + " --conf x.yaml", ("--conf: unknown option", "--config")
    ),
    Row(
        "a garbage checkpoint is called what it is",
        RESUME,
        (
            "no readable checkpoint",
            "last.pt: empty (0 bytes)",
            "previous.pt: damaged, or not a checkpoint of sonodistill distill",
        ),
        "run_broken_checkpoints",
        lacks=("weights_only", "torch.load"),
    ),
    Row(
        "a loss not finite from the first step claims no checkpoint",
        DISTILL + " --max_steps 2",
        ("not finite (nan or inf) at step 1", "no checkpoint was saved"),
        creates="run",  # config and logs: the run had started
        lacks=("(step 0)", "is kept"),
        fault=nan_from_the_first_step,
    ),
    Row(
        "a loss not finite with gradient clipping is the same message, not Fabric's error",
        DISTILL + " --max_steps 2 --optim.grad_clip 1.0",
        ("not finite (nan or inf) at step 1", "no checkpoint was saved"),
        creates="run",
        lacks=("RuntimeError", "error_if_nonfinite", "total norm"),
        fault=nan_gradients_from_the_first_step,
    ),
    # -- a run that fails its input checks writes nothing
    Row(
        "distill on only unreadable images",
        DISTILL.replace("{frames}", "{tmp}/cut"),
        ("--data {tmp}/cut: no readable image among the 27 training images",),
        "unreadable_frames",
    ),
    Row(
        "export on unreadable frames",
        EXPORT.replace("ddti={data}/ddti/image", "cut={tmp}/cut"),
        ("{tmp}/cut/", "image file is truncated"),
        "unreadable_frames",
    ),
    Row(
        "embed on unreadable frames",
        EMBED.replace("ddti={mini}/images", "cut={tmp}/cut"),
        ("{tmp}/cut/", "image file is truncated"),
        "unreadable_frames",
    ),
    Row(
        "analyze a model without embeddings",
        "analyze --embeddings {embeddings} --models [tst] --out {tmp}/analysis",
        ("--models tst: unknown model",),
    ),
]
if not torch.cuda.is_available():
    ONE_ERROR_PATH.append(
        Row(
            "bench --gpu on without CUDA", BENCH + " --gpu on", ("--gpu on: CUDA is not available",)
        )
    )


def prepare_faults(kinds: str, tmp: Path, sources: Path) -> None:
    """What this section's rows prepare beside `conftest.prepare`."""
    echo = yaml.safe_load(sources.read_text())["sources"]
    files = {
        "sources_exclud": {"sources": echo, "exclud": [{"name": "ddti", "path": str(tmp)}]},
        "sources_max_per_clp": {"sources": echo, "settings": {"frames": {"max_per_clp": 3}}},
        "sources_anatomyy": {"sources": [{**echo[0], "anatomyy": "heart"}]},
        "sources_workers_0": {"sources": echo, "settings": {"workers": 0}},
        "sources_max_per_clip_negative": {"sources": [{**echo[0], "frames": {"max_per_clip": -1}}]},
    }
    for kind in kinds.split():
        if kind in files:
            (tmp / "sources.yaml").write_text(yaml.safe_dump(files[kind]))
        if kind == "config_lrr":
            (tmp / "lrr.yaml").write_text("optim:\n  lrr: 0.1\n")
        if kind == "config_epoch":
            (tmp / "epoch.yaml").write_text("epoch: 3\n")
        if kind == "pack":
            (tmp / "pack").mkdir()
            (tmp / "pack/pack.json").write_text("{}")
        if kind == "partial":  # what a killed predict leaves
            (tmp / "predict/.partial").mkdir(parents=True)
        if kind == "predictions":
            (tmp / "predict").mkdir()
            (tmp / "predict/predictions.csv").write_text("source,frame\n")


@pytest.mark.parametrize("row", ONE_ERROR_PATH, ids=[r.id for r in ONE_ERROR_PATH])
def test_one_error_path(row, tmp_path, request, cli_inputs):
    prepare_faults(row.setup, tmp_path, cli_inputs["sources"])
    assert_refused(row, tmp_path, request)


def test_every_command_is_in_the_table():
    from sonodistill.cli import COMMANDS

    commands = {name.split()[0] for name in COMMANDS}
    assert {name.split()[0] for name in OUTPUTS} == commands - {"app", "registry"}  # no outputs


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.EROFS, "cannot write {}: read-only file system"),
        (errno.EACCES, "cannot write {}: permission denied"),  # a user's 0o555 folder
        (errno.EEXIST, "cannot write {}: a file is in the way of the folder"),
        (errno.ENOTDIR, "cannot write {}: a part of the path is a file"),
        (errno.EISDIR, "cannot write {}: a folder is in the way of the file"),
        (errno.ENOSPC, "disk full: cannot write {}"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_naming_it(code, says, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_os_open, real_io_open = os.open, io.open

    def refused(path) -> bool:
        return Path(os.fsdecode(path)).is_relative_to(out)

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_os_open(path, flags, *args, **kwargs)

    def io_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and refused(path) and "w" in mode:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_io_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    claim = pytest.raises(UserError, match=re.escape(says.format(out)))
    with claim, lock_run_dir(out, "test"):  # a run folder's claim
        pass
    assert not out.exists()
    out.mkdir()
    with pytest.raises(UserError, match=re.escape(says.format(out / "a.json"))):  # a result
        sio.write_json(out / "a.json", {})
    assert list(out.iterdir()) == []
    # An input the writer reads is not the output: its error stays its own.
    with pytest.raises(PermissionError), sio.atomic_path(tmp_path / "b.bin"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.png"))


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (each process's parent is field 4 of its stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_a_two_worker_corpus_build_leaves_no_process_behind(shared_data, tmp_path):
    sources = tmp_path / "sources.yaml"
    clips = shared_data / VIDEOS / "*.mp4"  # 150 clips: minutes of work for two workers
    sources.write_text(yaml.safe_dump({"sources": [{"dataset": "lung", "path": str(clips)}]}))
    argv = ["corpus", "build", str(sources), "--out", str(tmp_path / "c"), "--workers", "2"]
    code = "import sys; from sonodistill.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    build = subprocess.Popen([sys.executable, "-c", code, *argv, "--quiet", "true"], env=env)
    pool: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the forkserver, its two workers, the tracker
            pool = descendants(build.pid)
            if len(pool) >= 4 and list((tmp_path / "c" / "parts").rglob("*.parquet")):
                break
            time.sleep(0.2)
        assert len(pool) >= 4, f"the build's pool never started: {pool}"
        os.kill(build.pid, signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(map(alive, pool)):
            time.sleep(0.2)
        assert not [pid for pid in pool if alive(pid)], "left behind after kill -9"
    finally:
        build.kill()
        for pid in filter(alive, pool):  # what a failed test leaves: by PID, nothing else
            os.kill(pid, signal.SIGKILL)
