"""Corpus builder on the real files of ../shared/data: readers, frame selection, a build with
broken files, leakage guard, pack, and a few distillation steps on a built corpus.

Expected values (frame counts, sizes, pixels) are read independently from the files' headers with
PyAV, SimpleITK, nibabel and pydicom, never written here by hand.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import av
import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml
from torch.utils.data import DataLoader, Subset

from sonodistill.cli import main
from sonodistill.data import hashing
from sonodistill.data.frames import FrameSelector, FrameSettings
from sonodistill.data.greys import resize_square
from sonodistill.data.listing import collect_frames
from sonodistill.data.manifest import list_corpus_images
from sonodistill.data.pack import open_pack
from sonodistill.data.readers import ReadError, detect_kind, read_frames

CLIPS = ["patient_10_L1.mp4", "patient_11_R3.mp4"]


@pytest.fixture(scope="session")
def corpus_data(shared_data) -> Path:
    return shared_data / "corpus"


@pytest.fixture(scope="session")
def busi(shared_data) -> Path:
    return shared_data / "busi" / "Dataset_BUSI_with_GT"


def frames_of(path, **kw) -> list[tuple[int, np.ndarray]]:
    return list(read_frames(path, **kw))


# ---------------------------------------------------------------- readers


def test_detect_kind(corpus_data, tmp_path):
    assert detect_kind(corpus_data / "covid_blues/lus_videos" / CLIPS[0]) == "video"
    assert detect_kind(corpus_data / "dicom/examples_palette.dcm") == "dicom"
    assert detect_kind(corpus_data / "plus/TestImages/SpinePhantomFreehand.igs.mha") == "itk"
    assert detect_kind(corpus_data / "plus/nifti_derived/SpinePhantomFreehand.nii.gz") == "nifti"
    (tmp_path / "notes.txt").write_text("not an image")
    assert detect_kind(tmp_path / "notes.txt") is None
    # content wins over a misleading extension
    shutil.copy(corpus_data / "dicom/examples_rgb_color.dcm", tmp_path / "scan.png")
    assert detect_kind(tmp_path / "scan.png") == "dicom"


@pytest.mark.parametrize("clip", CLIPS)
def test_read_mp4_clip(corpus_data, clip):
    path = corpus_data / "covid_blues/lus_videos" / clip
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        n, h, w = stream.frames, stream.codec_context.height, stream.codec_context.width
    frames = frames_of(path)
    assert n > 0 and len(frames) == n
    assert [i for i, _ in frames] == list(range(n))
    assert {f.shape for _, f in frames} == {(h, w, 3)}
    assert all(f.dtype == np.uint8 for _, f in frames)


def _mha_files(corpus_data):
    return sorted((corpus_data / "plus/TestImages").glob("*.mha"))


def test_read_mha_sequences_and_volumes(corpus_data):
    files = _mha_files(corpus_data)
    assert len(files) == 6
    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        nx, ny, nz = reader.GetSize()
        frames = frames_of(path)
        # sequences (*.igs.mha) give their frames, volumes their z-slices: both nz of (ny, nx)
        assert len(frames) == nz, path.name
        assert {f.shape for _, f in frames} == {(ny, nx)}, path.name
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if expected.dtype == np.uint8:
            assert all(np.array_equal(f, expected[i]) for i, f in frames), path.name
        else:  # float volume: scaled once for the whole volume, same ordering of values
            k = nz // 2
            corr = np.corrcoef(frames[k][1].ravel(), expected[k].ravel())[0, 1]
            assert corr > 0.99, path.name
    # a volume sliced along another axis of its (z, y, x) array
    vol = corpus_data / "plus/TestImages/SpinePhantomFreehandReconstructed.mha"
    nx, ny, nz = sitk.ReadImage(str(vol)).GetSize()
    along_x = frames_of(vol, axis=2)
    assert len(along_x) == nx and {f.shape for _, f in along_x} == {(nz, ny)}
    # `.igs` sequences are 2D+t, the reconstructions are volumes
    from sonodistill.data.readers import volume_layout

    layouts = {p.name: volume_layout(p, "itk").sequence for p in files}
    assert {n for n, seq in layouts.items() if seq} == {p.name for p in files if ".igs." in p.name}


def test_nifti_copies_match_the_metaimages(corpus_data):
    niftis = sorted((corpus_data / "plus/nifti_derived").glob("*.nii.gz"))
    assert len(niftis) == 6
    mhas = {p.name.split(".")[0]: p for p in _mha_files(corpus_data)}
    for path in niftis:
        nx, ny, nz = nib.load(str(path)).shape[:3]
        frames = frames_of(path)
        assert len(frames) == nz and {f.shape for _, f in frames} == {(ny, nx)}, path.name
        twin = frames_of(mhas[path.name.split(".")[0]])
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(frames, twin, strict=True))


def test_read_dicom_files(corpus_data):
    files = sorted((corpus_data / "dicom").glob("*.dcm"))
    assert len(files) == 4
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        frames = frames_of(path)
        assert len(frames) == n, path.name
        colour = ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
        shape = (ds.Rows, ds.Columns, 3) if colour else (ds.Rows, ds.Columns)
        assert {f.shape for _, f in frames} == {shape}, path.name

    # the echo cine: 30 JPEG frames in YBR_FULL_422, converted to RGB (a grey echo has R~G~B;
    # unconverted YBR would have its chroma planes near 128)
    ds = pydicom.dcmread(corpus_data / "dicom/examples_ybr_color.dcm", stop_before_pixels=True)
    assert ds.PhotometricInterpretation.startswith("YBR") and ds.NumberOfFrames == 30
    cine = np.stack([f for _, f in frames_of(corpus_data / "dicom/examples_ybr_color.dcm")])
    assert cine.shape[0] == 30
    assert np.abs(cine[..., 0].astype(int) - cine[..., 2]).mean() < 3
    assert cine.std(axis=0).mean() > 1  # the frames differ: a real cine, not one frame repeated

    # palette: the stored indices through the LUT written in the file
    pal = pydicom.dcmread(corpus_data / "dicom/examples_palette.dcm")
    first, bits = pal.RedPaletteColorLookupTableDescriptor[1:]
    idx = pal.pixel_array.astype(int) - first
    ((_, rgb),) = frames_of(corpus_data / "dicom/examples_palette.dcm")
    for c, name in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(getattr(pal, f"{name}PaletteColorLookupTableData"), "<u2")
        assert np.array_equal(rgb[..., c], (lut[np.clip(idx, 0, len(lut) - 1)] >> (bits - 8)))

    # JPEG 2000 (YBR_RCT, 640x480) shows the same scan as the raw RGB file (320x240)
    ((_, j2k),) = frames_of(corpus_data / "dicom/examples_jpeg2k.dcm")
    ((_, raw),) = frames_of(corpus_data / "dicom/examples_rgb_color.dcm")
    small = cv2.resize(j2k, raw.shape[1::-1], interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(small - raw).mean() < 4 < np.abs(small[..., ::-1] - raw).mean()


def test_unreadable_files_raise_read_error(corpus_data, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    clip = (corpus_data / "covid_blues/lus_videos" / CLIPS[0]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(clip[: len(clip) // 3])
    (tmp_path / "readme.txt").write_text("hello")
    for name in ("bad.png", "cut.mp4", "readme.txt"):
        with pytest.raises(ReadError):
            frames_of(tmp_path / name)


# ---------------------------------------------------------------- frame selection


def test_near_duplicate_filter_keeps_few_distinct_frames(corpus_data):
    path = corpus_data / "covid_blues/lus_videos" / CLIPS[0]
    frames = frames_of(path)
    settings = FrameSettings(max_per_clip=0)
    select = FrameSelector(settings)
    kept = [d for d in (select(i, f) for i, f in frames) if d.keep]
    assert 2 <= len(kept) <= len(frames) // 5, (len(kept), len(frames))
    bits = hashing.hex_to_uint64([d.phash for d in kept])
    dist = hashing.hamming_matrix(bits, bits)
    assert dist[np.triu_indices(len(kept), 1)].min() > settings.dup_threshold
    for a, b in zip(kept, kept[1:], strict=False):
        assert a.sha1 != b.sha1

    # without the filter (a negative threshold) every informative frame stays
    everything = FrameSelector(FrameSettings(max_per_clip=0, dup_threshold=-1))
    n_all = sum(everything(i, f).keep for i, f in frames)
    assert n_all == len(frames) > len(kept)

    # the downsampled-difference method also thins the clip, and the cap bounds it
    diff = FrameSelector(FrameSettings(dup_method="diff", dup_threshold=2.0, max_per_clip=0))
    assert 1 <= sum(diff(i, f).keep for i, f in frames) < len(frames) // 2
    capped = FrameSelector(FrameSettings(max_per_clip=2))
    reasons = [capped(i, f).reason for i, f in frames]
    assert reasons.count("") == 2 and "clip_cap" in reasons


def test_colour_and_blank_frames_are_dropped(corpus_data):
    select = FrameSelector(FrameSettings())
    ((_, doppler),) = frames_of(corpus_data / "dicom/examples_rgb_color.dcm")
    assert select(0, doppler).reason == "colour"
    assert select(1, np.zeros((200, 200), np.uint8)).reason == "blank"
    assert select(2, np.full((200, 200, 3), 90, np.uint8)).reason == "blank"
    # a few coloured caliper marks on a grey frame are painted out, the frame is kept
    ((_, grey_rgb),) = frames_of(corpus_data / "dicom/examples_ybr_color.dcm")[:1]
    marked = grey_rgb.copy()
    marked[100:103, 100:130] = (255, 255, 0)
    d = select(3, marked)
    assert d.keep and d.grey.ndim == 2


# ---------------------------------------------------------------- builds


def write_sources(path: Path, sources: list[dict], exclude=None, **settings) -> Path:
    spec = {"settings": {"workers": 2, **settings}, "sources": sources}
    if exclude:
        spec["exclude"] = exclude
    path.write_text(yaml.safe_dump(spec))
    return path


def _manifest(rows):
    columns = ["id", "source", "sha1", "phash", "kept"]
    df = pd.DataFrame(rows, columns=columns).assign(reason="", duplicate_of=None)
    df.loc[~df.kept, "reason"] = "blank"
    return df


def _field(seed: int) -> np.ndarray:
    """A smooth random 34 x 34 field (a thumbnail's worth of content), z-normalised."""
    x = np.random.default_rng(seed).standard_normal((34, 34))
    return (x - x.mean()) / x.std()


def _frame(field: np.ndarray) -> np.ndarray:
    """A grey frame whose data.neardup thumbnails are `field` (blocks of 10 x 10 pixels)."""
    grey = np.clip(128 + 30 * field, 20, 235).astype(np.uint8)
    return np.kron(grey, np.ones((10, 10), np.uint8))


def test_dedup_corpus_drops_later_copies_of_other_files_only():
    from sonodistill.data.corpus import dedup_corpus
    from sonodistill.data.neardup import fingerprint_batch, similarity

    x, y, z = _field(1), _field(2), _field(3)
    angle = np.arccos(0.95)  # b1 is 0.95 similar to a1; c0 0.95 to b1 but 0.80 to a1

    def turn(k):
        return np.cos(k * angle) * y + np.sin(k * angle) * z

    frames = {  # id: (file, sha1, content)
        "a0": ("A", "s1", x),
        "a1": ("A", "s2", turn(0)),
        "a2": ("A", "s3", turn(-1)),  # near a1, same file: the clip decided
        "b0": ("B", "s1", x),  # exact copy of a0
        "b1": ("B", "s4", turn(1)),  # near a1
        "c0": ("C", "s5", turn(2)),  # near b1 only, and b1 is dropped
        "d0": ("D", "s1", x),  # already dropped: not a copy, not kept
    }
    rows = [(k, f, s, "0" * 16, k != "d0") for k, (f, s, _) in frames.items()]
    df = _manifest(rows)
    fps = fingerprint_batch(_frame(c) for k, (_, _, c) in frames.items() if k != "d0")
    sim = similarity(fps, fps, [1, 1, 4], [4, 5, 5])  # a1-b1, a1-c0, b1-c0
    assert sim[0] > 0.92 and sim[1] < 0.9 and sim[2] > 0.92
    dedup_corpus(df, threshold=0.92, fingerprints=fps)
    assert list(df.id[df.kept]) == ["a0", "a1", "a2", "c0"]
    dups = df.set_index("id")
    assert dups.loc["b0", "duplicate_of"] == "a0" and dups.loc["b1", "duplicate_of"] == "a1"
    assert set(dups.loc[["b0", "b1"], "reason"]) == {"corpus_duplicate"}
    assert dups.loc["d0", "reason"] == "blank" and dups.loc["d0", "duplicate_of"] is None

    exact_only = _manifest(rows)
    dedup_corpus(exact_only, threshold=2.0, fingerprints=fps)  # above 1: exact copies only
    assert list(exact_only.id[~exact_only.kept]) == ["b0", "d0"]
    unfingerprinted = _manifest(rows)
    dedup_corpus(unfingerprinted, threshold=0.92)
    assert list(unfingerprinted.id[~unfingerprinted.kept]) == ["b0", "d0"]


def test_build_skips_broken_files_and_resumes(corpus_data, tmp_path, capsys):
    src = tmp_path / "download"
    src.mkdir()
    clip = corpus_data / "covid_blues/lus_videos" / CLIPS[0]
    shutil.copy(clip, src / "good.mp4")
    data = clip.read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(999))
    (src / "notes.txt").write_text("acquisition notes")
    sources = write_sources(
        tmp_path / "sources.yaml",
        [
            {"dataset": "mixed", "anatomy": "lung", "path": "download"},
            {"dataset": "echo", "anatomy": "heart", "path": str(corpus_data / "dicom")},
        ],
    )
    out = tmp_path / "corpus"
    assert main(["corpus", "build", str(sources), "--out", str(out), "--quiet", "true"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    skipped = m[m.frame < 0].set_index(m[m.frame < 0].source.map(lambda s: Path(s).name))
    assert set(skipped.index) == {"truncated.mp4", "corrupt.png", "notes.txt"}
    assert all(r.startswith("unreadable:") for r in skipped.reason)
    assert "unsupported file type" in skipped.reason["notes.txt"]
    log = (out / "build.log").read_text()
    assert all(name in log for name in skipped.index)

    good = m[m.source.str.endswith("good.mp4")]
    with av.open(str(clip)) as c:
        assert len(good) == c.streams.video[0].frames  # one row per frame of the clip
    assert 0 < good.kept.sum() < len(good) // 5

    echo = m[m.dataset == "echo"]
    assert (echo.source.str.endswith("examples_ybr_color.dcm") & echo.kept).sum() > 10
    doppler = echo[echo.source.str.contains("rgb_color|jpeg2k")]
    assert len(doppler) == 2 and set(doppler.reason) == {"colour"}

    kept = m[m.kept]
    for row in kept.itertuples():
        png = cv2.imread(str(out / row.path), cv2.IMREAD_UNCHANGED)
        assert png.ndim == 2 and png.shape == (row.height, row.width)
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "frames").rglob("*.png"))
    assert pngs == sorted(kept.path)
    assert [p.relative_to(out).as_posix() for p in list_corpus_images(out)] == list(kept.path)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_kept"] == len(kept) and summary["files_unreadable"] == 3
    assert summary["drop_reasons"]["unreadable"] == 3
    assert (out / "contact_sheet.png").is_file() and (out / "corpus.yaml").is_file()

    # resumed: nothing is read again and the manifest is the same
    capsys.readouterr()
    resume = ["--resume", "true"]
    assert (
        main(["corpus", "build", str(sources), "--out", str(out), "--quiet", "true", *resume]) == 0
    )
    assert "0 read this run" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), m)


def test_build_real_corpus_pack_and_distill(corpus_data, tmp_path):
    out = tmp_path / "corpus"
    sources = write_sources(
        tmp_path / "sources.yaml",
        [
            {
                "dataset": "covid_blues",
                "anatomy": "lung",
                "path": str(corpus_data / "covid_blues/lus_videos/patient_10_L[12].mp4"),
            },
            {
                "dataset": "plus",
                "anatomy": "phantom",
                "path": str(corpus_data / "plus/TestImages/SpinePhantomFreehand*.mha"),
            },
            {
                "dataset": "plus_nii",
                "anatomy": "phantom",
                "path": str(corpus_data / "plus/nifti_derived/SpinePhantomFreehand*.nii.gz"),
            },
            {
                "dataset": "dicom",
                "anatomy": "mixed",
                "path": str(corpus_data / "dicom"),
                "frames": {"max_per_clip": 8},
            },
        ],
    )
    assert main(["corpus", "build", str(sources), "--out", str(out), "--quiet", "true"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    seen = m[m.frame >= 0]
    # every frame of every file has its row: the headers' counts
    mhas = sorted((corpus_data / "plus/TestImages").glob("SpinePhantomFreehand*.mha"))
    assert len(mhas) == 2  # a 2D+t sequence and a reconstructed volume
    assert (seen.kind == "itk").sum() == sum(sitk.ReadImage(str(p)).GetSize()[2] for p in mhas)
    assert (seen.kind == "nifti").sum() == (seen.kind == "itk").sum()
    # the NIfTI copies hold the same pixels as the MetaImages: all dropped as corpus duplicates
    nii = m[m.dataset == "plus_nii"]
    assert not nii.kept.any()
    assert (nii.reason == "corpus_duplicate").sum() == m[m.dataset == "plus"].kept.sum()
    assert m.loc[m.dataset == "dicom", "kept"].sum() == 8  # the cine, capped
    assert m.sha1[m.kept].is_unique and m.id.is_unique

    # `sonodistill embed` reads the corpus: kept frames, labelled and grouped by their source
    frames = collect_frames([str(out)])
    assert len(frames) == m.kept.sum()
    assert {f.dataset for f in frames} == set(m.dataset[m.kept])
    assert {f.group for f in frames} == set(m.source[m.kept])

    pack = tmp_path / "pack"
    argv = ["corpus", "pack", str(out), "--out", str(pack), "--image_size", "64", "--quiet", "true"]
    assert main(argv) == 0
    frames, index = open_pack(pack)
    kept = m[m.kept].reset_index(drop=True)
    assert frames.shape == (len(kept), 64, 64)
    assert json.loads((pack / "pack.json").read_text())["count"] == len(kept)
    assert list(index.columns) == ["id", "dataset", "anatomy", "source", "frame"]
    assert list(index.id) == list(kept.id)
    k = len(kept) // 2
    png = cv2.imread(str(out / kept.path[k]), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(frames[k], resize_square(png, 64))

    run = tmp_path / "run"
    flags = f"--data {out} --out {run} --teacher.random_init true --student.name resnet18"
    flags += " --image_size 64 --batch_size 8 --max_steps 3 --num_workers 0 --accelerator cpu"
    flags += " --log_every 1 --precision fp32"
    tiny = ["--teacher.model_kwargs", "{embed_dim: 48, depth: 2, num_heads: 2}"]
    rc = main(["distill", *flags.split(), *tiny])
    assert not rc
    assert (run / "student_backbone.safetensors").is_file()

    # the distillation reader takes the corpus folder, its manifest and the pack alike
    from sonodistill.data.images import open_training_images

    for data in (out, out / "manifest.parquet", pack):
        images = open_training_images(data, 64)
        assert len(images) == len(kept)
        assert tuple(images[0].shape[-2:]) == (64, 64)

    # Workers started by spawn/forkserver (Python 3.14's Linux default) get the pack as a
    # pickle: its path, not the frames; each maps the file again.
    images = Subset(open_training_images(pack, 64), range(len(kept)))  # as the recipe splits
    assert len(pickle.dumps(images)) < frames.nbytes // 20  # the path and the frame names
    loader = DataLoader(images, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    expected = torch.stack([images[i] for i in range(len(kept))])
    assert torch.equal(torch.cat(list(loader)), expected)


# ---------------------------------------------------------------- leakage guard


def test_check_leakage_finds_busi_duplicates(busi, corpus_data, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    original = busi / "benign/benign (12).png"
    im = cv2.imread(str(original), cv2.IMREAD_GRAYSCALE)
    size = (im.shape[1] * 3 // 4, im.shape[0] * 3 // 4)
    small = cv2.resize(im, size, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(corpus / "planted.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    for i, f in frames_of(corpus_data / "covid_blues/lus_videos" / CLIPS[1])[:60:20]:
        cv2.imwrite(str(corpus / f"lung_{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2GRAY))
    report = tmp_path / "leaks.csv"
    rc = main(f"corpus check-leakage {corpus} --against+ BUSI={busi} --report {report}".split())
    assert rc == 1
    r = pd.read_csv(report)
    cross = r[r.scope == "corpus"]
    assert set(cross.a.map(lambda p: Path(p).name)) == {"planted.jpg"}
    assert original.name in set(cross.b.map(lambda p: Path(p).name))
    assert (cross.match == "near").all()
    within = r[(r.scope == "within") & (r.match == "exact")]
    pairs = {frozenset((Path(a).name, Path(b).name)) for a, b in within[["a", "b"]].values}
    assert frozenset({"malignant (145).png", "benign (433).png"}) in pairs
    assert f"BUSI: {len(cross)} corpus matches" in capsys.readouterr().out


def test_build_excludes_evaluation_sets(busi, shared_data, corpus_data, tmp_path):
    ddti = shared_data / "ddti"
    sources = write_sources(
        tmp_path / "sources.yaml",
        [
            {
                "dataset": "busi_leak",
                "anatomy": "breast",
                "path": str(busi / "benign/benign (1?).png"),
            },
            {"dataset": "ddti_leak", "anatomy": "thyroid", "path": str(ddti / "image/1?.PNG")},
            {
                "dataset": "lung",
                "anatomy": "lung",
                "path": str(corpus_data / "covid_blues/lus_videos" / CLIPS[0]),
            },
        ],
        exclude=[{"name": "BUSI", "path": str(busi)}, {"name": "DDTI", "path": str(ddti)}],
    )
    out = tmp_path / "corpus"
    assert main(["corpus", "build", str(sources), "--out", str(out), "--quiet", "true"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    leak = m[m.dataset.isin(["busi_leak", "ddti_leak"])]
    assert len(leak) >= 15  # the sources did bring BUSI and DDTI images...
    assert not leak.kept.any()  # ...and none of them is kept
    # every one that passed the frame checks is dropped as a match of its own evaluation set
    matched = leak[leak.reason.str.startswith("excluded:")]
    assert len(matched) >= len(leak) - 2
    assert set(matched.reason) <= {"excluded:BUSI", "excluded:DDTI"}
    assert (matched.dataset == "busi_leak").sum() and (matched.dataset == "ddti_leak").sum()
    assert m[m.dataset == "lung"].kept.sum() > 0  # lung frames do not match BUSI/DDTI
    kept_dirs = {Path(p).parts[1] for p in m.path[m.kept]}
    assert kept_dirs == {"lung"}
    assert not list((out / "frames").glob("*leak*/**/*.png"))

    # the same sources without `exclude:`: another corpus, refused by --resume, built by
    # --overwrite, where the dropped images come back
    write_sources(tmp_path / "sources.yaml", yaml.safe_load(sources.read_text())["sources"])
    argv = ["corpus", "build", str(sources), "--out", str(out), "--quiet", "true"]
    assert main([*argv, "--resume", "true"]) == 2
    assert main([*argv, "--overwrite", "true"]) == 0
    again = pd.read_parquet(out / "manifest.parquet")
    back = again[again.dataset.isin(["busi_leak", "ddti_leak"]) & again.kept]
    assert len(back) >= len(matched)
    assert all((out / p).is_file() for p in back.path)


def test_build_rejects_missing_paths(corpus_data, tmp_path, capsys):
    clip = str(corpus_data / "covid_blues/lus_videos" / CLIPS[0])
    typo = write_sources(tmp_path / "a.yaml", [{"dataset": "x", "path": str(tmp_path / "nope")}])
    assert (
        main(["corpus", "build", str(typo), "--out", str(tmp_path / "a"), "--quiet", "true"]) == 2
    )
    assert "no file matches" in capsys.readouterr().err
    bad_exclude = write_sources(
        tmp_path / "b.yaml",
        [{"dataset": "x", "path": clip}],
        exclude=[{"name": "EVAL", "path": str(tmp_path / "missing")}],
    )
    assert (
        main(["corpus", "build", str(bad_exclude), "--out", str(tmp_path / "b"), "--quiet", "true"])
        == 2
    )
    assert "exclude 'EVAL'" in capsys.readouterr().err
    assert not (tmp_path / "b" / "manifest.parquet").exists()


def test_settings_precedence_and_saved_config(corpus_data, tmp_path):
    cine = corpus_data / "dicom/examples_ybr_color.dcm"
    sources = write_sources(
        tmp_path / "s.yaml",
        [{"dataset": "echo", "anatomy": "heart", "path": str(cine)}],
        workers=1,
        frames={"max_per_clip": 5, "crop_fov": False},
    )
    out = tmp_path / "c"
    args = [
        "build",
        str(sources),
        "--out",
        str(out),
        "--quiet",
        "true",
        "--frames.max_per_clip",
        "3",
    ]
    assert main(["corpus", *args]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    ds = pydicom.dcmread(cine, stop_before_pixels=True)
    assert len(m) == ds.NumberOfFrames
    assert m.kept.sum() == 3 and (m.reason == "clip_cap").any()  # the flag beats the YAML
    assert set(zip(m.height[m.kept], m.width[m.kept], strict=True)) == {(ds.Rows, ds.Columns)}
    saved = yaml.safe_load((out / "corpus.yaml").read_text())
    assert saved["settings"]["frames"]["max_per_clip"] == 3
    assert saved["settings"]["frames"]["crop_fov"] is False  # from the YAML
    assert saved["sources"][0]["path"] == str(cine)


def test_old_setting_names_are_read_with_a_deprecation_line_each(corpus_data, tmp_path):
    """corpus_near_duplicate (SOURCES.yaml settings: and the flag), check-leakage --similarity
    and pack --size: read as their new names, one deprecation line each; nothing runs."""
    from sonodistill import config
    from sonodistill.cli import parse_command

    clip = str(corpus_data / "covid_blues/lus_videos" / CLIPS[0])
    sources = write_sources(
        tmp_path / "s.yaml", [{"dataset": "lung", "path": clip}], corpus_near_duplicate=0.97
    )
    config.reset_deprecations()
    cfg = parse_command("corpus build", [str(sources), "--out", str(tmp_path / "c")])
    assert cfg.settings().near_duplicate == 0.97  # from the file
    flag = ["--corpus_near_duplicate", "0.99", "--out", str(tmp_path / "c")]
    assert parse_command("corpus build", [str(sources), *flag]).near_duplicate == 0.99
    leakage = parse_command("corpus check-leakage", ["C", "--against+", "a=b", "--similarity", "1"])
    assert leakage.near_duplicate == 1.0
    assert parse_command("corpus pack", ["C", "--out", "P", "--size", "64"]).image_size == 64
    lines = config.deprecation_lines("sonodistill corpus")
    assert [line.split(": ")[-1] for line in lines] == [
        "corpus_near_duplicate is deprecated, use near_duplicate (accepted until 0.3)",
        "--corpus_near_duplicate is deprecated, use --near_duplicate (accepted until 0.3)",
        "--similarity is deprecated, use --near_duplicate (accepted until 0.3)",
        "--size is deprecated, use --image_size (accepted until 0.3)",
    ]
    config.reset_deprecations()


def test_a_corpus_folder_owns_its_near_duplicate_table_and_resumes_across_the_rename(tmp_path):
    """--overwrite removes neardup.parquet with the rest of the old build (it used to survive,
    and did not mark the folder as a corpus); a corpus.yaml written with corpus_near_duplicate
    resumes without changes."""
    from sonodistill.config import to_dict
    from sonodistill.data.config import CORPUS, BuildSettings, CorpusSpec, Source
    from sonodistill.utils.rundir import RunDir

    out = tmp_path / "corpus"
    out.mkdir()
    (out / "neardup.parquet").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert RunDir(out, CORPUS).found() == ["neardup.parquet"]
    with RunDir(out, CORPUS, overwrite=True).claim() as run:
        run.clear()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    spec = CorpusSpec(BuildSettings(), [Source("lung", "lung", "/x")], [])
    old = to_dict(spec)
    old["settings"]["corpus_near_duplicate"] = old["settings"].pop("near_duplicate")
    (out / "corpus.yaml").write_text(yaml.safe_dump(old))
    run = RunDir(out, CORPUS, resume=True)
    assert run.resume_changes(to_dict(spec), cls=CorpusSpec) == {}
    spec.settings.near_duplicate = 0.9
    changed = run.resume_changes(to_dict(spec), cls=CorpusSpec)
    assert changed == {"settings.near_duplicate": (0.95, 0.9)}
