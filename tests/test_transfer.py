"""Distillation transfers what the teacher knows, and the check that says so can fail (issue 18).

The teacher is the simulated pretrained teacher (`models.simulated_teacher`: a small DINOv3 ViT
that learned anatomy and lesions from labels on muscle and abdomen frames, read from Meta's
file layout by the normal loader). A tiny CNN student is distilled from it by
`sonodistill.distill.distill` on unlabeled frames of every preset, then checked on breast and
thyroid frames, which the teacher never saw. The check has three parts, each a property of
the method:

- probe: a linear segmentation probe of the lesions (`evaluate.train.run_one`, the suite's
  protocol) on the exported backbone beats the same architecture at random initialisation by
  at least PROBE_MARGIN mean Dice, significant in a paired Wilcoxon test over the test images
  (p < ALPHA), and recovers at least RECOVERED of the teacher's own gain over random;
- tokens: on held-out frames, the exported backbone with its trained projection head explains
  at least R2_MIN of the variance of the targets the normal Teacher computes (clean code, before
  any break): 1 - Eq. 6's error / the targets' variance. (Cosine alone misses a lost final norm:
  the direction survives, the scale does not.);
- same view: at every training step the teacher and the student are fed the same tensor
  (Eq. 4-5), as a forward pre-hook on every module sees it.

Each break of the issue's list is injected into the distillation alone (monkeypatch) and must
fail the check: BREAKS is the table of break -> the parts that catch it, and a break's run is
checked by exactly those parts, each of which must fail. Mixup reaching only the student shows in no
product of the run: this teacher is nearly linear under mixing (its tokens of a 50/50 mix and
the mix of its tokens agree to R^2 0.88), so the student's best guess on a mix is right either
way; the same-view part catches it. The export breaks re-run only the end of a finished run
(resumed at its last step), so they exercise the real export without training again; the
breaks only the same-view part catches run VIEW_STEPS steps (every step shows them).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.nn.modules.module import register_module_forward_pre_hook

import sonodistill.distill.recipe as recipe
from sonodistill.data.simulator import LESIONS, SimConfig, simulate_frame, write_corpus, write_png
from sonodistill.distill import DistillConfig, OptimConfig, distill
from sonodistill.distill.checkpoint import load_checkpoint
from sonodistill.evaluate.datasets import load_seg_folder
from sonodistill.evaluate.train import TrainSettings, run_one
from sonodistill.models import Student, StudentConfig, Teacher, build_encoder, to_model_input
from sonodistill.models.families.dinov3_vit import DINOv3ViT
from sonodistill.models.simulated_teacher import SimTeacherConfig, teacher_config
from sonodistill.models.specs import LAST_CHECKPOINT, STUDENT_WEIGHTS

pytestmark = pytest.mark.slow

STUDENT = "test_resnet"  # timm's tiny ResNet (BatchNorm, 96 channels at stride 32)
SIZE = SimTeacherConfig().image_size
HELD_OUT = ("breast", "thyroid")
PROBE_MARGIN, ALPHA, RECOVERED, R2_MIN = 0.05, 0.01, 0.5, 0.2
STEPS, VIEW_STEPS = 60, 3
"""Distillation steps of the baseline and the breaks; of the breaks only the same-view part
catches (it counts the steps whose views differ: any step shows it)."""


# --- the world, the runs and the check ------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, simulated_teacher_file) -> dict:
    return make_world(tmp_path_factory.mktemp("transfer"), simulated_teacher_file)


def make_world(root: Path, teacher_file: Path) -> dict:
    """Unlabeled frames of every preset; a lesion set of the held-out presets with a split;
    the teacher's clean targets on the test frames; the random and teacher probes."""
    corpus = write_corpus(root / "corpus", 256, SIZE, seed=7)
    seg = root / "lesions"
    for i in range(120):  # lesion frames only: Dice measures the lesion, not empty frames
        frame = simulate_frame(
            5_000_011 + i, HELD_OUT[i % 2], LESIONS[1 + (i // 2) % 3], SimConfig(size=SIZE)
        )
        write_png(seg / "images" / f"{i:03d}.png", frame.image)
        write_png(seg / "masks" / f"{i:03d}.png", frame.mask * 255)
    index = load_seg_folder(seg, name="held-out lesions")
    ids = [r.id for r in index.records]
    splits = {"ids": {"train": ids[:40], "val": ids[40:56], "test": ids[56:]}}
    teacher = teacher_config(teacher_file, SimTeacherConfig())
    x = torch.stack([_image(index, i) for i in splits["ids"]["test"]])
    world = {
        "corpus": corpus,
        "root": root,
        "index": index,
        "splits": splits,
        "teacher": teacher,
        "test_images": x,
        "targets": Teacher(teacher)(to_model_input(x)),
    }
    world["random"] = probe(world, f"random:{STUDENT}")
    world["teacher_probe"] = probe(world, teacher.spec())
    return world


def _image(index, image_id: str) -> torch.Tensor:
    from sonodistill.evaluate.datasets import SegDataset

    data = SegDataset.of(index, index.subset([image_id]), SIZE)
    return data[0][0]


def distill_config(world: dict, out: Path, **changes) -> DistillConfig:
    cfg = DistillConfig(
        data=str(world["corpus"]),
        out=str(out),
        teacher=world["teacher"],
        student=StudentConfig(name=STUDENT),
        optim=OptimConfig(lr=2e-3),
        image_size=SIZE,
        batch_size=16,
        max_steps=STEPS,
        num_workers=0,
        log_every=1000,
        checkpoint_every=10**9,
    )
    return replace(cfg, **changes)


def probe(world: dict, encoder) -> np.ndarray:
    """Per-image test Dice of a linear segmentation probe on a frozen encoder."""
    settings = TrainSettings(
        seg_image_size=SIZE, epochs=15, seg_batch=8, lr=1e-2, restart_epochs=15, device="cpu"
    )
    result = run_one(world["index"], world["splits"], encoder, "linear", 1.0, 0, settings)
    return np.array(result["per_image"]["dice"])


def token_r2(world: dict, run: Path) -> float:
    """1 - (Eq. 6 error / variance of the targets) of the exported backbone + its trained head
    (the last checkpoint's) against the clean teacher targets on the test frames."""
    backbone = build_encoder(f"timm:{STUDENT}={run / STUDENT_WEIGHTS}").eval()
    head = load_checkpoint(run / LAST_CHECKPOINT)["student"]
    t = world["targets"]
    with torch.no_grad():
        z = F.conv2d(backbone(to_model_input(world["test_images"])), *_head(head))
        z = F.interpolate(z, size=t.shape[-2:], mode="bilinear", align_corners=False)
    variance = (t - t.mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum()
    return float(1 - (z - t).pow(2).sum() / variance)


def _head(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return state["projection.weight"], state["projection.bias"]


@contextlib.contextmanager
def views():
    """Counts the training steps whose teacher and student inputs differ (a forward pre-hook
    on every module: a Teacher call, then the Student's call of the same step)."""
    seen = {"steps": 0, "differ": 0, "teacher": None}

    def hook(module, args):
        if isinstance(module, Teacher):
            seen["teacher"] = args[0].detach().clone()
        elif isinstance(module, Student) and seen["teacher"] is not None:
            x, t = args[0], seen.pop("teacher")
            seen["steps"] += 1
            seen["differ"] += x.shape != t.shape or not torch.equal(x, t)
            seen["teacher"] = None

    handle = register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


PARTS = ("probe", "tokens", "same view")


def check(world: dict, run: Path, seen: dict, parts=PARTS) -> dict:
    """The measured numbers and which of the check's `parts` fail (each part is computed only
    when asked for: a break's run is checked by the parts its row of BREAKS names)."""
    numbers, failed = {"steps": seen["steps"], "differ": seen["differ"]}, set()
    if "probe" in parts:
        dice = probe(world, f"student:{run}")
        random, teacher = world["random"], world["teacher_probe"]
        gain = float(dice.mean() - random.mean())
        p = 1.0  # no test image changed: nothing was learnt
        if np.any(dice != random):
            p = float(stats.wilcoxon(dice, random, alternative="greater").pvalue)
        recovered = gain / float(teacher.mean() - random.mean())
        numbers.update(dice=dice.mean(), gain=gain, p=p, recovered=recovered)
        if not (gain >= PROBE_MARGIN and p < ALPHA and recovered >= RECOVERED):
            failed.add("probe")
    if "tokens" in parts:
        numbers["r2"] = r2 = token_r2(world, run)
        if not r2 >= R2_MIN:
            failed.add("tokens")
    if "same view" in parts and seen["differ"]:
        failed.add("same view")
    return {**numbers, "failed": failed}


@pytest.fixture(scope="module")
def baseline(world) -> tuple[Path, dict]:
    with views() as seen:
        return distill(distill_config(world, world["root"] / "baseline")), seen


# --- the breaks -----------------------------------------------------------------------------------


def _wrap(mp, owner, name: str, change) -> None:
    """Replace owner.name by change(original, *args, **kwargs)."""
    original = getattr(owner, name)
    mp.setattr(owner, name, lambda *a, **k: change(original, *a, **k))


def transposed(mp):  # the student map in the other raster order (rows for columns)
    _wrap(mp, Student, "forward", lambda f, self, x, grid: f(self, x, grid).transpose(-2, -1))


def flipped(mp):  # the student map upside down
    _wrap(mp, Student, "forward", lambda f, self, x, grid: f(self, x, grid).flip(-2))


def shuffled(mp):  # the teacher's tokens in a scrambled order (a wrong reshape)
    perm = torch.randperm((SIZE // 16) ** 2, generator=torch.Generator().manual_seed(0))

    def shuffle(f, self, x):
        t = f(self, x)
        return t.flatten(2)[:, :, perm].reshape(t.shape)

    _wrap(mp, Teacher, "forward", shuffle)


def views_apart(mp, teacher_view, student_view=lambda raw, mixed: mixed):
    """recipe.train_step feeding the teacher teacher_view(raw, mixed) and the student
    student_view(raw, mixed) of the augmented frames `raw` and their mixup `mixed`."""

    def step(fabric, teacher, student, augment, objective, images, use_mixup, memory_format):
        raw = augment(images.float().div_(255))
        mixed = recipe.mixup(raw)[0] if use_mixup else raw
        with fabric.autocast():
            target = teacher(teacher_view(raw, mixed))
            x = to_model_input(student_view(raw, mixed)).contiguous(memory_format=memory_format)
            pred = student(x, target.shape[-2:])
        loss, metrics = objective(pred, target)
        fabric.backward(loss)
        return loss, metrics

    mp.setattr(recipe, "train_step", step)


def normalisation(mp):  # the teacher fed [0, 1] frames, the student ImageNet-normalised ones
    views_apart(mp, lambda raw, mixed: mixed.expand(-1, 3, -1, -1))


def augmentation(mp):  # the teacher sees another crop and flip than the student
    other = torch.nn.Sequential(
        K.RandomResizedCrop((SIZE, SIZE), scale=(0.5, 1.0)), K.RandomHorizontalFlip()
    )
    views_apart(mp, lambda raw, mixed: to_model_input(other(mixed)))


def mixup_student_only(mp):  # mixup reaches the student, the teacher sees the frames unmixed
    views_apart(mp, lambda raw, mixed: to_model_input(raw))


def mixup_teacher_only(mp):  # mixup reaches the teacher, the student sees the frames unmixed
    views_apart(mp, lambda raw, mixed: to_model_input(mixed), lambda raw, mixed: raw)


def first_blocks(mp):  # targets from the first blocks, not the last
    def first(self, x, n, norm=True):
        return self.backbone.forward_intermediates(
            x, indices=list(range(n)), norm=norm, output_fmt="NCHW", intermediates_only=True
        )

    mp.setattr(DINOv3ViT, "token_maps", first)


def before_norm(mp):  # targets taken before the final norm
    _wrap(mp, DINOv3ViT, "token_maps", lambda f, self, x, n, norm=True: f(self, x, n, False))


def untrained_export(mp):  # the exported backbone is the initial one, not the trained one
    def initial(f, self):
        torch.manual_seed(0)
        return {k: v.clone() for k, v in type(self)(self.cfg, 1).backbone.state_dict().items()}

    _wrap(mp, Student, "backbone_state_dict", initial)


def batchnorm_lost(mp):  # the exported backbone without its BatchNorm running statistics
    def reset(f, self):
        state = f(self)
        for key in state:
            if key.endswith("running_mean"):
                state[key] = torch.zeros_like(state[key])
            elif key.endswith("running_var"):
                state[key] = torch.ones_like(state[key])
        return state

    _wrap(mp, Student, "backbone_state_dict", reset)


EXPORT = (untrained_export, batchnorm_lost)
BREAKS = {
    # break: the parts of the check that catch it
    transposed: {"tokens"},
    flipped: {"tokens"},
    shuffled: {"tokens"},
    normalisation: {"tokens", "same view"},
    augmentation: {"same view"},
    mixup_student_only: {"same view"},
    mixup_teacher_only: {"same view"},
    first_blocks: {"tokens"},
    before_norm: {"tokens"},
    untrained_export: {"probe", "tokens"},
    batchnorm_lost: {"tokens"},  # the probe too, with some teachers (docs/demo.md)
}


def broken_run(world: dict, baseline: Path, brk, monkeypatch) -> tuple[Path, dict]:
    """A distillation with the break injected. The export breaks resume the finished baseline
    at its last step, so only the export runs; the view breaks show from the first step, so
    their runs stop after VIEW_STEPS."""
    out = world["root"] / brk.__name__
    with monkeypatch.context() as mp, views() as seen:
        brk(mp)
        if brk in EXPORT:
            shutil.copytree(baseline, out)
            return distill(distill_config(world, out, resume=True)), seen
        steps = VIEW_STEPS if BREAKS[brk] == {"same view"} else STEPS
        return distill(distill_config(world, out, max_steps=steps)), seen


# --- tests ----------------------------------------------------------------------------------------


def test_distilled_student_learns_what_the_teacher_knows(world, baseline):
    result = check(world, *baseline)
    assert result["failed"] == set() and result["steps"] == STEPS, result
    teacher_gain = world["teacher_probe"].mean() - world["random"].mean()
    assert teacher_gain > 2 * PROBE_MARGIN, "the teacher knows the held-out lesions"


@pytest.mark.parametrize("brk", list(BREAKS), ids=lambda b: b.__name__)
def test_every_break_fails_the_check(world, baseline, brk, monkeypatch):
    result = check(world, *broken_run(world, baseline[0], brk, monkeypatch), parts=BREAKS[brk])
    assert result["failed"] == BREAKS[brk], result  # every part its row names catches it
