"""Typed configs: dataclasses, read from YAML and overridden from the command line.

jsonargparse turns a dataclass into `--section.field value` flags plus `--config FILE.yaml`;
every run writes the resolved config beside its outputs with `save_config`.

`--config` also takes the name of a config shipped in the package (`sonodistill/configs/`, as
torchtune resolves its recipes): `--config paper_distill_r50`, `--config suites/smoke_cpu`. An
existing file of that name wins; flags after `--config` override its values.

Fields carry their validation in their type (`sonodistill.utils.fields`: numbers with a range, names
a registry knows, `Literal` choices): the parser checks them before a command runs and `--help`
shows them; `check_fields` checks a config built in Python the same way, and `checked` builds a
nested spec (a dataset, an encoder, a file's settings) from a mapping with the same checks.
Options are never abbreviated (`--overw` is not `--overwrite`), and every parse error is one
line: an unknown option or config key with its close match, a value with what it must be.
`--help` is printed before anything is parsed, so it loads no registry (and no torch).

Renamed options (`Renamed` records in a config class's `deprecated`) are accepted for one
release: old flags, `--config` keys and stored run configs are upgraded to the new names, and
the CLI prints one deprecation line per old name after the command (`deprecation_lines`); a
user error keeps one line and names the option as it was typed (`as_typed`). An option whose
new form depends on its value (`--int8 false` is `--backends` without ort_int8) is a
`Replaced` record: its value is folded into the new option after parsing.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from sonodistill.errors import UserError, unknown_name
from sonodistill.io import write_text
from sonodistill.utils.fields import (  # noqa: F401  (re-exported: the configs' field types)
    Axis3D,
    ClosedUnitInterval,
    Device,
    ImageSize,
    LeftOpenUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    Opset,
    Port,
    PositiveFloat,
    PositiveInt,
    Precision,
    RightOpenUnitInterval,
    TrainingPrecision,
    check,
    readable,
    registered,
    restricted_number_type,
)

# Field docstrings (the string under each dataclass field) become the flags' help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")

__all__ = [  # the checked number types of the configs (sonodistill.utils.fields)
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
    the fields in `positional` ({field: help}), positional arguments in that order (`field?`:
    optional, its default when not given)."""
    parser = ArgumentParser(
        prog=prog, description=description, exit_on_error=False, allow_abbrev=False
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help=f"YAML file of options, or a packaged config: {', '.join(packaged_configs())}",
    )
    positional = positional or {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, text in positional.items():
        if name.endswith("?"):
            name = name[:-1]
            parser.add_argument(name, nargs="?", default=defaults[name], help=text)
        else:
            parser.add_argument(name, help=text)
    skip = {name.removesuffix("?") for name in positional}
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True, skip=skip)
    return parser


def parse_config(
    cls: type[C],
    argv: list[str],
    prog: str,
    description: str = "",
    positional: dict[str, str] | None = None,
) -> C:
    """The dataclass `cls` from defaults, `--config`, then flags (see `config_parser`).

    `-h`/`--help` prints the help and exits before anything is parsed: no value is checked, so
    no registry is loaded (a registered name type checks its default when parsing). Old option
    names (`Renamed`) are upgraded in the flags and in `--config` files first."""
    parser = config_parser(cls, prog, description, positional)
    if any(arg in ("-h", "--help") for arg in argv[: _end_of_options(argv)]):
        print(parser.format_help())
        raise SystemExit(0)
    argv, replaced = take_replaced(cls, rename_argv(cls, argv))
    namespace = parse_args(parser, argv, cls=cls)
    namespace.pop("config", None)
    return from_dict(cls, apply_replaced(namespace.as_dict(), replaced))


def _end_of_options(argv: list[str]) -> int:
    return argv.index("--") if "--" in argv else len(argv)


def parse_args(
    parser: ArgumentParser, argv: list[str], defaults: bool = True, cls: type | None = None
):
    """`parser.parse_args` (packaged configs resolved; with `cls`, renamed keys in them
    upgraded), every error as one UserError line."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(_resolve_config_flags(argv, cls), defaults=defaults)
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
    if m := re.match(
        r'Parser key "(.+?)":\s*Problem with given class_path \'(.+?)\':\s*(.*)', message, re.S
    ):
        key, path, rest = m.groups()  # a mapping given for a dataclass (`--datasets {a: {...}}`)
        if o := re.match(r"Option '(.+?)' is not accepted", rest.strip()):
            module, _, name = path.rpartition(".")
            fields = [
                f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))
            ]
            return unknown_name("key", o.group(1), fields, f"--{key}:")
        if inner := re.match(r'Parser key "(.+?)":\s*(.*)', rest, re.S):
            return parse_error(f'Parser key "{key}.{inner[1]}": {inner[2]}', parser, argv)
    if m := re.match(r'Parser key "(.+?)":\s*(.*)', message, re.S):
        key, rest = m.groups()
        given = re.search(r"(?:Given|Got) value: (.*)", rest)
        value = f" {given.group(1).strip()}" if given else _flag_value(argv, f"--{key}")
        if r := re.search(r"Not of type \w+: (\S*) ?does not conform to restriction (.+)", rest):
            value = f" {r.group(1)}" if r.group(1) else value  # the item of a list at fault
            return UserError(f"--{key}{value}: must be {readable(r.group(2))}")
        if n := re.search(r"Not of type \w+: '(.*?)': (.+)", rest):  # a name type's own message
            return UserError(f"--{key} {n.group(1)}: {n.group(2).strip()}")
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


def check_fields(cfg, prefix: str = "--") -> None:
    """Every field of the (nested) dataclass `cfg` valid for its type (`fields.check`: ranges,
    registered names, Literal choices, also inside lists, tuples and optionals): a UserError
    naming the first that is not, as the parser says it. The path of configs built in Python
    (`distill(DistillConfig(...))`, the demo) and read from YAML."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
        else:
            check(hints[f.name], value, f"{prefix}{f.name}")


def checked(cls: type[C], values, where: str) -> C:
    """THE checked constructor of a nested spec (a dataset entry, an encoder mapping, a file's
    settings): `cls` from a mapping, old keys upgraded, an unknown key named with its close
    match, every value checked by its type; one UserError line starting with `where`."""
    if isinstance(values, cls):
        values = to_dict(values)
    if not isinstance(values, dict):
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        raise UserError(f"{where}: expected a mapping with keys {names}; got {values!r}")
    values = upgrade(cls, values)
    try:
        cfg = from_dict(
            cls, values, key_error=lambda key, known: unknown_name("key", key, known, f"{where}:")
        )
    except TypeError as err:  # a required key missing
        raise UserError(f"{where}: {err}") from None
    check_fields(cfg, f"{where} ")
    return cfg


def _resolve_config_flags(argv: list[str], cls: type | None = None) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = _upgraded_file(resolve_config(out[i + 1]), cls)
        elif arg.startswith("--config="):
            out[i] = "--config=" + _upgraded_file(resolve_config(arg.split("=", 1)[1]), cls)
    return out


def _upgraded_file(path: str, cls: type | None) -> str:
    """The config file, or its YAML text with renamed keys upgraded (ActionConfigFile takes
    either) when it uses old names."""
    if cls is None or not (renames(cls) or replacements(cls)):
        return path
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # the parser reports it
    if not isinstance(values, dict):
        return path
    new = upgrade(cls, values, record=True, where=f"--config {path}: ")
    return path if new == values else yaml.safe_dump(new, sort_keys=False)


def from_dict(cls: type[C], values: dict, prefix: str = "", key_error=None) -> C:
    """Build a (nested) dataclass from plain values, as read from YAML (numbers of the checked
    types come back plain, so that YAML can write them); an unknown key is a UserError with
    its close match (`key_error(key, known)` makes it, when given)."""
    kwargs = {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            if key_error is not None:
                raise key_error(f"{prefix}{key}", known)
            raise unknown_name("option", f"{prefix}{key}", known)
        field_type = _dataclass_type(cls, key)
        if field_type and isinstance(value, dict):
            kwargs[key] = from_dict(field_type, value, f"{prefix}{key}.", key_error)
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


# ---------------------------------------------------------------- renamed options


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An option renamed in this release; the old name is accepted until `until`.

    `old` is the key in its config class (`img_size`), `new` the new key (None: the key stays,
    only `values` are renamed: `{"32-true": "fp32"}`). A config class lists its renames in
    `deprecated: ClassVar[tuple[Renamed, ...]]`; nested classes' renames apply under their key."""

    old: str
    new: str | None = None
    values: dict = dataclasses.field(default_factory=dict)
    until: str = "0.3"


@dataclasses.dataclass(frozen=True)
class Replaced:
    """An option replaced by another whose value depends on the old one's: `--int8 false`
    is `--backends` without ort_int8, `--executorch [int8]` adds executorch_int8 to it.

    `convert(value, values)` folds the old option's value (read as YAML: `false`, `[int8]`)
    into `values`, the options of the config class (a parsed command line with its defaults,
    or a config file's mapping, where `new` may be missing: use the field's default), and
    returns them; a value it cannot take is a ValueError saying what it must be. Listed in a
    config class's `deprecated` beside its `Renamed` records (top-level options only)."""

    old: str
    new: str
    """The option that takes its place (the deprecation line shows its resulting value)."""
    convert: Callable[[object, dict], dict]
    until: str = "0.3"


DEPRECATIONS: list[tuple[str, str, str]] = []
"""(old flag, new flag, until) of every old name used in this process, for the CLI's lines."""


def renames(cls: type, prefix: str = "") -> list[Renamed]:
    """Every rename of the (nested) dataclass `cls`, with dotted keys from its top."""
    found = [
        Renamed(prefix + r.old, prefix + (r.new or r.old), r.values, r.until)
        for r in getattr(cls, "deprecated", ())
        if isinstance(r, Renamed)
    ]
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            found += renames(sub, f"{prefix}{f.name}.")
    return found


def _record(old: str, new: str, until: str) -> None:
    if (old, new, until) not in DEPRECATIONS:
        DEPRECATIONS.append((old, new, until))


def rename_argv(cls: type, argv: list[str]) -> list[str]:
    """argv with old flags (`--old V`, `--old=V`, `--old+ V`) and old values replaced by the
    new ones; each use recorded in DEPRECATIONS."""
    rules = renames(cls)
    if not rules:
        return list(argv)
    out = list(argv)
    end = _end_of_options(out)
    for i in range(end):
        arg = out[i]
        if not arg.startswith("--"):
            continue
        flag, eq, inline = arg[2:].partition("=")
        plus = "+" if flag.endswith("+") else ""
        flag = flag.removesuffix("+")
        for rule in rules:
            if flag not in (rule.old, rule.new):
                continue
            if flag == rule.old and rule.old != rule.new:
                _record(f"--{rule.old}", f"--{rule.new}", rule.until)
                flag = rule.new
            value = inline if eq else (out[i + 1] if i + 1 < end else None)
            if value is not None and value in rule.values:
                _record(f"--{flag} {value}", f"--{flag} {rule.values[value]}", rule.until)
                value = rule.values[value]
                if not eq:
                    out[i + 1] = value
            arg = f"--{flag}{plus}" + (f"={value}" if eq else "")
            break
        out[i] = arg
    return out


def replacements(cls: type) -> list[Replaced]:
    """The `Replaced` options of the config class `cls`."""
    return [r for r in getattr(cls, "deprecated", ()) if isinstance(r, Replaced)]


def take_replaced(cls: type, argv: list[str]) -> tuple[list[str], list[tuple[Replaced, str]]]:
    """argv without its replaced options (`--old V`, `--old=V`), and those options with the
    value as typed, in order (`apply_replaced` folds them in after parsing)."""
    rules = {r.old: r for r in replacements(cls)}
    if not rules:
        return list(argv), []
    out, found = [], []
    end = _end_of_options(argv)
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i][2:].partition("=")
        rule = rules.get(flag) if i < end and argv[i].startswith("--") else None
        if rule is None:
            out.append(argv[i])
            i += 1
            continue
        if not eq and i + 1 >= end:
            raise UserError(f"--{flag}: expected a value")
        found.append((rule, inline if eq else argv[i + 1]))
        i += 1 if eq else 2
    return out, found


def apply_replaced(values: dict, found: list[tuple[Replaced, str]]) -> dict:
    """Fold each replaced option (`take_replaced`) into the parsed options, in the order
    typed; each use recorded for the deprecation lines."""
    for rule, text in found:
        try:
            value = yaml.safe_load(text)
            values = rule.convert(value, values)
        except (ValueError, yaml.YAMLError) as err:
            raise UserError(f"--{rule.old} {text}: {_collapse(str(err))}") from None
        _record(f"--{rule.old} {text}", f"--{rule.new} {_show(values[rule.new])}", rule.until)
    return values


def upgrade(cls: type, values: dict, record: bool = False, where: str = "") -> dict:
    """A (nested) mapping of `cls` options with old keys and values renamed (config files,
    stored run configs, a file's settings) and replaced options folded into their new ones;
    `record`: list them for the deprecation lines (`where` before the key: `--config FILE: `)."""
    rules = renames(cls)
    out = _deep_copy(values)
    for rule in replacements(cls):
        if rule.old not in out:
            continue
        value = out.pop(rule.old)
        try:
            out = rule.convert(value, out)
        except ValueError as err:
            raise UserError(f"{where}{rule.old}: {_show(value)}: {err}") from None
        if record:
            new = f"{rule.new}: {_show(out[rule.new])}"
            _record(f"{where}{rule.old}: {_show(value)}", new, rule.until)
    for rule in rules:
        *parents, old = rule.old.split(".")
        *_, new = rule.new.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if old in node and old != new:
            value = node.pop(old)
            node.setdefault(new, value)
            if record:
                _record(f"{where}{rule.old}", rule.new, rule.until)
        if new in node and isinstance(node[new], str | int | float) and node[new] in rule.values:
            if record:
                _record(f"{where}{rule.new}: {node[new]}", str(rule.values[node[new]]), rule.until)
            node[new] = rule.values[node[new]]
    return out


def _deep_copy(values):
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values


def deprecation_lines(prog: str) -> list[str]:
    """One line per old name used: `sonodistill distill: --img_size is deprecated, use
    --image_size (accepted until 0.3)`; registry aliases too."""
    from sonodistill.registry import DEPRECATED_NAMES

    lines = [
        f"{prog}: {old} is deprecated, use {new} (accepted until {until})"
        for old, new, until in DEPRECATIONS
    ]
    lines += [
        f"{prog}: {kind} {old} is deprecated, use {new}" for kind, old, new in DEPRECATED_NAMES
    ]
    return lines


def as_typed(message: str) -> str:
    """A user error's message naming options as they were typed: the new flag of each old one
    used is shown as the old, and the rename is said at the end (`(--img_size is now
    --image_size)`); the message stays one line."""
    notes = []
    for old, new, _ in DEPRECATIONS:  # a renamed value first: `--device cuda` was `--device on`
        if old.startswith("--") and " " in old and old.split()[0] == new.split()[0]:
            message = re.sub(re.escape(new) + r"(?![\w.])", old, message)
    for old, new, _ in DEPRECATIONS:
        if not (old.startswith("--") and new.startswith("--")) or " " in old:
            continue
        pattern = re.compile(re.escape(new) + r"(?![\w.])")
        if pattern.search(message):
            message = pattern.sub(old, message)
            notes.append(f"{old} is now {new}")
    return f"{message} ({'; '.join(notes)})" if notes else message


def reset_deprecations() -> None:
    """Forget the old names used so far (the CLI calls it before each command)."""
    from sonodistill.registry import DEPRECATED_NAMES

    DEPRECATIONS.clear()
    DEPRECATED_NAMES.clear()
