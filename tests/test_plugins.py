"""Plugins from outside the package reach the CLI in a fresh process (issue 20, design b2).

A toy package is installed for real (`pip install --target SITE`: its dist-info carries the
`sonodistill.plugins` entry points) and adds an encoder family, an objective and a backend,
one module each, loaded only by the registry that asks (`families.toy`, `losses.toy`,
`backends.toy`). Without SITE on the path the same command line is refused in one line. A
module given with `--import` (no package, no entry point) is the other way in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sonodistill

pytestmark = pytest.mark.slow

SRC = Path(sonodistill.__file__).resolve().parents[1]
TINY_TEACHER = "{embed_dim: 48, depth: 2, num_heads: 2}"

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "sonodistill-toy"
version = "0.1"

[project.entry-points."sonodistill.plugins"]
"families.toy" = "sonodistill_toy.family"
"losses.toy" = "sonodistill_toy.loss"
"backends.toy" = "sonodistill_toy.backend"

[tool.setuptools]
packages = ["sonodistill_toy"]
"""

FAMILY = '''\
"""A toy encoder family: a timm CNN under another name."""
from sonodistill.models.families.timm_cnn import TimmCNN
from sonodistill.models.specs import FAMILIES


@FAMILIES.register("toy-cnn", title="toy CNN")
class ToyCNN(TimmCNN):
    family = "toy-cnn"
    title = "toy CNN"
    default_name = "resnet18"
'''

LOSS = '''\
"""A toy objective: token L1."""
from sonodistill.distill.config import LOSSES


@LOSSES.register("toy_l1", title="toy L1")
def toy_l1(student, teacher):
    diff = (student.float() - teacher.float()).abs()
    return diff.sum(dim=1).mean(), {"toy_max": diff.max().detach()}
'''

BACKEND = '''\
"""A toy backend: ONNX Runtime fp32 under another name and file (one registry line)."""
from sonodistill.deploy.runtimes import BACKENDS, Backend

BACKENDS.register(
    "toy_ort",
    Backend(
        label="toy ONNX fp32",
        file="model_toy.onnx",
        open="sonodistill.deploy.onnx_utils:open_session",
        write="sonodistill.deploy.onnx_utils:write_fp32",
    ),
)
'''

EXTRA = """\
from sonodistill.distill.config import LOSSES


@LOSSES.register("toy_l2", title="toy L2")
def toy_l2(student, teacher):
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean(), {}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The toy package, installed by pip into a folder of its own."""
    root = tmp_path_factory.mktemp("toy")
    package = root / "src" / "sonodistill_toy"
    package.mkdir(parents=True)
    (root / "src" / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text('"""sonodistill plugins for a test."""\n')
    (package / "family.py").write_text(FAMILY)
    (package / "loss.py").write_text(LOSS)
    (package / "backend.py").write_text(BACKEND)
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "--no-index", "--target", str(target), str(root / "src")], check=True)
    assert (target / "sonodistill_toy-0.1.dist-info" / "entry_points.txt").is_file()
    return target


def sonodistill_cli(*args: str, path: list[Path] = (), cwd: Path | None = None):
    """`python -m sonodistill.cli ARGS` in a fresh process with `path` before the package."""
    env = {k: v for k, v in os.environ.items() if k != "SONODISTILL_IMPORT"}
    env["PYTHONPATH"] = os.pathsep.join(map(str, [*path, SRC]))
    command = [sys.executable, "-m", "sonodistill.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def distill_args(frames: Path, out: Path) -> list[str]:
    flags = (
        f"distill --data {frames} --out {out} --student.family toy-cnn --student.name resnet18 "
        "--loss toy_l1 --teacher.random_init true --image_size 32 --batch_size 4 --max_steps 2 "
        "--num_workers 0 --accelerator cpu --log_every 1"
    )
    return [*flags.split(), "--teacher.model_kwargs", TINY_TEACHER]


@pytest.fixture(scope="module")
def frames(shared_data, tmp_path_factory) -> Path:
    """Eight real DDTI images."""
    out = tmp_path_factory.mktemp("frames")
    for image in sorted((shared_data / "ddti/image").glob("*.PNG"))[:8]:
        (out / image.name).write_bytes(image.read_bytes())
    return out


@pytest.fixture(scope="module")
def toy_run(site, frames, tmp_path_factory) -> Path:
    """A distillation with the plugin's family and objective, from the CLI."""
    out = tmp_path_factory.mktemp("toy_run") / "run"
    done = sonodistill_cli(*distill_args(frames, out), path=[site])
    assert done.returncode == 0, done.stderr
    return out


def test_an_installed_plugin_s_family_and_loss_drive_a_distillation(site, toy_run):
    listed = sonodistill_cli("registry", path=[site]).stdout
    assert "toy-cnn" in listed and "sonodistill_toy.family:ToyCNN" in listed
    assert "toy_l1" in listed and "sonodistill_toy.loss:toy_l1" in listed
    config = yaml.safe_load((toy_run / "config.yaml").read_text())
    assert config["student"]["family"] == "toy-cnn" and config["loss"] == "toy_l1"
    metrics = (toy_run / "logs/version_0/metrics.csv").read_text()
    assert "toy_max" in metrics  # the plugin's objective ran (it logs its own metric)
    # another fresh process builds the student from the run folder with the plugin's family
    code = (
        "from sonodistill.models import build_encoder\n"
        f"encoder = build_encoder('student:{toy_run}')\n"
        "print(type(encoder).__name__, encoder.family)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [site, SRC]))}
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert built.stdout.split() == ["ToyCNN", "toy-cnn"], built.stderr


def test_without_the_plugin_the_same_options_are_refused_in_one_line(frames, tmp_path):
    out = tmp_path / "run"
    done = sonodistill_cli(*distill_args(frames, out))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "--student.family toy-cnn: unknown encoder family" in lines[0]
    assert not out.exists()


def test_a_module_given_with_import_registers_without_being_installed(tmp_path):
    (tmp_path / "toy_extra.py").write_text(EXTRA)
    listed = sonodistill_cli("--import", "toy_extra", "registry", "losses", path=[tmp_path])
    assert listed.returncode == 0, listed.stderr
    assert "toy_l2" in listed.stdout and "toy_extra:toy_l2" in listed.stdout
    assert "toy_l2" not in sonodistill_cli("registry", "losses", path=[tmp_path]).stdout


def test_an_installed_plugin_s_backend_exports_the_plugin_s_student(
    site, toy_run, shared_data, tmp_path
):
    listed = sonodistill_cli("registry", "backends", path=[site]).stdout
    assert "toy_ort" in listed and "sonodistill_toy.backend" in listed
    out = tmp_path / "export"
    frames = f"ddti={shared_data / 'ddti/image'}"
    done = sonodistill_cli(
        *f"export --encoder student:{toy_run} --backends [toy_ort] --frames+ {frames}".split(),
        *f"--image_size 32 --n_check 2 --out {out}".split(),
        path=[site],
    )
    assert done.returncode == 0, done.stderr
    assert (out / "model_toy.onnx").is_file()
