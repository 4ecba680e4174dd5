"""What the tests share, in one place: the real ultrasound data beside the repository, tiny
model configs, fake distill runs, real lung frames, random weights in Meta's DINOv3 checkpoint
layout, and the one-thread fixture of the heavier model tests.

Test modules never import each other; they import the helpers below as `from conftest import
...` (one name: pytest puts tests/ on the path) and get the fixtures by argument."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import timm
import torch
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
        img_size=64,
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


@pytest.fixture(scope="session")
def simulated_teacher_file(_fingerprint_cache) -> Path:
    """The demo's simulated pretrained teacher (models.simulated_teacher), built once per
    session into the session's cache folder (about a minute on two cores)."""
    from sonodistill.models.simulated_teacher import SimTeacherConfig, simulated_teacher

    return simulated_teacher(SimTeacherConfig())
