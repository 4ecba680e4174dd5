"""What the tests share, in one place: the real ultrasound data beside the repository, tiny
model configs, fake distill runs, real lung frames, random weights in Meta's DINOv3 checkpoint
layout, the one-thread fixture of the heavier model tests, and the runner of the refusal tables
(test_refusals, test_faults).

Test modules never import each other; they import the helpers below as `from conftest import
...` (one name: pytest puts tests/ on the path) and get the fixtures by argument."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from sonodistill.models.encoders import EncoderSpec

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUSI = "busi/Dataset_BUSI_with_GT"  # below shared_data
VIDEOS = "corpus/covid_blues/lus_videos"

# Keep the suite within its CPU budget: two cores, no oversubscription.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (BUSI, DDTI, corpus); a clear failure when it is missing."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"real test data not found at {SHARED_DATA}: tests need ../shared/data")
    return SHARED_DATA


# A DINOv3 architecture small enough for CPU tests (real layout: registers, RoPE, q/v biases).
TINY_TEACHER_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 2}
TINY_TEACHER = EncoderSpec(
    family="dinov3", weights="random", label="ViT-tiny", model_kwargs=TINY_TEACHER_KWARGS
)


@pytest.fixture
def one_thread():
    """One intra-op thread (modules opt in with `pytestmark = pytest.mark.usefixtures(
    "one_thread")`): on two shared cores, two OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_student_run(folder: Path, name: str = "resnet18", seed: int = 1) -> Path:
    """What `sonodistill distill` leaves: config.yaml + student_backbone.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(folder / "student_backbone.safetensors"))
    from sonodistill.config import save_config
    from sonodistill.distill.config import DistillConfig
    from sonodistill.models import StudentConfig

    save_config(DistillConfig(student=StudentConfig(name=name)), folder / "config.yaml")
    return folder


@pytest.fixture(scope="session")
def fake_student(tmp_path_factory) -> Path:
    """One fake ResNet-18 distill run for the whole session."""
    return fake_student_run(tmp_path_factory.mktemp("distill_run"), seed=123)


def extract_lung_frames(shared: Path, out: Path, clips: int = 2, per_clip: int = 3) -> Path:
    """A few frames of real lung clips as PNG, one subfolder per clip."""
    for video in sorted((shared / VIDEOS).glob("*.mp4"))[:clips]:
        (out / video.stem).mkdir(parents=True, exist_ok=True)
        with av.open(str(video)) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i % 10 == 0:
                    frame.to_image().save(out / video.stem / f"{i:04d}.png")
                if i >= 10 * (per_clip - 1):
                    break
    return out


# DINOv3 ViT architectures: ViT-B/16, the SwiGLU ViT-S+/16, and the tiny one above.
VITB = {"dim": 768, "depth": 12, "heads": 12, "hidden": 3072, "swiglu": False}
VITSP = {"dim": 384, "depth": 12, "heads": 6, "hidden": 1536, "swiglu": True}
TINY = {"dim": 48, "depth": 2, "heads": 2, "hidden": 192, "swiglu": False}


HIERA = {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 2, 1), "global_att_blocks": (3,)}
"""A tiny SAM2 Hiera (timm overrides of sam2_hiera_tiny)."""


def timm_to_sam2_official(state: dict) -> dict:
    """timm trunk names -> Meta's SAM2 checkpoint, with the parts of SAM2 beside the trunk."""
    sd = {}
    for key, value in state.items():
        key = key.replace(".mlp.fc1.", ".mlp.layers.0.").replace(".mlp.fc2.", ".mlp.layers.1.")
        sd["image_encoder.trunk." + key] = value
    sd["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(8, 40, 1, 1)
    sd["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    sd["memory_attention.norm.weight"] = torch.zeros(8)
    return {"model": sd}


def official_shapes(dim, depth, heads, hidden, swiglu, patch=16, storage=4) -> dict:
    """Tensor names and shapes of an official DINOv3 ViT checkpoint."""
    shapes = {
        "cls_token": (1, 1, dim),
        "storage_tokens": (1, storage, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "rope_embed.periods": (dim // heads // 4,),
    }
    mlp = (
        {"w1": (hidden, dim), "w2": (hidden, dim), "w3": (dim, hidden)}
        if swiglu
        else {"fc1": (hidden, dim), "fc2": (dim, hidden)}
    )
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (dim,),
            b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.qkv.bias": (3 * dim,),
            b + "attn.qkv.bias_mask": (3 * dim,),
            b + "attn.proj.weight": (dim, dim),
            b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,),
            b + "norm2.weight": (dim,),
            b + "norm2.bias": (dim,),
        }
        for name, shape in mlp.items():
            shapes[f"{b}mlp.{name}.weight"] = shape
            shapes[f"{b}mlp.{name}.bias"] = (shape[0],)
        shapes[b + "ls2.gamma"] = (dim,)
    return shapes | {"norm.weight": (dim,), "norm.bias": (dim,)}


def standard_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """base ** (2i / (D_head / 2)) for i < D_head / 4 (the published RoPE schedule)."""
    i = torch.arange(head_dim // 4, dtype=torch.float32)
    return base ** (2 * i / (head_dim // 2))


def perturbed_official(arch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors at trained-like scales, so every part of the forward matters."""
    gen = torch.Generator().manual_seed(seed)
    dim = arch["dim"]
    sd = {}
    for key, shape in official_shapes(**arch).items():
        x = torch.randn(shape, generator=gen)
        if key.endswith("bias_mask"):
            x = torch.ones(shape)
            x[dim : 2 * dim] = 0  # DINOv3 masks the k bias
        elif key == "rope_embed.periods":
            x = standard_periods(dim // arch["heads"])
        elif re.search(r"norm\d?\.weight$", key):
            x = 1 + 0.1 * x
        elif key.endswith("gamma"):
            x = 0.3 + 0.1 * x
        elif key.endswith("bias"):
            x = 0.1 * x  # the qkv k bias is non-zero too: only the mask removes it
        elif key.endswith("weight"):
            x = x / math.sqrt(math.prod(shape[1:]))
        sd[key] = x
    return sd


@pytest.fixture(scope="session")
def real_frames(shared_data, tmp_path_factory):
    """Frames of the DICOM echo cine and of four lung-ultrasound clips, as PNG files."""
    import av
    import pydicom
    from PIL import Image

    out = tmp_path_factory.mktemp("frames")
    cine = pydicom.dcmread(shared_data / "corpus/dicom/examples_ybr_color.dcm")
    rgb = pydicom.pixels.convert_color_space(cine.pixel_array, "YBR_FULL_422", "RGB")
    for i, frame in enumerate(rgb):
        Image.fromarray(frame).convert("L").save(out / f"echo_{i:02d}.png")
    clips = sorted((shared_data / "corpus/covid_blues/lus_videos").glob("*.mp4"))[:4]
    for clip in clips:
        with av.open(str(clip)) as video:
            for i, frame in enumerate(video.decode(video=0)):
                if i % 8 == 0:
                    frame.to_image().convert("L").save(out / f"{clip.stem}_{i:03d}.png")
                if i >= 96:
                    break
    return out


@pytest.fixture(scope="session")
def three_batches(real_frames, tmp_path_factory):
    """24 of the real frames: three batches of 8 per epoch, so a short run crosses epochs."""
    out = tmp_path_factory.mktemp("three_batches")
    for png in sorted(real_frames.glob("*.png"))[::3][:24]:
        shutil.copy(png, out / png.name)
    return out


def tiny_config(data, out, **overrides):
    """A distillation small enough for CPU tests: tiny DINOv3-layout teacher, ResNet-18, 64 px."""
    from sonodistill.distill import DistillConfig
    from sonodistill.models import StudentConfig, TeacherConfig

    cfg = DistillConfig(
        data=str(data),
        out=str(out),
        teacher=TeacherConfig(random_init=True, model_kwargs=dict(TINY_TEACHER_KWARGS)),
        student=StudentConfig(name="resnet18"),
        image_size=64,
        batch_size=8,
        num_workers=0,
        log_every=1,
        seed=0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="session", autouse=True)
def _fingerprint_cache(tmp_path_factory):
    """Image fingerprints (near duplicates, leakage) cached once per session, outside $HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SONODISTILL_CACHE", str(tmp_path_factory.mktemp("fingerprint-cache")))
    yield
    mp.undo()


def pixel_correlation(thumbs: np.ndarray) -> np.ndarray:
    """Pearson correlation of every pair of flattened thumbnails: the tests' own similarity,
    independent of the project's (data.neardup: aligned 32 px thumbnails, shifts, two views)."""
    x = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.fixture(scope="session")
def eval_sets(shared_data):
    """BUSI (segmentation and classification) and DDTI, each image decoded once: the project's
    fingerprints, and the tests' independent 64 x 64 pixel correlation between all pairs."""
    from PIL import Image

    from sonodistill.data.neardup import cached_fingerprints, fingerprint_batch
    from sonodistill.evaluate.datasets import load_busi, load_ddti, read_records

    busi_seg = load_busi(shared_data / "busi", "seg")
    sets = {
        "ddti": {"index": load_ddti(shared_data / "ddti")},
        "busi": {"index": busi_seg, "cls": load_busi(shared_data / "busi", "cls")},
    }
    for entry in sets.values():
        thumbs = []

        def tap(greys, thumbs=thumbs):
            for grey in greys:
                small = Image.fromarray(grey).resize((64, 64), Image.BILINEAR)
                thumbs.append(np.asarray(small, np.float64))
                yield grey

        records = entry["index"].records
        items = [(str(r.image), r.frame) for r in records]  # the key image_fingerprints uses
        entry["fingerprints"] = cached_fingerprints(
            items, lambda records=records: fingerprint_batch(tap(read_records(records)))
        )
        entry["correlation"] = pixel_correlation(np.stack(thumbs))
        entry["ids"] = [r.id for r in entry["index"].records]
    return sets


@pytest.fixture(scope="session")
def busi_seg_head(shared_data, tmp_path_factory) -> Path:
    """A ResNet-18 U-Net head (the format `sonodistill evaluate --save_models` writes) briefly
    fine-tuned on BUSI lesions at 64 px: its masks are real masks, not noise."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from sonodistill.data.masks import image_mask
    from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, save_head

    size = 64
    files = sorted((shared_data / BUSI / "benign").glob("benign (*).png"))
    files = [f for f in files if "_mask" not in f.name][:24]
    x = np.stack([np.asarray(Image.open(f).convert("L").resize((size, size))) for f in files])
    x = torch.from_numpy(x).float().div(255).unsqueeze(1)
    y = torch.from_numpy(np.stack([image_mask(f, size) for f in files])).float().unsqueeze(1)
    spec = HeadSpec(
        task_type="seg",
        encoder="random:resnet18",
        num_classes=2,
        class_names=["background", "lesion"],
        image_size=size,
    )
    torch.manual_seed(0)
    model = build_head_model(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see `one_thread`
    for _ in range(30):
        idx = torch.randint(0, len(x), (8,))
        logits = model(x[idx])
        p = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (p * y[idx]).sum() + 1) / (p.sum() + y[idx].sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, y[idx]) + soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return save_head(model.eval(), spec, tmp_path_factory.mktemp("busi_head") / "head")


# ---------------------------------------------------------------- refusal tables


TEACHER = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_TEACHER_KWARGS.items()) + "}"
DISTILL = (
    "distill --data {frames} --out {tmp}/run --teacher.random_init true "
    "--student.name test_resnet --image_size 64 --batch_size 8 --num_workers 0 --log_every 1"
)
RESUME = DISTILL + " --resume true --max_steps 2"
EVALUATE = (
    "evaluate --out {tmp}/suite --encoders [random:test_resnet] --tasks [mini] --seeds [0] "
    "--protocols [linear] --train.seg_size 32 --train.epochs 1 --train.seg_batch 4 "
    "--datasets '{{mini: {{format: seg_folder, root: {mini}}}}}'"
)
EXPORT = (
    "export --encoder random:test_resnet --frames+ ddti={data}/ddti/image --out {tmp}/export "
    "--image_size 64 --n_check 2 --n_calib 2"
)
CORPUS = "corpus build {tmp}/sources.yaml --out {tmp}/corpus --quiet true"


@dataclass
class Refusal:
    """One row of a refusal table: a command line that must exit 2 with one line naming the
    option or file at fault, no traceback, and nothing written or overwritten."""

    id: str
    argv: str
    """The command line; {tmp} is the test's folder, the other {names} `cli_inputs` (and
    {head}: a fine-tuned head, {embeddings}: an `embed` output, made when a row needs them)."""
    says: tuple[str, ...]
    """Text the error line must hold (the option or file at fault, what is wrong)."""
    setup: str = ""
    """Things to prepare first, space-separated (see `prepare`; `read_only`: a folder {tmp}/ro
    no one may write, see `read_only_folder`)."""
    creates: str = ""
    """A folder the command may write before it finds the error (else nothing may change)."""
    lacks: tuple[str, ...] = ()
    """Text the error line must not hold: options the command does not have, torch's advice."""
    fault: Callable | None = None
    """fault(monkeypatch): a failure injected before the command runs."""


@pytest.fixture(scope="session")
def cli_inputs(shared_data, tmp_path_factory):
    """Real frames, a finished tiny distill run, a small corpus and a small labelled set."""
    from sonodistill.cli import main

    root = tmp_path_factory.mktemp("inputs")
    frames, frames2 = root / "frames", root / "frames2"
    frames.mkdir()
    frames2.mkdir()
    for clip in sorted((shared_data / VIDEOS).glob("*.mp4"))[:3]:
        with av.open(str(clip)) as video:
            for i, frame in enumerate(video.decode(video=0)):
                if i % 8 == 0:
                    frame.to_image().convert("L").save(frames / f"{clip.stem}_{i:03d}.png")
                if i >= 64:
                    break
    for png in sorted(frames.glob("*.png"))[:20]:
        shutil.copy(png, frames2 / png.name)
    mini = root / "mini"
    for sub, names in (("images", "image"), ("masks", "mask")):
        (mini / sub).mkdir(parents=True)
        for png in sorted((shared_data / "ddti" / names).glob("*.PNG"))[:12]:
            shutil.copy(png, mini / sub / png.name)
    values = {"frames": frames, "frames2": frames2, "mini": mini, "data": shared_data}
    run = root / "run"
    argv = shlex.split(DISTILL.format(tmp=root, **values)) + ["--max_steps", "2"]
    assert main([*argv, "--teacher.model_kwargs", TEACHER]) == 0
    sources = root / "sources.yaml"
    cine = shared_data / "corpus/dicom/examples_ybr_color.dcm"
    sources.write_text(yaml.safe_dump({"sources": [{"dataset": "echo", "path": str(cine)}]}))
    corpus = shlex.split(f"{CORPUS.format(tmp=root)} --frames.max_per_clip 3 --workers 1")
    assert main(corpus) == 0
    return {**values, "run": run, "corpus": root / "corpus", "sources": sources}


@pytest.fixture(scope="session")
def embeddings(shared_data, tmp_path_factory) -> Path:
    """`sonodistill embed` of six DDTI images with a random timm test ResNet."""
    from sonodistill.cli import main

    out = tmp_path_factory.mktemp("embeddings") / "embed"
    argv = f"embed --sources+ ddti={shared_data}/ddti/image --encoders [random:test_resnet]"
    argv += f" --max_per_source 6 --image_size 32 --out {out}"
    assert main(shlex.split(argv)) == 0
    return out


def prepare(kinds: str, tmp: Path, inputs: dict) -> None:
    """Make what a row's `setup` names, in the test's folder."""
    from PIL import Image

    from sonodistill.config import parse_config, save_config
    from sonodistill.evaluate.suite import SuiteConfig

    for kind in kinds.split():
        if kind in ("run", "run_broken_checkpoints"):
            shutil.copytree(inputs["run"], tmp / "run")
        if kind == "run_broken_checkpoints":
            (tmp / "run/checkpoints/last.pt").write_bytes(b"")
            (tmp / "run/checkpoints/previous.pt").write_bytes(b"not a checkpoint")
        if kind == "cut_run":
            shutil.copytree(inputs["run"], tmp / "cut_run")
            weights = tmp / "cut_run/student_backbone.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
        if kind in ("corpus", "sources", "blank_sources"):
            shutil.copy(inputs["sources"], tmp / "sources.yaml")
        if kind == "corpus":
            shutil.copytree(inputs["corpus"], tmp / "corpus")
        if kind == "blank_sources":
            Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp / "black.png")
            (tmp / "sources.yaml").write_text(
                yaml.safe_dump({"sources": [{"dataset": "black", "path": str(tmp / "black.png")}]})
            )
        if kind == "suite":  # a suite with the same settings, started before
            argv = shlex.split(EVALUATE.format(**{**inputs, "tmp": tmp}))[1:]
            save_config(parse_config(SuiteConfig, argv, "evaluate"), tmp / "suite/suite.yaml")
        if kind == "export":
            (tmp / "export").mkdir()
            (tmp / "export/report.json").write_text("{}")
        if kind == "mini_broken":  # an image cut short, as by an interrupted download
            shutil.copytree(inputs["mini"], tmp / "mini_broken")
            for sub in ("images", "masks"):
                first = sorted((tmp / "mini_broken" / sub).glob("*.PNG"))[0]
                first.rename(first.with_name("broken.PNG"))
            cut = tmp / "mini_broken/images/broken.PNG"
            cut.write_bytes(cut.read_bytes()[:300])
        if kind == "nested":
            for cls in ("benign", "malignant"):
                (tmp / "nested" / cls / "scans").mkdir(parents=True)
                for png in sorted((inputs["mini"] / "images").glob("*.PNG"))[:2]:
                    shutil.copy(png, tmp / "nested" / cls / "scans" / png.name)
        if kind == "file":  # a file where a folder is expected
            (tmp / "file").write_text("mine")
        if kind == "folder":  # a folder where a file is expected
            (tmp / "folder").mkdir()
        if kind == "unreadable_frames":  # every image cut short
            (tmp / "cut").mkdir()
            for png in sorted(inputs["frames"].glob("*.png")):
                (tmp / "cut" / png.name).write_bytes(png.read_bytes()[:100])


def read_only_folder(folder: Path, monkeypatch, request) -> str:
    """`folder`, made so that nothing can be created in it: mode 0o555 for a user (root
    ignores modes), a read-only tmpfs mounted there for root, or, where root may not mount,
    EROFS injected into os.mkdir, os.open and open for paths inside it. Returns which."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        return "mode 0o555"
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode == 0:
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)], check=False))
        return "read-only tmpfs"

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        return Path(os.fsdecode(path)).is_relative_to(folder)

    def refuse(real, creates: Callable):
        def call(path, *args, **kwargs):
            if inside(path) and creates(path, *args, **kwargs):
                code = errno.EEXIST if os.path.exists(path) else errno.EROFS
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real(path, *args, **kwargs)

        return call

    writes = lambda path, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    monkeypatch.setattr(os, "mkdir", refuse(os.mkdir, lambda *a, **k: True))
    monkeypatch.setattr(os, "open", refuse(os.open, lambda p, flags, *a, **k: flags & os.O_CREAT))
    monkeypatch.setattr(io, "open", refuse(io.open, writes))
    monkeypatch.setattr("builtins.open", refuse(open, writes))
    return "injected EROFS"


def checksum(folder: Path, skip: str = "") -> dict[str, str]:
    """Every file and folder under `folder` (but `skip`) with its content hash."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        out[rel] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def assert_refused(row: Refusal, tmp_path: Path, request) -> str:
    """Run the row through the CLI in-process; assert exit code 2, exactly one line on stderr
    (`sonodistill CMD: error: ...`) holding `says` and not `lacks`, no traceback, and the test's
    folder unchanged (but `creates`). Returns the line."""
    from sonodistill.cli import main

    monkeypatch = request.getfixturevalue("monkeypatch")
    capsys = request.getfixturevalue("capsys")
    monkeypatch.delenv("SONODISTILL_DEBUG", raising=False)
    values = dict(request.getfixturevalue("cli_inputs"), tmp=tmp_path)
    for name in ("head", "embeddings"):
        if "{" + name + "}" in row.argv:
            values[name] = request.getfixturevalue("busi_seg_head" if name == "head" else name)
    prepare(row.setup, tmp_path, values)
    if "read_only" in row.setup.split():
        read_only_folder(tmp_path / "ro", monkeypatch, request)
    before = checksum(tmp_path, row.creates)
    argv = shlex.split(row.argv.format(**values))
    if argv[0] == "distill":
        argv += ["--teacher.model_kwargs", TEACHER]
    if row.fault:
        row.fault(monkeypatch)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sonodistill {argv[0]}"), lines[0]
    for text in row.says:
        assert text.format(**values) in lines[0], lines[0]
    for text in row.lacks:
        assert text not in lines[0], lines[0]
    assert checksum(tmp_path, row.creates) == before
    return lines[0]


@contextlib.contextmanager
def running_app(models: Path, work: Path, address: str = "127.0.0.1", **options):
    """`sonodistill app` serving `models` in a thread on a free port of `address` (its
    options checked as the command checks them); yields address, port, url and the app state."""
    from sonodistill.deploy.app.server import AppConfig, bind, check_options, server

    cfg = AppConfig(models=[str(models)], work_dir=str(work), threads=1, **options)
    check_options(cfg)
    sock = bind(address, 0)
    instance = server(cfg)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if instance.started:
            break
        time.sleep(0.05)
    port = sock.getsockname()[1]
    try:
        yield SimpleNamespace(
            address=address,
            port=port,
            url=f"http://{address}:{port}",
            state=instance.config.app.state.sonodistill,
            app_state=instance.config.app.state,
        )
    finally:
        instance.should_exit = True
        thread.join(10)


MACHINE_CACHE = os.environ.get("SONODISTILL_CACHE")
"""The machine's cache folder as the session found it (`_fingerprint_cache` replaces it)."""


@pytest.fixture(scope="session")
def simulated_teacher_file(_fingerprint_cache) -> Path:
    """The demo's simulated pretrained teacher (models.simulated_teacher): read from the
    machine's cache, as the demo does (built there once per machine and settings: minutes on
    two cores), and copied into the session's cache folder, where the code under test looks."""
    from sonodistill.models.simulated_teacher import SimTeacherConfig, cache_path, simulated_teacher

    cfg = SimTeacherConfig()
    with pytest.MonkeyPatch.context() as mp:
        if MACHINE_CACHE is None:
            mp.delenv("SONODISTILL_CACHE")
        else:
            mp.setenv("SONODISTILL_CACHE", MACHINE_CACHE)
        built = simulated_teacher(cfg)
    session = cache_path(cfg)
    session.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, session)
    return session
