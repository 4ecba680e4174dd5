"""One Registry for every pluggable name, and the option types that validate themselves:
duplicates, aliases, close matches, lazy loading, plugins from entry points and
$SONODISTILL_IMPORT in a fresh process; ranges at their edges, registry names in flags and in
Python-built configs, configs that stay writable as YAML."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from sonodistill.config import check_fields, checked, parse_config, save_config
from sonodistill.errors import UserError
from sonodistill.registry import DEPRECATED_NAMES, IMPORT_ENV, Registry, add_imports
from sonodistill.utils import fields

SRC = Path(__file__).resolve().parents[1] / "src"


def make_registry(**kwargs) -> Registry:
    return Registry("toy thing", key="toys", **kwargs)


def test_register_at_the_definition_and_look_up():
    things = make_registry()

    @things.register("square", title="a square")
    def square(x):
        return x * x

    things.register("cube", lambda x: x**3)
    assert things.get("square") is square and things.get("cube")(2) == 8
    assert things.names() == ["square", "cube"] and "square" in things and "hex" not in things
    entry = things.entry("square")
    assert entry.title == "a square" and entry.origin.endswith(":" + square.__qualname__)
    assert entry.origin.startswith(__name__)
    assert [e.name for e in things.list()] == ["square", "cube"] and len(things) == 2


def test_a_taken_name_is_refused_naming_both_origins_unless_replaced():
    things = make_registry()

    def one():
        pass

    def two():
        pass

    things.register("f", one)
    things.register("f", one)  # the same object again: a module imported twice
    with pytest.raises(ValueError, match=r"'f' is registered twice: by .*one and by .*two"):
        things.register("f", two)
    assert things.get("f") is one
    things.register("f", two, replace=True)
    assert things.get("f") is two


def test_validate_refuses_what_is_not_of_the_kind():
    things = make_registry(validate=lambda name, obj: isinstance(obj, int))
    things.register("one", 1)
    with pytest.raises(TypeError, match="'two'"):
        things.register("two", "2")


def test_unknown_names_are_one_line_with_the_close_match():
    things = make_registry()
    for name in ("token_mse", "token_cosine", "token_smooth_l1"):
        things.register(name, object())
    with pytest.raises(UserError) as err:
        things.get("tokn_mse", "--loss")
    assert str(err.value).startswith("--loss tokn_mse: unknown toy thing; did you mean token_mse")
    with pytest.raises(UserError, match="'zzz': unknown toy thing; known: token_cosine, "):
        things.get("zzz")


def test_an_alias_finds_the_new_name_and_a_deprecated_one_is_recorded():
    things = make_registry()
    things.register("torch", object())
    things.alias("torch_fp32", "torch", deprecated=True)
    things.alias("pt", "torch")
    DEPRECATED_NAMES.clear()
    assert things.get("pt") is things.get("torch") is things.get("torch_fp32")
    assert DEPRECATED_NAMES == [("toy thing", "torch_fp32", "torch")]
    assert things.names() == ["torch"]
    DEPRECATED_NAMES.clear()


def test_built_in_modules_are_imported_on_the_first_lookup_only(tmp_path, monkeypatch):
    (tmp_path / "toy_builtin_things.py").write_text(
        "from toy_holder_things import THINGS\nTHINGS.register('made', 42)\n"
    )
    (tmp_path / "toy_holder_things.py").write_text(
        "from sonodistill.registry import Registry\n"
        "THINGS = Registry('toy thing', key='toys', modules=('toy_builtin_things',))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from toy_holder_things import THINGS  # noqa: I001  (made above)

    assert "toy_builtin_things" not in sys.modules  # declaring a registry imports nothing
    assert THINGS.get("made") == 42 and "toy_builtin_things" in sys.modules


def test_plugins_load_from_entry_points_and_the_import_variable(tmp_path):
    """A dist-info folder on the path (what pip writes) and $SONODISTILL_IMPORT, read by a fresh
    process on a registry's first lookup: prefixed entry points only by their registry."""
    site = tmp_path / "site"
    info = site / "toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sonodistill.plugins]\ntoys.a = toy_plugin_a\nother.b = toy_plugin_b\nall = toy_plugin_c\n"
    )
    for name in "abc":
        (site / f"toy_plugin_{name}.py").write_text(
            f"from holder import THINGS\nTHINGS.register('{name}', '{name}')\n"
        )
    (site / "holder.py").write_text(
        "from sonodistill.registry import Registry\nTHINGS = Registry('toy thing', key='toys')\n"
    )
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra/toy_extra.py").write_text(
        "from holder import THINGS\nTHINGS.register('extra', 'x')\n"
    )
    code = "import sys; from holder import THINGS; print(' '.join(THINGS.names()))"

    def names(env_import: str) -> str:
        env = {"PYTHONPATH": f"{site}:{tmp_path / 'extra'}:{SRC}", IMPORT_ENV: env_import}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert names("") == "a c"  # `other.b` belongs to another registry
    assert names("toy_extra") == "a c extra"
    env = {"PYTHONPATH": f"{site}:{SRC}", IMPORT_ENV: "toy_missing"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "--import toy_missing: ModuleNotFoundError" in run.stderr


def test_add_imports_extends_the_variable_once(monkeypatch):
    monkeypatch.setenv(IMPORT_ENV, "a")
    add_imports(["b", "a", "c"])
    import os

    assert os.environ[IMPORT_ENV] == "a,b,c"


# --- option types --------------------------------------------------------------------------------

COLOURS = Registry("colour", key="colours")
COLOURS.register("red", "#f00")
COLOURS.register("green", "#0f0")
COLOURS.alias("verde", "green")
ColourName = fields.registered(COLOURS)


@dataclass
class Paint:
    """A toy config."""

    colour: ColourName = "red"
    """The colour."""
    colours: list[ColourName] = field(default_factory=list)
    """More colours."""
    size: fields.ImageSize = 224
    """The size."""
    port: fields.Port = 0
    """A port."""
    opacity: fields.ClosedUnitInterval = 1.0
    """Opacity."""
    device: fields.Device = "auto"
    """Device."""
    precision: fields.Precision = "auto"
    """Precision."""
    share: fields.RightOpenUnitInterval | None = None
    """A share."""


def parse(*argv: str) -> Paint:
    return parse_config(Paint, list(argv), "paint")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--size", "7"], "--size 7: must be >= 8"),
        (["--port", "65536"], "--port 65536: must be >= 0 and <= 65535"),
        (["--port", "-1"], "--port -1: must be >= 0 and <= 65535"),
        (["--opacity", "1.01"], "--opacity 1.01: must be >= 0 and <= 1"),
        (["--share", "1"], "--share 1: must be >= 0 and < 1"),
        (["--device", "gpu"], "--device gpu: must be auto, cpu, cuda, cuda:N or mps"),
        (["--precision", "fp8"], "--precision fp8: must be one of"),
        (["--colour", "rde"], "--colour rde: unknown colour; did you mean red?"),
        (["--colours", "[red, gren]"], "--colours gren: unknown colour; did you mean green?"),
    ],
)
def test_each_type_refuses_past_its_edge_in_one_line(argv, says):
    with pytest.raises(UserError) as err:
        parse(*argv)
    assert str(err.value).startswith(says) and "\n" not in str(err.value)


def test_values_at_the_edges_pass_and_come_back_plain(tmp_path):
    cfg = parse(
        *("--size", "8", "--port", "65535", "--opacity", "0", "--share", "0"),
        *("--device", "cuda:1", "--precision", "bf16", "--colour", "verde", "--colours+", "red"),
    )
    assert (cfg.size, cfg.port, cfg.opacity, cfg.share) == (8, 65535, 0.0, 0.0)
    assert (cfg.device, cfg.colour, cfg.colours) == ("cuda:1", "green", ["red"])
    assert type(cfg.size) is int and type(cfg.colour) is str and type(cfg.opacity) is float
    saved = yaml.safe_load(save_config(cfg, tmp_path / "c.yaml").read_text())
    assert saved["colour"] == "green" and saved["size"] == 8


NEVER = Registry("never thing", key="nevers", modules=("sonodistill_no_such_module",))
NeverName = fields.registered(NEVER)


@dataclass
class Uses:
    """Uses a registry that cannot load."""

    thing: NeverName = "x"
    """A thing."""


def test_help_loads_no_registry(capsys):
    with pytest.raises(SystemExit) as done:
        parse_config(Uses, ["--help"], "uses")
    assert done.value.code == 0 and "--thing" in capsys.readouterr().out
    with pytest.raises(ModuleNotFoundError):  # parsing does look it up
        parse_config(Uses, [], "uses")


def test_python_built_configs_get_the_same_checks():
    check_fields(Paint(colour="green", colours=["verde"]))
    for cfg, says in [
        (Paint(size=4), "--size 4: must be >= 8"),
        (Paint(colour="blu"), "--colour blu: unknown colour"),
        (Paint(colours=["red", "blu"]), "--colours blu: unknown colour"),
        (Paint(precision="fp16"), "--precision fp16: must be one of auto, fp32, bf16"),
        (Paint(device="cuda:x"), "--device cuda:x: must be auto"),
    ]:
        with pytest.raises(UserError) as err:
            check_fields(cfg)
        assert str(err.value).startswith(says)


def test_checked_builds_a_nested_spec_from_a_mapping():
    assert checked(Paint, {"colour": "green", "size": 32}, "paints.yaml").size == 32
    with pytest.raises(UserError, match=r"^paints.yaml: colur: unknown key; did you mean colour"):
        checked(Paint, {"colur": "green"}, "paints.yaml")
    with pytest.raises(UserError, match=r"^paints.yaml size 2: must be >= 8"):
        checked(Paint, {"size": 2}, "paints.yaml")
    with pytest.raises(UserError, match=r"^paints.yaml: expected a mapping"):
        checked(Paint, "red", "paints.yaml")


def test_check_outside_jsonargparse():
    assert fields.check(fields.OpenUnitInterval, 0.5, "threshold") == 0.5
    with pytest.raises(UserError, match="^threshold 1: must be > 0 and < 1$"):
        fields.check(fields.OpenUnitInterval, 1, "threshold")
    with pytest.raises(UserError, match="^mode x: must be one of a, b$"):
        fields.check(Literal["a", "b"], "x", "mode")


def test_registered_type_documents_where_to_list_the_names():
    assert "sonodistill list colours" in ColourName.__doc__ and ColourName.__name__ == "ColourName"


def test_import_flag_reaches_the_cli_registries_in_a_fresh_process(tmp_path):
    """`--import MODULE` anywhere on the command line: its registrations are there before the
    command is looked up (a toy command here), and `sonodistill registry` lists them."""
    (tmp_path / "toy_commands.py").write_text(
        "from sonodistill.cli import COMMANDS, Command\n"
        "def hello(argv):\n"
        "    print('hello', *argv)\n"
        "    return 0\n"
        "COMMANDS.register('hello', Command('says hello', 'toy_commands:hello'))\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{SRC}", "PATH": "/usr/bin:/bin"}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        code = "import sys; from sonodistill.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True
        )

    listed = cli("registry", "commands", "--import", "toy_commands")
    assert listed.returncode == 0, listed.stderr
    assert "hello" in listed.stdout and "toy_commands:5" in listed.stdout  # where registered
    ran = cli("--import=toy_commands", "hello", "world")
    assert (ran.returncode, ran.stdout.strip()) == (0, "hello world")
    without = cli("hello")
    assert without.returncode == 2 and "'hello': unknown command" in without.stderr
