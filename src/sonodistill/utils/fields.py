"""Option types that validate themselves: the one declarative place for ranges and names.

Every config field takes one of these types (or a `typing.Literal` of its values), so that
jsonargparse checks a flag before a command runs, `--help` shows what a value must be, and
`config.check_fields` checks a config built in Python the same way:

- numbers with a range: jsonargparse's restricted number types, named as their range
  (`PositiveInt`, `RightOpenUnitInterval` = [0, 1), ...) or as what they measure (`ImageSize`,
  `Port`, `Opset`). The parser returns a subclass of int/float; `config.from_dict` makes it
  plain (so that `yaml.safe_dump` can write it);
- names from a registry: `registered(REGISTRY)` is a str type whose values the registry knows
  (`FamilyName`, `LossName`, `BackendName`, ...); a wrong one is one line with the close matches.
  The registry (and with it torch, for model families) is loaded when a value is checked, never
  for `--help` (`config.parse_config` prints help before it parses);
- `Device`: auto, cpu, cuda, cuda:N or mps.

`check(kind, value, option)` applies the same rule outside jsonargparse (HTTP queries of the
app, a frame predictor's arguments): a UserError `--option value: must be ...`.

Imports jsonargparse only (no torch): light config modules build on it.
"""

from __future__ import annotations

import re
import types
import typing

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    register_type,
    restricted_number_type,
)

from sonodistill.errors import UserError

if typing.TYPE_CHECKING:
    from sonodistill.registry import Registry

# ---------------------------------------------------------------- numbers with a range

LeftOpenUnitInterval = restricted_number_type(
    "LeftOpenUnitInterval", float, [(">", 0), ("<=", 1)], docstring="float in (0, 1]"
)
RightOpenUnitInterval = restricted_number_type(
    "RightOpenUnitInterval", float, [(">=", 0), ("<", 1)], docstring="float in [0, 1)"
)
Axis3D = restricted_number_type("Axis3D", int, [(">=", 0), ("<=", 2)], docstring="0, 1 or 2")
ImageSize = restricted_number_type("ImageSize", int, (">=", 8), docstring="int >= 8")
"""The side of a square model input in pixels; each model family checks its exact rule later."""
Port = restricted_number_type("Port", int, [(">=", 0), ("<=", 65535)], docstring="0-65535")
"""A TCP port; 0: any free one."""
Opset = restricted_number_type("Opset", int, [(">=", 7), ("<=", 23)], docstring="ONNX opset 7-23")

# ---------------------------------------------------------------- names

_NAMED: dict[str, typing.Any] = {}  # registered str types by name, for messages


def registered(registry: Registry, extra: tuple[str, ...] = (), name: str = "") -> type:
    """A str type whose values `registry` knows (or one of `extra`, e.g. `auto`); named `name`
    (default: from the registry's kind, `encoder family` -> `EncoderFamilyName`). An alias
    is replaced by the name it stands for."""
    name = name or "".join(w.capitalize() for w in re.split(r"\W+", registry.kind)) + "Name"
    extras = f" (or {', '.join(extra)})" if extra else ""
    doc = f"the name of a registered {registry.kind}{extras}; `sonodistill list {registry.key}`"
    cls = type(name, (str,), {"__doc__": doc, "registry": registry, "extra": tuple(extra)})

    def deserialize(value) -> str:
        value = str(value)
        if value in extra:
            return value
        try:
            return registry.entry(value).name
        except UserError as err:  # the message names the value: `'tim': unknown ...`
            raise ValueError(str(err)) from None

    register_type(cls, serializer=str, deserializer=deserialize)
    _NAMED[name] = cls
    return cls


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICES = "auto, cpu, cuda, cuda:N or mps"


class Device(str):
    """auto (a GPU when there is one), cpu, cuda, cuda:N or mps."""


def _device(value) -> str:
    value = str(value)
    if not DEVICE.fullmatch(value):
        raise ValueError(f"{value!r}: must be {DEVICES}")
    return value


register_type(Device, serializer=str, deserializer=_device)
_NAMED["Device"] = Device

Precision = typing.Literal["auto", "fp32", "bf16"]
"""Numeric precision of a model: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16."""
TrainingPrecision = typing.Literal["auto", "fp32", "bf16", "fp16"]


def is_named(hint) -> bool:
    """Whether `hint` is a name type of this module (`registered` or `Device`)."""
    return isinstance(hint, type) and _NAMED.get(hint.__name__) is hint


def is_range(hint) -> bool:
    """Whether `hint` is one of the checked number types (a jsonargparse restricted type)."""
    return isinstance(hint, type) and hasattr(hint, "_expression")


def readable(expression: str) -> str:
    """`v>0 and v<=1` -> `> 0 and <= 1`."""
    return re.sub(r"v(==|!=|>=|<=|>|<)", r"\1 ", expression)


def check(kind, value, option: str):
    """`value` as `kind` (a range, name or Literal type, also inside X | None, list[X] and
    tuples), else a UserError `OPTION VALUE: must be ...`; returns the value made plain."""
    if value is None:
        return value
    if is_range(kind):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            if not number:
                raise TypeError(value)
            kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{option} {value}: must be {readable(kind._expression)}") from None
        return int(value) if issubclass(kind, int) else float(value)
    if is_named(kind):
        if kind is Device:
            try:
                return _device(value)
            except ValueError:
                raise UserError(
                    f"{option} {value}: must be auto, cpu, cuda, cuda:N or mps"
                ) from None
        if value in kind.extra:
            return value
        return kind.registry.entry(str(value), option).name
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{option} {value}: must be one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        checked = [
            a for a in args if (is_range(a) and number) or is_named(a) or _container(a, value)
        ]
        checked += [a for a in args if typing.get_origin(a) is typing.Literal]
        if len(checked) == 1:  # X | None: the one checked type decides
            return check(checked[0], value, option)
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            pairs = zip(args, value, strict=False)
        else:
            pairs = ((args[0], v) for v in value) if args else ()
        return type(value)(check(arg, item, option) for arg, item in pairs)
    return value


def _container(hint, value) -> bool:
    return typing.get_origin(hint) in (list, tuple) and isinstance(value, (list, tuple))


__all__ = [
    "Axis3D",
    "ClosedUnitInterval",
    "Device",
    "ImageSize",
    "LeftOpenUnitInterval",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "Opset",
    "Port",
    "PositiveFloat",
    "PositiveInt",
    "Precision",
    "RightOpenUnitInterval",
    "TrainingPrecision",
    "check",
    "registered",
    "restricted_number_type",
]
