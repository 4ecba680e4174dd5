"""A pretrained teacher for the simulated world: a small DINOv3 ViT that knows anatomy and lesions.

Real DINOv3 weights cannot be had on every machine, and a random teacher knows nothing, so no
run could show that a student learns what its teacher knows. This module makes a teacher that
does: a small ViT of the DINOv3 architecture (timm's `vit_small_patch16_dinov3_qkvb` narrowed:
RoPE, 4 registers, q/v biases, LayerScale) trained WITH LABELS on a "pretraining world" of
simulated frames (`sonodistill.data.simulator`):

- per patch: the share of each tissue class in it (the preset's four layers from the skin down,
  lesion, outside the probe's sector), a soft cross-entropy (lesion weighted up: it is rare);
- per image, on the CLS token: lesion type and preset.

Its labels come from the presets in `SimTeacherConfig.presets` only (muscle and abdomen by
default): those are its "natural images". Breast and thyroid, the presets of the demo's
downstream tasks, are held out: the teacher never sees a frame of them, as DINOv3 never saw the
ultrasound of BUSI or DDTI. Distillation then uses unlabeled frames of every preset.

The weights are saved in Meta's official .pth layout (`timm_to_official`) and read back by the
normal teacher loader, `TeacherConfig(weights=FILE, name=..., model_kwargs=...)`, like any
user's DINOv3 file. Deterministic from the seed on one machine (built on BUILD_THREADS
threads); built once (76 s on two idle cores) and cached in `$SONODISTILL_CACHE` (default
~/.cache/sonodistill/hashes) under a hash of its settings and `VERSION`, written
atomically, so the demo and the tests build it once per machine.

Two teachers can know different things (`SimTeacherConfig.knows`, for multi-teacher
distillation, `benchmarks/multi_teacher.py`): `all` (the default above), `lesions` (per patch:
lesion / other tissue / outside the sector; per image: lesion type) or `layers` (per patch: the
four layers and outside, the lesion drawn as the layer it sits in; per image: the preset).

What it is not: a foundation model. It knows one simulated world, learned from labels in a
few minutes; it shows that distillation carries such knowledge into a CNN, not how much a real
DINOv3 carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sonodistill.data.neardup import cache_dir
from sonodistill.data.simulator import LESIONS, OUTSIDE, PRESETS, SimConfig, simulate_frame
from sonodistill.io import atomic_path
from sonodistill.models.families.dinov3_vit import timm_to_official
from sonodistill.models.preprocess import to_model_input
from sonodistill.models.specs import SimTeacherConfig, TeacherConfig
from sonodistill.utils.rundir import NO_FLOCK

log = logging.getLogger(__name__)

ARCH = "vit_small_patch16_dinov3_qkvb"
VERSION = 1
"""Bumped whenever the training code changes the weights it makes (a new cache key)."""
LESION_CLASS, OUTSIDE_CLASS, N_CLASSES = 4, 5, 6
LESION_ONLY = np.array([0, 0, 0, 0, 1, 2])
"""A `lesions` teacher's class for each tissue class: other tissue, lesion, outside."""
LESION_WEIGHT = 4.0
"""Weight of the lesion class in the per-patch loss: lesion patches are a few percent."""


def check(cfg: SimTeacherConfig) -> None:
    """ValueError for settings that cannot make a teacher (before minutes of work)."""
    unknown = sorted(set(cfg.presets) - set(PRESETS))
    if unknown or not cfg.presets:
        raise ValueError(f"simulated teacher presets {cfg.presets}: use some of {list(PRESETS)}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"simulated teacher image_size {cfg.image_size} is not a multiple of its "
            f"patch_size {cfg.patch_size}"
        )
    if cfg.knows not in ("all", "lesions", "layers"):
        raise ValueError(f"simulated teacher knows {cfg.knows!r}: use all, lesions or layers")
    if cfg.embed_dim % cfg.num_heads or (cfg.embed_dim // cfg.num_heads) % 4:
        raise ValueError("simulated teacher embed_dim / num_heads must be a multiple of 4 (RoPE)")
    for name in ("frames", "steps", "batch_size", "depth"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"simulated teacher {name} must be positive")


def cache_path(cfg: SimTeacherConfig) -> Path:
    """Where the teacher of these settings is cached (whether or not it exists yet)."""
    settings = {"version": VERSION, "torch": torch.__version__, **dataclasses.asdict(cfg)}
    if cfg.knows == "all":  # the key of the teacher made before `knows` existed
        del settings["knows"]
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"simulated_teacher-{key}.pth"


def teacher_config(path: str | Path, cfg: SimTeacherConfig, **overrides) -> TeacherConfig:
    """The TeacherConfig that loads the file at `path` through the normal teacher loader."""
    return TeacherConfig(weights=str(path), name=ARCH, model_kwargs=cfg.model_kwargs(), **overrides)


def simulated_teacher(
    cfg: SimTeacherConfig | None = None, progress: Callable[[int, int, float], None] | None = None
) -> Path:
    """The official-layout .pth of the teacher these settings make: from the cache, else
    trained (`progress(step, steps, loss)` follows the training) and cached."""
    cfg = cfg or SimTeacherConfig()
    check(cfg)
    path = cache_path(cfg)
    if path.is_file():
        return path
    with _one_builder(path):
        if path.is_file():  # built by the process this one waited for
            return path
        log.info("training the simulated teacher (%s): %s", path.name, cfg)
        threads = torch.get_num_threads()
        torch.set_num_threads(BUILD_THREADS)
        try:
            model = train(cfg, progress)
        finally:
            torch.set_num_threads(threads)
        with atomic_path(path) as tmp:
            torch.save(timm_to_official(model), tmp)
    return path


BUILD_THREADS = 2
"""Threads of every build, whatever the caller's: a CPU kernel's sums depend on how they are
split, and 300 steps of training amplify that into another teacher (a build on one thread differed
by up to 0.18 in a weight), so the same settings make the same file on a machine."""


@contextlib.contextmanager
def _one_builder(path: Path):
    """One build per teacher file: a second process (another demo, a test worker) waits for
    the first and then reads its file. The kernel releases the lock if the builder dies; where
    the file system has no flock, each process builds its own (the write is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise
        yield


# --- the pretraining world ------------------------------------------------------------------------


def pretraining_set(cfg: SimTeacherConfig) -> dict[str, torch.Tensor]:
    """Labelled frames of the teacher's presets: images (N, 1, S, S) in [0, 1], per-patch class
    shares (N, 6, g, g), lesion type and preset indices (N,)."""
    sim = SimConfig(size=cfg.image_size)
    images, classes, lesions, presets = [], [], [], []
    for i in range(cfg.frames):
        preset = cfg.presets[i % len(cfg.presets)]
        lesion = LESIONS[(i // len(cfg.presets)) % len(LESIONS)]
        frame = simulate_frame(10_000_019 * (cfg.seed + 1) + i, preset, lesion, sim)
        images.append(frame.image)
        classes.append(patch_classes(frame.layers, frame.mask, cfg.knows))
        lesions.append(LESIONS.index(lesion))
        presets.append(list(PRESETS).index(preset))
    labels = torch.from_numpy(np.stack(classes))
    n_classes = n_patch_classes(cfg.knows)
    shares = F.avg_pool2d(F.one_hot(labels, n_classes).permute(0, 3, 1, 2).float(), cfg.patch_size)
    return {
        "images": torch.from_numpy(np.stack(images))[:, None],
        "shares": shares,
        "lesion": torch.tensor(lesions),
        "preset": torch.tensor(presets),
    }


def tissue_classes(layers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-pixel class: the layer index (0-3), LESION_CLASS inside the lesion, OUTSIDE_CLASS
    beyond a convex probe's sector."""
    out = layers.astype(np.int64)
    out[layers == OUTSIDE] = OUTSIDE_CLASS
    out[mask > 0] = LESION_CLASS
    return out


def patch_classes(layers: np.ndarray, mask: np.ndarray, knows: str = "all") -> np.ndarray:
    """Per-pixel class of what a teacher that `knows` this learns (module doc)."""
    if knows == "layers":  # the lesion is not a class: the layer it sits in
        return tissue_classes(layers, np.zeros_like(mask))
    classes = tissue_classes(layers, mask)
    return LESION_ONLY[classes] if knows == "lesions" else classes


def n_patch_classes(knows: str) -> int:
    return {"all": N_CLASSES, "lesions": 3, "layers": N_CLASSES}[knows]


def lesion_class(knows: str) -> int | None:
    """The per-patch class index of the lesion (weighted up), None when it is not a class."""
    return {"all": LESION_CLASS, "lesions": 1, "layers": None}[knows]


# --- training -------------------------------------------------------------------------------------


class _Heads(nn.Module):
    """Per-patch tissue classes from the final-normed patch tokens; lesion type and preset
    from the CLS token. Dropped after training: the teacher file holds the backbone only."""

    def __init__(self, dim: int, n_classes: int = N_CLASSES):
        super().__init__()
        self.patch = nn.Linear(dim, n_classes)
        self.lesion = nn.Linear(dim, len(LESIONS))
        self.preset = nn.Linear(dim, len(PRESETS))


def build_backbone(cfg: SimTeacherConfig) -> nn.Module:
    """The timm DINOv3 ViT to train. LayerScale starts at 0.1, not timm's 1e-5 (set for
    1000-epoch pretraining): a one-minute training needs every block to act from the start."""
    import timm

    return timm.create_model(
        ARCH, pretrained=False, num_classes=0, init_values=0.1, **cfg.model_kwargs()
    )


def train(
    cfg: SimTeacherConfig, progress: Callable[[int, int, float], None] | None = None
) -> nn.Module:
    """Supervised training on the pretraining world; the trained backbone in eval mode."""
    torch.manual_seed(cfg.seed)
    data = pretraining_set(cfg)
    model = build_backbone(cfg)
    n_classes = n_patch_classes(cfg.knows)
    heads = _Heads(cfg.embed_dim, n_classes)
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    weight = torch.ones(n_classes)
    if lesion_class(cfg.knows) is not None:
        weight[lesion_class(cfg.knows)] = LESION_WEIGHT
    gen = torch.Generator().manual_seed(cfg.seed)
    grid = cfg.image_size // cfg.patch_size
    n_prefix = model.num_prefix_tokens
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data["images"]), (cfg.batch_size,), generator=gen)
        x, shares = data["images"][idx], data["shares"][idx]
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5  # the world is left-right free
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        shares = torch.where(flip[:, None, None, None], shares.flip(-1), shares)
        tokens = model.forward_features(to_model_input(x))
        patch = heads.patch(tokens[:, n_prefix:]).transpose(1, 2)
        logits = patch.reshape(cfg.batch_size, n_classes, grid, grid)
        dense = -(weight[None, :, None, None] * shares * F.log_softmax(logits, 1)).sum(1).mean()
        cls = tokens[:, 0]
        # Per image: lesion type and preset (all); lesion type only (lesions); preset (layers).
        loss = dense
        if cfg.knows != "layers":
            loss = loss + F.cross_entropy(heads.lesion(cls), data["lesion"][idx])
        if cfg.knows != "lesions":
            loss = loss + F.cross_entropy(heads.preset(cls), data["preset"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, cfg.steps, loss.item())
    return model.eval()
