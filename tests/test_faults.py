"""Fault and attack tables of issue 22: each case a damaged or hostile input made from a real file
of ../shared/data, and the outcome every command must give for it (exit code, one line, what is
written and what is failed, the counts)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from conftest import BUSI, VIDEOS

from sonodistill.cli import main as cli
from sonodistill.data.readers import ReadError, TruncatedFile, frame_count, read_frames

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
