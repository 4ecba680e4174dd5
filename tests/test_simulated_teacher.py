"""The simulated pretrained teacher: Meta's file layout read by the normal loader, refused like
any file when damaged or of another size, cached by its settings, deterministic from its seed,
and labelled by the simulator's own tissue map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import official_shapes

import sonodistill.models.simulated_teacher as sim_teacher
from sonodistill.data.simulator import OUTSIDE, SimConfig, simulate_frame
from sonodistill.models import Teacher, TeacherConfig, WeightsMismatchError, to_model_input
from sonodistill.models.simulated_teacher import (
    LESION_CLASS,
    OUTSIDE_CLASS,
    SimTeacherConfig,
    cache_path,
    simulated_teacher,
    teacher_config,
    tissue_classes,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = SimTeacherConfig(
    image_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=1, frames=8, steps=2
)


def test_the_file_is_metas_layout_and_loads_through_the_teacher_loader(simulated_teacher_file):
    cfg = SimTeacherConfig()
    state = torch.load(simulated_teacher_file, weights_only=True)
    arch = {"dim": 192, "depth": 4, "heads": 3, "hidden": 768, "swiglu": False}
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(**arch, patch=16)
    assert not state["blocks.0.attn.qkv.bias"][192:384].any()  # the k bias, masked
    teacher = Teacher(teacher_config(simulated_teacher_file, cfg))
    info = teacher.weights_info
    assert info["format"] == "official" and "bias_mask checked" in " ".join(info["notes"])
    x = to_model_input(torch.rand(2, 1, cfg.image_size, cfg.image_size))
    assert teacher(x).shape == (2, 2 * 192, 8, 8)


def test_a_damaged_or_mis_sized_teacher_file_is_refused_in_one_line(
    simulated_teacher_file, tmp_path
):
    cfg = SimTeacherConfig()
    truncated = tmp_path / "truncated.pth"
    data = simulated_teacher_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsMismatchError) as err:
        Teacher(teacher_config(truncated, cfg))
    assert str(truncated) in str(err.value) and "not a readable weights file" in str(err.value)
    assert "\n" not in str(err.value)
    for change in ({"depth": 3}, {"embed_dim": 384, "num_heads": 6}, {"patch_size": 8}):
        kwargs = {**cfg.model_kwargs(), **change}
        with pytest.raises(WeightsMismatchError) as err:
            Teacher(TeacherConfig(weights=str(simulated_teacher_file), model_kwargs=kwargs))
        message = str(err.value)
        assert str(simulated_teacher_file) in message and "\n" not in message, change


def test_cached_by_settings_and_deterministic_from_the_seed(monkeypatch):
    first = simulated_teacher(TINY)
    assert first == cache_path(TINY) and first.is_file()
    assert not list(first.parent.glob(".*.tmp*")), "written atomically"

    def no_training(*args):
        raise AssertionError("the cached teacher was trained again")

    monkeypatch.setattr(sim_teacher, "train", no_training)
    assert simulated_teacher(TINY) == first
    monkeypatch.undo()
    model = sim_teacher.train(TINY)  # the same seed: the same weights
    loaded = Teacher(teacher_config(first, TINY))
    x = to_model_input(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    maps = model.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
    torch.testing.assert_close(loaded(x), torch.cat(maps, dim=1), rtol=0, atol=1e-5)
    again = model.state_dict()
    other = SimTeacherConfig(**{**TINY.__dict__, "seed": 1})
    assert cache_path(other) != first
    assert not torch.equal(
        sim_teacher.train(other).state_dict()["norm.weight"], again["norm.weight"]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"presets": ["lung"]}, "use some of"),
        ({"image_size": 100}, "not a multiple of its patch_size"),
        ({"embed_dim": 18, "num_heads": 1}, "multiple of 4"),
        ({"steps": 0}, "steps must be positive"),
    ],
)
def test_bad_settings_are_refused_before_training(change, message):
    with pytest.raises(ValueError, match=message):
        simulated_teacher(SimTeacherConfig(**{**TINY.__dict__, **change}))


@pytest.mark.parametrize("preset", ["thyroid", "abdomen"])  # linear, convex
def test_tissue_classes_follow_depth_lesion_and_sector(preset):
    frame = simulate_frame(3, preset, "cyst", SimConfig(size=64))
    classes = tissue_classes(frame.layers, frame.mask)
    assert (classes[frame.mask > 0] == LESION_CLASS).all()
    inside = frame.layers != OUTSIDE
    assert ((classes == OUTSIDE_CLASS) == ~inside).all()
    if preset == "abdomen":  # a convex probe: black outside the sector (but its rim)
        assert (~inside).sum() > 500 and (frame.image[~inside] == 0).mean() > 0.9
    else:
        assert inside.all()
    column = frame.layers[:, 32][inside[:, 32]]
    assert set(np.unique(column)) == {0, 1, 2, 3}
    assert (np.diff(column.astype(int)) >= 0).all(), "layers deepen from the skin down"


def test_the_default_teacher_keeps_the_cache_key_it_had_before_knows_existed():
    """The key of the file every cache already holds: the settings' hash without `knows`."""
    import dataclasses
    import hashlib
    import json

    for cfg in (SimTeacherConfig(), TINY):
        settings = {"version": sim_teacher.VERSION, "torch": torch.__version__}
        settings |= {k: v for k, v in dataclasses.asdict(cfg).items() if k != "knows"}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        assert cache_path(cfg).name == f"simulated_teacher-{key}.pth"
    keys = {cache_path(dataclasses.replace(TINY, knows=k)) for k in ("all", "lesions", "layers")}
    assert len(keys) == 3


def test_teachers_that_know_lesions_or_layers_learn_different_patch_labels():
    from sonodistill.models.simulated_teacher import patch_classes, pretraining_set

    frame = simulate_frame(3, "thyroid", "cyst", SimConfig(size=64))
    assert frame.mask.sum() > 0
    full = patch_classes(frame.layers, frame.mask, "all")
    lesions = patch_classes(frame.layers, frame.mask, "lesions")
    layers = patch_classes(frame.layers, frame.mask, "layers")
    assert np.array_equal(full, tissue_classes(frame.layers, frame.mask))
    assert np.array_equal(lesions == 1, frame.mask > 0) and set(np.unique(lesions)) == {0, 1}
    assert np.array_equal(layers, frame.layers) and LESION_CLASS not in layers
    shares = {
        k: pretraining_set(SimTeacherConfig(**{**TINY.__dict__, "knows": k}))["shares"]
        for k in ("lesions", "layers")
    }
    assert shares["lesions"].shape[1] == 3 and shares["layers"].shape[1] == 6
    torch.testing.assert_close(shares["lesions"].sum(1), torch.ones_like(shares["lesions"][:, 0]))
    assert shares["layers"][:, LESION_CLASS].sum() == 0  # no patch of a layers teacher is lesion


def test_two_processes_asking_at_once_build_the_teacher_once(monkeypatch):
    """A second demo or test worker waits for the first build and reads its file (two threads
    here: each opens the lock file itself, so the kernel's flock keeps them apart)."""
    import threading
    import time

    cfg = SimTeacherConfig(**{**TINY.__dict__, "seed": 7})
    real_train, builds = sim_teacher.train, []

    def slow_train(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.5)  # the second caller arrives while the first is building
        return real_train(*args, **kwargs)

    monkeypatch.setattr(sim_teacher, "train", slow_train)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(simulated_teacher(cfg))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and paths == [cache_path(cfg)] * 2 and paths[0].is_file()
