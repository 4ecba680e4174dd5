"""Configs shipped in the package: addressable by name, overridable by a file and by flags, and
really inside a built wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from sonodistill.config import packaged_configs, parse_config
from sonodistill.distill import DistillConfig
from sonodistill.evaluate import SuiteConfig

REPO = Path(__file__).resolve().parents[1]


def test_packaged_configs_by_name_file_and_flags(tmp_path):
    assert {"paper_distill_r50", "suites/paper", "suites/smoke_cpu"} <= set(packaged_configs())
    cfg = parse_config(DistillConfig, ["--config", "paper_distill_r50"], "test")
    assert cfg.student.head == "mlp" and cfg.batch_size == 512 and cfg.num_nodes == 4
    cfg = parse_config(DistillConfig, ["--config=paper_distill_r50.yaml", "--batch_size", "8"], "t")
    assert cfg.batch_size == 8 and cfg.student.head == "mlp"  # flags after --config win
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
    assert config["student"]["head"] == "mlp" and config["teacher"]["n_blocks"] == 2
