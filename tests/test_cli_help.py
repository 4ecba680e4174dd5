"""`sonodistill CMD --help` for every command: it answers from the command's light config
(no torch, timm, pandas, OpenCV, ... imported: checked in a fresh process) and every flag it
lists has help text. Commands whose configs still live in heavy modules are marked here, one
line each, until their package moves them (issue 20: WP-B data/distill/demo/report, WP-C
evaluate, WP-D deploy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sonodistill.cli import COMMANDS, parse_command
from sonodistill.config import config_parser

HEAVY = (
    "torch",
    "timm",
    "torchvision",
    "lightning_fabric",
    "kornia",
    "sklearn",
    "pandas",
    "cv2",
    "scipy",
    "onnxruntime",
    "fastapi",
    "matplotlib",
)
# One line per command that is not light yet; the package that converts it deletes its line.
NOT_LIGHT: dict[str, str] = {}
# Commands whose config is not a `Command.config` yet (they parse argv themselves).
NO_CONFIG: dict[str, str] = {}


def marked(table: dict[str, str]) -> list:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"{table[name]} converts"))
        if name in table
        else name
        for name in COMMANDS
    ]


@pytest.mark.parametrize("name", marked(NOT_LIGHT))
def test_help_answers_without_importing_heavy_modules(name):
    code = (
        "import sys\n"
        "from sonodistill.cli import main\n"
        "try:\n"
        f"    code = main({name.split()!r} + ['--help'])\n"
        "except SystemExit as done:\n"
        "    code = done.code\n"
        f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "usage: sonodistill" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "0 []"


def flags_without_help(name: str) -> list[str]:
    """The flags of a command's parser (not --help, --config, --print_config or a whole
    section) that have no help text."""
    command = COMMANDS.get(name)
    if command.config is None:
        raise LookupError(f"{name}: no Command.config")
    module, _, attribute = command.config.partition(":")
    cls = getattr(__import__(module, fromlist=[attribute]), attribute)
    parser = config_parser(cls, f"sonodistill {name}", "", command.positional)
    missing = []
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or flags[0] in ("--help", "--config", "--print_config"):
            continue
        if type(action).__name__ == "_ActionConfigLoad":  # `--section CONFIG`
            continue
        if not (action.help or "").strip() or (action.help or "").strip().startswith("(type:"):
            missing.append(flags[0])
    return missing


@pytest.mark.parametrize("name", marked(NO_CONFIG))
def test_every_flag_has_help(name):
    assert flags_without_help(name) == []


def test_the_help_check_sees_a_flag_without_help(monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class Bare:
        """A config whose second field has no docstring."""

        kind: str = ""
        """Documented."""
        size: int = 1

    monkeypatch.setattr("sonodistill.cli.RegistryConfig", Bare)
    assert flags_without_help("registry") == ["--size"]


def test_help_parses_nothing(capsys):
    with pytest.raises(SystemExit) as done:
        parse_command("registry", ["--help", "--no_such_flag"])
    assert done.value.code == 0 and "usage: sonodistill registry" in capsys.readouterr().out
