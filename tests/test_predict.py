"""`sonodistill predict` on real files: a lung-ultrasound mp4, the multi-frame DICOM cine
(YBR, JPEG), a BUSI image folder and a PLUS 2D+t sequence; backends PyTorch, ONNX Runtime int8
and ExecuTorch int8 on a briefly fine-tuned U-Net; geometry from headers; temporal smoothing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import av
import numpy as np
import pydicom
import pytest
import timm
import torch
from conftest import BUSI
from PIL import Image

from sonodistill.cli import main as cli
from sonodistill.data.geometry import read_geometry
from sonodistill.deploy.export import ExportConfig, export
from sonodistill.deploy.pipeline import (
    FramePredictor,
    dice_pair,
    label_map,
    overlay,
    upsample,
)
from sonodistill.deploy.predict import PredictConfig, predict
from sonodistill.deploy.runtimes import open_model_folder
from sonodistill.evaluate.head_checkpoint import HeadSpec, save_head

pytestmark = pytest.mark.usefixtures("one_thread")

LUNG = "corpus/covid_blues/lus_videos/patient_10_L1.mp4"
CINE = "corpus/dicom/examples_ybr_color.dcm"
SEQUENCE = "corpus/plus/TestImages/UltrasonixCurvilinearScanConvertedData.igs.mha"


@pytest.fixture(scope="module")
def busi_export(busi_seg_head, shared_data, tmp_path_factory):
    """`sonodistill export --model` with ONNX fp32/int8 and ExecuTorch fp32/int8, calibrated on
    BUSI and lung frames: every backend."""
    out = tmp_path_factory.mktemp("busi_export")
    export(
        ExportConfig(
            model=str(busi_seg_head),
            out=str(out),
            image_size=64,
            n_calib=8,
            n_check=4,
            backends=["ort_fp32", "ort_int8", "executorch_fp32", "executorch_int8"],
            threads=1,
            frames=[f"busi={shared_data / BUSI}", f"lung={shared_data / LUNG}"],
        )
    )
    return out


@pytest.fixture
def busi_folder(shared_data, tmp_path):
    """Eight BUSI lesion images with their masks (links), the layout BUSI ships in."""
    folder = tmp_path / "busi_subset"
    folder.mkdir()
    for name in [f"benign ({i})" for i in range(1, 7)] + ["malignant (1)", "malignant (2)"]:
        cls = name.split(" ")[0]
        for f in (shared_data / BUSI / cls).glob(f"{name}*.png"):
            (folder / f.name).symlink_to(f)
    return folder


def _rows(out):
    with open(out / "predictions.csv") as fh:
        return list(csv.DictReader(fh))


def test_predict_lung_mp4_dicom_cine_and_busi_folder_int8_agrees_with_torch(
    busi_export, busi_folder, shared_data, tmp_path
):
    out = tmp_path / "pred"
    summary = predict(
        PredictConfig(
            inputs=[str(shared_data / LUNG), str(shared_data / CINE), str(busi_folder)],
            model=str(busi_export),
            backend="ort_int8",
            out=str(out),
            max_frames=12,
            check_torch=True,
            progress=False,
        )
    )

    rows = _rows(out)
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert len(by_source["patient_10_L1"]) == 12  # max_frames
    assert len(by_source["examples_ybr_color"]) == 12
    busi = [r for name, rs in by_source.items() if name.startswith("busi_subset/") for r in rs]
    assert len(busi) == 8 and not any("mask" in r["source"] for r in rows)  # masks skipped
    # Time from the container (25 fps) and from the DICOM FrameTime (33.333 ms).
    assert [float(r["time_s"]) for r in by_source["patient_10_L1"][:3]] == [0.0, 0.04, 0.08]
    assert float(by_source["examples_ybr_color"][3]["time_s"]) == pytest.approx(0.1, abs=1e-3)
    assert {r["height"] + "x" + r["width"] for r in by_source["examples_ybr_color"]} == {"240x320"}
    for row in rows:  # probabilities and areas are real numbers in range
        assert 0.0 <= float(row["p_lesion"]) <= 1.0 and int(row["area_px"]) >= 0
        assert float(row["model_ms"]) > 0

    # The fine-tuned head finds lesions in BUSI images: non-trivial masks, so that the
    # agreement is not that of empty masks. On them int8 and PyTorch masks agree (Dice pooled
    # over all pixels, and per image for masks of >= 1% of the image).
    def pixels(r):
        return int(r["height"]) * int(r["width"])

    lesions = [r for r in busi if int(r["area_px_torch"]) >= 0.01 * pixels(r)]
    assert len(lesions) >= 4 and all(int(r["area_px_torch"]) < 0.8 * pixels(r) for r in busi)
    assert np.mean([float(r["agree_torch"]) for r in lesions]) >= 0.95
    both = sum(int(r["area_px"]) + int(r["area_px_torch"]) for r in busi)
    inter = sum(
        float(r["agree_torch"]) * (int(r["area_px"]) + int(r["area_px_torch"])) for r in busi
    )
    assert inter / both >= 0.95
    # Over every frame (lung and heart frames are far from what it learned: less sure, so
    # int8 flips more pixels) the agreement is reported; it stays high.
    agree = summary["agreement_with_torch"]
    assert agree["frames"] == len(rows) == 32
    assert 0.8 <= agree["pooled"] <= 1.0 and 0.0 <= agree["min"] <= agree["mean"] <= 1.0
    assert all(0.0 <= float(r["agree_torch"]) <= 1.0 for r in rows)

    # Masks: one per frame, binary, at the frame's size; overlays: an mp4 per clip, a png
    # per image.
    masks = sorted((out / "masks" / "examples_ybr_color").glob("*.png"))
    assert len(masks) == 12
    mask = np.asarray(Image.open(masks[0]).convert("L"))
    assert mask.shape == (240, 320) and set(np.unique(mask)) <= {0, 255}
    assert (out / "masks" / "busi_subset" / "benign (1).png").is_file()
    assert (out / "overlays" / "busi_subset" / "malignant (2).png").is_file()
    for name, frames, size in [
        ("patient_10_L1", 12, (350, 350)),
        ("examples_ybr_color", 12, (320, 240)),
    ]:
        with av.open(str(out / "overlays" / f"{name}.mp4")) as video:
            stream = video.streams.video[0]
            assert (stream.codec_context.name, stream.width, stream.height) == ("h264", *size)
            assert sum(1 for _ in video.decode(stream)) == frames

    t = summary["timing"]
    assert t["frames"] == 32 and t["fps_end_to_end"] > 0
    assert all(t["ms_per_frame"][s] > 0 for s in ("decode", "preprocess", "model", "postprocess"))
    assert t["fps_model_only"] >= t["fps_end_to_end"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["backend"] == "ort_int8" and saved["environment"]["threads"] >= 1
    text = (out / "summary.md").read_text()
    assert "frames/s" in text and "Agreement with PyTorch" in text
    # The cine's region of physical units lies outside its resampled image: no mm^2, and why.
    cine = next(s for s in summary["sources"] if s["name"] == "examples_ybr_color")
    assert cine["spacing_mm"] is None and "outside" in cine["spacing_from"]
    assert all(r["area_mm2"] == "" for r in by_source["examples_ybr_color"])
    assert not list(tmp_path.glob(".pred.partial-*"))  # staging folder moved into place


# Every backend, the producer fast (no --check_torch): the overlay writer owns one container per
# source from first frame to last. The fast backends run the whole clip and cine; the slower
# ones 24 frames of each, still thrice the writer's queue.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "max_frames"),
    [
        ("ort_int8", None),
        ("executorch_int8", None),
        ("ort_fp32", 24),
        ("executorch_fp32", 24),
        ("torch", 24),
        ("torch_bf16", 24),
    ],
)
def test_overlay_videos_hold_every_frame_of_their_source(
    busi_export, shared_data, tmp_path, backend, max_frames
):
    out = tmp_path / "pred"
    summary = predict(
        PredictConfig(
            inputs=[str(shared_data / LUNG), str(shared_data / CINE)],
            model=str(busi_export),
            backend=backend,
            out=str(out),
            max_frames=max_frames,
            progress=False,
        )
    )
    with av.open(str(shared_data / LUNG)) as video:
        lung = video.streams.video[0].frames
    cine = int(pydicom.dcmread(shared_data / CINE, stop_before_pixels=True).NumberOfFrames)
    assert (lung, cine) == (100, 30)  # the real files: a clip and a cine longer than the queue
    rows = _rows(out)
    for entry, header in zip(summary["sources"], (lung, cine), strict=True):
        n = min(header, max_frames or header)
        name = entry["name"]
        with av.open(str(out / "overlays" / f"{name}.mp4")) as video:
            assert sum(1 for _ in video.decode(video=0)) == n, name  # decoded, not the header
        assert len(list((out / "masks" / name).glob("*.png"))) == n
        assert [int(r["frame"]) for r in rows if r["source"] == name] == list(range(n))
        assert entry["status"] == "ok" and entry["counts"] == {
            "declared": n,
            "decoded": n,
            "rows": n,
            "masks": n,
            "overlay_frames": n,
        }
    assert summary["failed"] == []


def test_predict_dicom_spacing_gives_mm2_and_no_patient_identifiers(
    busi_seg_head, shared_data, tmp_path
):
    ds = pydicom.dcmread(shared_data / CINE)
    ds.PixelSpacing = [0.2, 0.25]
    ds.PatientName = "SENTINELNAME^JANE"
    ds.PatientID = "SENTINEL-ID-7731"
    ds.PatientBirthDate = "19010203"
    dicom = tmp_path / "cine.dcm"
    ds.save_as(dicom)
    out = tmp_path / "pred"
    argv = f"predict --inputs+ {dicom} --model {busi_seg_head} --out {out} --max_frames 4"
    assert cli([*argv.split(), "--threshold", "0.2", "--progress", "false"]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and any(int(r["area_px"]) > 0 for r in rows)
    for row in rows:
        assert float(row["area_mm2"] or 0) == pytest.approx(int(row["area_px"]) * 0.05, abs=1e-3)
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"SENTINEL" not in data and b"19010203" not in data, path


def test_executorch_backend_runs_the_on_device_program(busi_export, shared_data, tmp_path):
    report = json.loads((busi_export / "report.json").read_text())
    assert report["models"]["executorch_int8"]["cosine_mean"] > 0.99
    folder = open_model_folder(busi_export)
    assert folder.backends == [
        "torch",
        "torch_bf16",
        "ort_fp32",
        "ort_int8",
        "executorch_fp32",
        "executorch_int8",
    ]
    assert folder.image_size == 64
    summary = predict(
        PredictConfig(
            inputs=[str(shared_data / CINE)],
            model=str(busi_export / "model_int8.pte"),  # a file: its backend by default
            out=str(tmp_path / "pred"),
            max_frames=6,
            threshold=0.2,
            check_torch=True,
            progress=False,
        )
    )
    assert summary["backend_label"] == "ExecuTorch XNNPACK int8"
    assert summary["timing"]["frames"] == 6 and summary["timing"]["ms_per_frame"]["model"] > 0
    assert summary["agreement_with_torch"]["pooled"] >= 0.9


def test_temporal_smoothing_steadies_masks_on_a_real_clip(busi_seg_head, shared_data, tmp_path):
    common = dict(
        inputs=[str(shared_data / LUNG)],
        model=str(busi_seg_head),
        max_frames=25,
        threshold=0.3,
        masks=False,
        overlays=False,
        progress=False,
    )
    plain = predict(PredictConfig(out=str(tmp_path / "a"), **common))
    smooth = predict(PredictConfig(out=str(tmp_path / "b"), smoothing=0.7, **common))
    assert plain["stability"]["smoothed"] is None and plain["stability"]["frame_pairs"] == 24
    assert smooth["stability"]["raw"] == pytest.approx(plain["stability"]["raw"])
    assert smooth["stability"]["smoothed"] > smooth["stability"]["raw"]
    assert "with smoothing 0.7" in (tmp_path / "b" / "summary.md").read_text()


def test_smoothing_is_an_ema_restarted_per_source():
    spec = HeadSpec(task_type="seg", num_classes=2)
    outputs = iter([np.full((1, 1, 2, 2), v, np.float32) for v in (0.0, 4.0, 4.0, 4.0)])
    predictor = FramePredictor(lambda x: next(outputs), spec, 2, smoothing=0.5)
    x = np.zeros((1, 1, 2, 2), np.float32)
    p0 = predictor(x)
    p1 = predictor(x)
    sig4 = 1 / (1 + np.exp(-4.0))
    assert p0.probs[0, 0, 0] == pytest.approx(0.5)
    assert p1.probs[0, 0, 0] == pytest.approx(0.5 * sig4 + 0.5 * 0.5)  # (1 - s) p + s p'
    assert p1.raw[0, 0, 0] == pytest.approx(sig4)
    predictor.reset()  # a new source starts from its own first frame
    assert predictor(x).probs[0, 0, 0] == pytest.approx(sig4)


def test_masks_overlay_and_dice_helpers():
    probs = np.zeros((3, 4, 4), np.float32)
    probs[0] = 1.0
    probs[:, :2, :2] = [[[0.1]], [[0.3]], [[0.6]]]  # foreground 0.9, class 2 wins
    labels = label_map(probs, 0.5)
    assert labels[0, 0] == 2 and labels[3, 3] == 0 and (labels > 0).sum() == 4
    assert label_map(probs, 0.95).max() == 0
    assert upsample(probs, 8, 8).shape == (3, 8, 8)
    assert dice_pair(labels, labels) == 1.0 and dice_pair(labels * 0, labels * 0) == 1.0
    assert dice_pair(labels, np.zeros_like(labels)) == 0.0
    frame = np.full((4, 4), 100, np.uint8)
    image = overlay(frame, labels, 0.5)
    assert image.shape == (4, 4, 3) and (image[3, 3] == 100).all()
    assert not (image[0, 0] == 100).all()  # tinted with class 2's colour


def test_sequence_and_classification_head(shared_data, tmp_path):
    # A 2D+t MetaImage (PLUS) through a plain timm classifier: class probabilities per frame,
    # times from the sequence's own timestamps.
    names = ["benign", "malignant", "normal"]
    spec = HeadSpec(
        task_type="cls", arch="resnet18", num_classes=3, class_names=names, image_size=64
    )
    torch.manual_seed(0)
    save_head(timm.create_model("resnet18", num_classes=3), spec, tmp_path / "cls")
    summary = predict(
        PredictConfig(
            inputs=[str(shared_data / SEQUENCE)],
            model=str(tmp_path / "cls"),
            out=str(tmp_path / "pred"),
            progress=False,
        )
    )
    rows = _rows(tmp_path / "pred")
    assert len(rows) == 5 and summary["task_type"] == "cls"
    for row in rows:
        p = [float(row[f"p_{n}"]) for n in names]
        assert sum(p) == pytest.approx(1.0, abs=1e-3) and row["predicted"] == names[np.argmax(p)]
    assert [float(r["time_s"]) for r in rows[:2]] == pytest.approx([0.0, 0.01], abs=1e-4)
    assert (
        tmp_path / "pred" / "overlays" / "UltrasonixCurvilinearScanConvertedData.igs.mp4"
    ).is_file()
    assert not (tmp_path / "pred" / "masks").exists()


def test_geometry_from_real_headers(shared_data):
    cine = read_geometry(shared_data / CINE)
    assert cine.frame_interval_s == pytest.approx(0.033333) and cine.spacing_mm is None
    assert read_geometry(shared_data / LUNG).frame_interval_s == pytest.approx(0.04)
    volume = read_geometry(
        shared_data / "corpus/plus/TestImages/SpinePhantomFreehandReconstructed.mha"
    )
    assert volume.spacing_mm == (0.5, 0.5) and volume.pixel_area_mm2 == 0.25
    sequence = read_geometry(shared_data / SEQUENCE)
    assert sequence.spacing_mm is None and "default" in sequence.spacing_from  # 1 x 1 mm
    assert sequence.timestamps_s[:3] == pytest.approx((0.0, 0.01, 0.02), abs=1e-6)
    assert sequence.interval_s == pytest.approx(0.01, abs=1e-6)  # median of the steps
    nifti = read_geometry(
        shared_data / "corpus/plus/nifti_derived/vtkVolumeReconstructorTestIMLiFvolumeRef.nii.gz"
    )
    assert nifti.spacing_mm == pytest.approx((0.1, 0.1))
    given = sequence.with_overrides(spacing_mm=(0.3, 0.3), fps=20)
    assert given.pixel_area_mm2 == pytest.approx(0.09) and given.time_of(3) == pytest.approx(0.15)


def test_bad_options_are_one_line_errors_before_anything_is_written(
    busi_seg_head, shared_data, tmp_path, capsys
):
    out = tmp_path / "out"
    base = f"predict --inputs+ {shared_data / CINE} --model {busi_seg_head} --out {out}".split()
    base += ["--progress", "false"]

    def error(argv, code):
        assert cli(argv) == code
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err and not out.exists()
        return err

    assert "--threshold" in error([*base, "--threshold", "1.5"], 2)
    # A head folder has no ONNX graph: the error names the folder and how to make one.
    assert "sonodistill export --model" in error([*base, "--backend", "ort_int8"], 2)
    assert "--backend ort_int9: unknown backend; did you mean ort_int8" in error(
        [*base, "--backend", "ort_int9"], 2
    )
    (tmp_path / "notes.txt").write_text("not an image")
    assert "notes.txt" in error([*base[:2], str(tmp_path / "notes.txt"), *base[3:]], 2)
    # A folder holding predictions is refused without --overwrite; files not of a run stay.
    out.mkdir()
    (out / "predictions.csv").write_text("earlier results")
    (out / "notes.md").write_text("mine")
    assert cli(base) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == "earlier results"
    assert cli([*base, "--max_frames", "2", "--overwrite", "true"]) == 0
    assert len(_rows(out)) == 2 and (out / "notes.md").read_text() == "mine"
    # Overwriting a whole run (masks and overlays folders too) replaces them; every file was
    # written atomically: no temporary file and no staging folder is left.
    assert cli([*base, "--max_frames", "3", "--overwrite", "true"]) == 0
    assert len(_rows(out)) == 3 and len(list((out / "masks").rglob("*.png"))) == 3
    assert (out / "overlays" / "examples_ybr_color.mp4").stat().st_size > 0
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name == ".partial"]


def test_an_onnx_runtime_backend_imports_no_torch(busi_export, shared_data, tmp_path):
    code = (
        "import sys\n"
        "from sonodistill.cli import main\n"
        f"code = main(['predict', '--inputs+', {str(shared_data / CINE)!r}, '--model', "
        f"{str(busi_export)!r}, '--backend', 'ort_int8', '--max_frames', '1', '--out', "
        f"{str(tmp_path / 'pred')!r}, '--progress', 'false'])\n"
        "print(code, 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip().splitlines()[-1] == "0 False", run.stderr[-2000:]
