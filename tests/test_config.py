"""Configs shipped in the package: addressable by name, overridable by a file and by flags, and
really inside a built wheel. Renamed options: accepted with one deprecation line after the
command, in flags, config files and stored run configs; an error names the option as typed.
Replaced options: their value folded into the option that replaces them."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from sonodistill import config
from sonodistill.cli import main
from sonodistill.config import Renamed, Replaced, packaged_configs, parse_config, upgrade
from sonodistill.distill import DistillConfig
from sonodistill.errors import UserError
from sonodistill.evaluate import SuiteConfig
from sonodistill.utils.rundir import Layout, RunDir

REPO = Path(__file__).resolve().parents[1]


def test_packaged_configs_by_name_file_and_flags(tmp_path):
    assert {"paper_distill_r50", "suites/paper", "suites/smoke_cpu"} <= set(packaged_configs())
    cfg = parse_config(DistillConfig, ["--config", "paper_distill_r50"], "test")
    assert cfg.student.projection == "mlp" and cfg.batch_size == 512 and cfg.num_nodes == 1
    cfg = parse_config(DistillConfig, ["--config=paper_distill_r50.yaml", "--batch_size", "8"], "t")
    assert cfg.batch_size == 8 and cfg.student.projection == "mlp"  # flags after --config win
    suite = parse_config(SuiteConfig, ["--config", "suites/smoke_cpu"], "test")
    assert suite.train.epochs == 1
    mine = tmp_path / "paper_distill_r50.yaml"  # a file of the same name wins over the package
    mine.write_text(yaml.safe_dump({"batch_size": 64}))
    assert parse_config(DistillConfig, ["--config", str(mine)], "test").batch_size == 64
    with pytest.raises(FileNotFoundError, match="nope.*paper_distill_r50"):
        parse_config(DistillConfig, ["--config", "nope"], "test")


@pytest.mark.slow
def test_a_built_wheel_runs_a_packaged_config_by_name(tmp_path):
    source = tmp_path / "source"  # built from a copy: no build/ folder left in the checkout
    shutil.copytree(
        REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("sonodistill-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"sonodistill/configs/{name}.yaml" for name in packaged_configs()} <= shipped
    page = {f"sonodistill/deploy/app/static/{name}" for name in ("index.html", "app.js", "app.css")}
    assert page <= shipped  # `sonodistill app` serves its page from the installed package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    code = "import sonodistill, sonodistill.cli as c; print(sonodistill.__file__); c.main()"
    argv = ["distill", "--config", "paper_distill_r50", "--print_config"]
    run = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=tmp_path,  # not the repository: nothing but the wheel's files to find
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    where, _, printed = run.stdout.partition("\n")
    assert Path(where).is_relative_to(site)
    config = yaml.safe_load(printed)
    assert config["student"]["projection"] == "mlp" and config["teacher"]["n_blocks"] == 2


def test_a_renamed_flag_is_accepted_with_one_line_after_the_command(tmp_path, capsys):
    config.reset_deprecations()
    cfg = parse_config(DistillConfig, ["--student.head", "mlp"], "test")
    assert cfg.student.projection == "mlp"
    assert config.deprecation_lines("sonodistill distill") == [
        "sonodistill distill: --student.head is deprecated, use --student.projection "
        "(accepted until 0.3)"
    ]
    config.reset_deprecations()
    old = tmp_path / "old.yaml"  # a config file written before the rename
    old.write_text(yaml.safe_dump({"student": {"name": "resnet18", "head": "mlp"}}))
    cfg = parse_config(DistillConfig, ["--config", str(old), "--student.head=linear"], "test")
    assert cfg.student.projection == "linear" and cfg.student.name == "resnet18"
    assert [flag for flag, _, _ in config.DEPRECATIONS] == [
        "--student.head",
        f"--config {old}: student.head",
    ]
    config.reset_deprecations()


def test_an_error_names_the_old_flag_as_typed_in_one_line(tmp_path, capsys):
    argv = [
        "distill",
        "--data",
        str(tmp_path),
        "--student.head",
        "mpl",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sonodistill distill: error: --student.head mpl: must be one of")
    assert err[0].endswith("(--student.head is now --student.projection)")
    assert not (tmp_path / "o").exists()


def test_stored_run_configs_are_upgraded_so_a_resume_sees_no_change(tmp_path):
    stored = {"seed": 0, "student": {"name": "resnet18", "head": "mlp"}}
    assert upgrade(DistillConfig, stored) == {
        "seed": 0,
        "student": {"name": "resnet18", "projection": "mlp"},
    }
    assert stored["student"]["head"] == "mlp"  # the caller's mapping is left alone
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    run = RunDir(tmp_path, Layout("distill", ("config.yaml",), resumable=True), resume=True)
    now = {"seed": 0, "student": {"name": "resnet18", "projection": "mlp"}}
    assert run.resume_changes(now, cls=DistillConfig) == {}
    assert run.resume_changes(now) != {}  # without the upgrade the rename looks like a change


@dataclasses.dataclass
class Toy:
    """A config with an option replaced by another whose value depends on the old one's."""

    names: list[str] = dataclasses.field(default_factory=lambda: ["a", "b"])
    """Names."""

    deprecated: ClassVar = (
        Replaced("drop_b", "names", lambda v, values: _drop_b(v, values)),
        Renamed("level", values={"on": "high"}),
    )
    level: str = "low"
    """A level."""


def _drop_b(value, values: dict) -> dict:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    names = [n for n in values.get("names", ["a", "b"]) if n != "b"]
    return {**values, "names": names if value else [*names, "b"]}


def test_a_replaced_option_is_folded_into_its_new_one(tmp_path):
    config.reset_deprecations()
    cfg = parse_config(Toy, ["--names", "[a, b, c]", "--drop_b", "true"], "test")
    assert cfg.names == ["a", "c"]
    assert parse_config(Toy, ["--drop_b=false", "--names", "[c]"], "test").names == ["c", "b"]
    assert config.deprecation_lines("sonodistill toy") == [
        "sonodistill toy: --drop_b true is deprecated, use --names [a, c] (accepted until 0.3)",
        "sonodistill toy: --drop_b false is deprecated, use --names [c, b] (accepted until 0.3)",
    ]
    config.reset_deprecations()
    old = tmp_path / "old.yaml"  # a config file written before the replacement
    old.write_text(yaml.safe_dump({"drop_b": True}))
    assert parse_config(Toy, ["--config", str(old)], "test").names == ["a"]
    assert config.DEPRECATIONS[0][:2] == (f"--config {old}: drop_b: true", "names: [a]")
    with pytest.raises(UserError, match="^--drop_b maybe: expected true or false$"):
        parse_config(Toy, ["--drop_b", "maybe"], "test")
    old.write_text(yaml.safe_dump({"drop_b": 3}))
    with pytest.raises(UserError, match="drop_b: 3: expected true or false"):
        parse_config(Toy, ["--config", str(old)], "test")
    config.reset_deprecations()


def test_an_error_names_a_renamed_value_as_typed():
    config.reset_deprecations()
    assert parse_config(Toy, ["--level", "on"], "test").level == "high"
    message = config.as_typed("--level high: not available here")
    assert message == "--level on: not available here"
    config.reset_deprecations()
