"""Typed configs: dataclasses, read from YAML and overridden from the command line.

jsonargparse turns a dataclass into `--section.field value` flags plus `--config FILE.yaml`;
every run writes the resolved config beside its outputs with `save_config`.

`--config` also takes the name of a config shipped in the package (`sonodistill/configs/`, as
torchtune resolves its recipes): `--config paper_distill_r50`, `--config suites/smoke_cpu`. An
existing file of that name wins; flags after `--config` override its values.

Numbers carry their range in their type (`PositiveInt`, `RightOpenUnitInterval`, ... below:
jsonargparse's restricted number types, named as their range): the parser checks them before a
command runs and `--help` shows them; `check_fields` checks a config built in Python or read
from YAML the same way. Options are never abbreviated (`--overw` is not `--overwrite`), and
every parse error is one line: an unknown option or config key with its close match, a value
with what it must be.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from sonodistill.errors import UserError, unknown_name
from sonodistill.io import write_text

# Field docstrings (the string under each dataclass field) become the flags' help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")

LeftOpenUnitInterval = restricted_number_type(
    "LeftOpenUnitInterval", float, [(">", 0), ("<=", 1)], docstring="float in (0, 1]"
)
RightOpenUnitInterval = restricted_number_type(
    "RightOpenUnitInterval", float, [(">=", 0), ("<", 1)], docstring="float in [0, 1)"
)
Axis3D = restricted_number_type("Axis3D", int, [(">=", 0), ("<=", 2)], docstring="0, 1 or 2")
__all__ = [  # the checked number types, for the configs' fields
    "Axis3D",
    "ClosedUnitInterval",
    "LeftOpenUnitInterval",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "RightOpenUnitInterval",
    "restricted_number_type",
]


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package, e.g. paper_distill_r50, suites/paper."""
    root = Path(str(files("sonodistill") / "configs"))
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """The file a `--config` value names: an existing file, else a packaged config by name."""
    if Path(value).is_file():
        return value
    name = value.removesuffix(".yaml")
    if name in packaged_configs():
        return str(files("sonodistill") / "configs" / f"{name}.yaml")
    raise FileNotFoundError(
        f"--config {value}: no such file, nor a packaged config ({', '.join(packaged_configs())})"
    )


def config_parser(
    cls: type, prog: str, description: str, positional: dict[str, str] | None = None
) -> ArgumentParser:
    """A parser with `--config FILE|NAME` and one flag per (nested) dataclass field, except
    the fields in `positional` ({field: help}), positional arguments in that order."""
    parser = ArgumentParser(
        prog=prog, description=description, exit_on_error=False, allow_abbrev=False
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help=f"YAML file of options, or a packaged config: {', '.join(packaged_configs())}",
    )
    positional = positional or {}
    for name, text in positional.items():
        parser.add_argument(name, help=text)
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True, skip=set(positional))
    return parser


def parse_config(
    cls: type[C],
    argv: list[str],
    prog: str,
    description: str = "",
    positional: dict[str, str] | None = None,
) -> C:
    """The dataclass `cls` from defaults, `--config`, then flags (see `config_parser`)."""
    parser = config_parser(cls, prog, description, positional)
    namespace = parse_args(parser, argv)
    namespace.pop("config", None)
    return from_dict(cls, namespace.as_dict())


def parse_args(parser: ArgumentParser, argv: list[str], defaults: bool = True):
    """`parser.parse_args` (packaged configs resolved), every error as one UserError line."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(_resolve_config_flags(argv), defaults=defaults)
    except ArgumentError as err:
        raise parse_error(str(err), parser, argv) from None


def parse_error(message: str, parser: ArgumentParser, argv: list[str]) -> UserError:
    """jsonargparse's multi-line error as one line naming the option (or config key) at fault:
    an unknown one with its close match, a value with what it must be. Home-made because
    jsonargparse has no structured error to ask: its message is read with a few patterns, and
    one it does not know comes out whole on one line."""
    flags = [  # the options a user sets (not --help or a whole section)
        flag
        for flag, action in parser._option_string_actions.items()
        if flag.startswith("--")
        and type(action).__name__ in ("ActionTypeHint", "_StoreAction", "ActionConfigFile")
    ]
    see = f"see {parser.prog} --help"
    if m := re.match(r"unrecognized arguments: (\S+)", message):
        given = m.group(1).split("=", 1)[0]
        if not given.startswith("-"):
            return UserError(f"{given!r}: unexpected argument; {see}")
        return unknown_name("option", given, flags, see=see)
    if m := re.match(r"(?:Group '(.+)' does not accept option|Option) '(.+?)'", message):
        key = ".".join(k for k in m.groups() if k)
        keys = [f[2:] for f in flags if f != "--config"]
        configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
        if not configs:
            return unknown_name("option", f"--{key}", flags, see=see)
        return unknown_name("key", key, keys, f"--config {' '.join(configs)}:", see)
    if m := re.match(r'Parser key "(.+?)":\s*(.*)', message, re.S):
        key, rest = m.groups()
        given = re.search(r"(?:Given|Got) value: (.*)", rest)
        value = f" {given.group(1).strip()}" if given else _flag_value(argv, f"--{key}")
        if r := re.search(r"Not of type \w+: (\S*) ?does not conform to restriction (.+)", rest):
            value = f" {r.group(1)}" if r.group(1) else value  # the item of a list at fault
            return UserError(f"--{key}{value}: must be {_readable(r.group(2))}")
        if choices := re.search(r"Literal\[(.+?)\]", rest):
            return UserError(f"--{key}{value}: must be one of {choices.group(1)}")
        expected = re.findall(r"Expected an? (.+?)(?:\. Got|\n|$)", rest)
        expected += re.findall(r"Not of type (\w+)", rest)
        if expected:
            names = [
                re.sub(r"<class '(\w+)'>", r"\1", e).replace("NoneType", "null") for e in expected
            ]
            return UserError(f"--{key}{value}: expected {' or '.join(names)}")
        return UserError(f"--{key}: {_collapse(rest)}")
    return UserError(_collapse(message))


def _flag_value(argv: list[str], flag: str) -> str:
    """` VALUE` of the last `flag VALUE` or `flag=VALUE` in argv, else ""."""
    value = ""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = f" {argv[i + 1]}"
        elif arg.startswith(flag + "="):
            value = f" {arg.split('=', 1)[1]}"
    return value


def _collapse(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _readable(expression: str) -> str:
    """`v>0 and v<=1` -> `> 0 and <= 1`."""
    return re.sub(r"v(==|!=|>=|<=|>|<)", r"\1 ", expression)


def check_fields(cfg, prefix: str = "--") -> None:
    """Every field of the (nested) dataclass `cfg` in the range its type declares (the checked
    number types above, also inside lists, tuples and optionals): a UserError naming the first
    that is not, as the parser says it. For configs built in Python or read from YAML."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
        else:
            _check_value(hints[f.name], value, f"{prefix}{f.name}")


def _check_value(hint, value, option: str) -> None:
    if value is None:
        return
    if _is_checked(hint):
        try:
            hint(value)
        except (TypeError, ValueError):
            raise UserError(f"{option} {value}: must be {_readable(hint._expression)}") from None
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (_is_checked(arg) and number) or typing.get_origin(arg) in (list, tuple):
                _check_value(arg, value, option)
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            pairs = zip(args, value, strict=False)
        else:
            pairs = ((args[0], v) for v in value) if args else ()
        for arg, item in pairs:
            _check_value(arg, item, option)


def _is_checked(hint) -> bool:
    """Whether `hint` is one of the checked number types (a jsonargparse restricted type)."""
    return isinstance(hint, type) and hasattr(hint, "_expression")


def _resolve_config_flags(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def from_dict(cls: type[C], values: dict, prefix: str = "") -> C:
    """Build a (nested) dataclass from plain values, as read from YAML (numbers of the checked
    types come back plain, so that YAML can write them); an unknown key is a UserError with
    its close match."""
    kwargs = {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in names:
            raise unknown_name("option", f"{prefix}{key}", [f"{prefix}{n}" for n in names])
        field_type = _dataclass_type(cls, key)
        if field_type and isinstance(value, dict):
            kwargs[key] = from_dict(field_type, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _plain(value)
    return cls(**kwargs)


def _plain(value):
    """A value with the checked number types (subclasses of int and float) made plain."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(values: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}; lists and scalars are leaves."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted.option: (old value, new value)} for every option that differs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe_changes(changes: dict[str, tuple]) -> str:
    """`--batch_size 8 -> 16, --seed 0 -> 1` (YAML-style values; keys with a space are not
    options but values derived from them, and are shown as they are)."""
    return ", ".join(
        f"{k if ' ' in k else '--' + k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()
    )


def _show(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def load_config(cls: type[C], path: str | Path) -> C:
    return from_dict(cls, yaml.safe_load(Path(path).read_text()) or {})
