"""Typed configs: dataclasses, read from YAML and overridden from the command line.

jsonargparse turns a dataclass into `--section.field value` flags plus `--config FILE.yaml`;
every run writes the resolved config beside its outputs with `save_config`.

`--config` also takes the name of a config shipped in the package (`sonodistill/configs/`, as
torchtune resolves its recipes): `--config paper_distill_r50`, `--config suites/smoke_cpu`. An
existing file of that name wins; flags after `--config` override its values.
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from sonodistill.errors import UserError
from sonodistill.io import write_text

# Field docstrings (the string under each dataclass field) become the flags' help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")


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
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=True)
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
    namespace = parser.parse_args(_resolve_config_flags(argv))
    namespace.pop("config", None)
    return from_dict(cls, namespace.as_dict())


def _resolve_config_flags(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def from_dict(cls: type[C], values: dict) -> C:
    """Build a (nested) dataclass from plain values, as read from YAML."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{cls.__name__}: unknown option {key!r}")
        field_type = _dataclass_type(cls, key)
        kwargs[key] = (
            from_dict(field_type, value) if field_type and isinstance(value, dict) else value
        )
    return cls(**kwargs)


def _dataclass_type(cls: type, name: str) -> type | None:
    import typing

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
