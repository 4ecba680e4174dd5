"""One registry class for every pluggable name: model families, losses, augmentations, seg
decoders, protocols, dataset formats, backends and the CLI's commands.

    FAMILIES = Registry("encoder family", key="families", modules=("...families.timm_cnn", ...))

    @FAMILIES.register("timm", title="timm CNN")        # at the definition
    class TimmCNN(Encoder): ...

    FAMILIES.get("timm")                                 # loads the built-ins and plugins once

A registry is filled lazily: `modules` (the built-in definitions, which register themselves when
imported) and the plugins are imported on the first lookup, never at import time, so that a
command's `--help` and a light module that declares a registry stay free of torch.

Plugins come from two places, both read on that first lookup:
- entry points of the group `sonodistill.plugins` (`NAME = "module"`): a name `KEY.x` is loaded
  only by the registry with that key (`families.toy = "sonodistill_toy.family"`), an unprefixed
  name by every registry;
- the modules listed in `$SONODISTILL_IMPORT` (comma-separated), which `sonodistill --import
  MODULE` extends: the variable reaches DataLoader workers and spawned processes too.

Standard library only: `importlib.metadata` finds the entry points (what pluggy or stevedore
would add, a hook protocol, is not needed for name -> object tables).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sonodistill.errors import UserError, unknown_name

T = TypeVar("T")
PLUGIN_GROUP = "sonodistill.plugins"
"""The entry-point group plugin packages declare (pyproject `[project.entry-points."..."]`)."""
IMPORT_ENV = "SONODISTILL_IMPORT"
"""Comma-separated modules imported on each registry's first lookup (`--import` extends it)."""

log = logging.getLogger(__name__)
_imported: set[str] = set()  # plugin modules imported in this process (each once)
DEPRECATED_NAMES: list[tuple[str, str, str]] = []
"""(kind, old name, new name) of deprecated aliases used in this process (the CLI prints them)."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: the object, a title for tables and messages, where it was defined."""

    name: str
    obj: T
    title: str
    origin: str
    """`module:qualname` of the definition (or of the code that registered it)."""


class Registry(Generic[T]):
    """Names -> objects of one kind, with one duplicate policy and one unknown-name error."""

    def __init__(
        self,
        kind: str,
        *,
        key: str,
        modules: Sequence[str] = (),
        validate: Callable[[str, T], bool] | None = None,
    ):
        self.kind = kind
        """What a name names, in messages: `unknown encoder family`."""
        self.key = key
        """The plugin prefix (`families`) and the `sonodistill list KEY` argument."""
        self.modules = tuple(modules)
        self.validate = validate
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, tuple[str, bool]] = {}
        self._loaded = False
        self._loading = False

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, key={self.key!r}, {len(self._entries)} entries)"

    # --- filling ----------------------------------------------------------------------------

    def register(self, name: str, obj: T | None = None, *, title: str = "", replace: bool = False):
        """Add `obj` under `name`: as a decorator at the definition (`@REG.register("x")`) or a
        direct call (`REG.register("x", record)`), which returns `obj`.

        The same object again is a no-op (a module imported twice). Another object under a taken
        name is a ValueError naming both definitions, unless `replace=True` (a deliberate
        override, logged). An object `validate` refuses is a TypeError."""
        if obj is None:

            def decorator(target: T) -> T:
                self._add(name, target, title, replace, _origin(target))
                return target

            return decorator
        self._add(name, obj, title, replace, _origin(obj))
        return obj

    def _add(self, name: str, obj: T, title: str, replace: bool, origin: str) -> None:
        if self.validate is not None and not self.validate(name, obj):
            raise TypeError(f"{self.kind} {name!r}: {obj!r} is not a valid {self.kind}")
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            if not replace:
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice: by {old.origin} and by {origin}; "
                    "pick another name, or pass replace=True to override it"
                )
            log.info("%s %r: %s replaces %s", self.kind, name, origin, old.origin)
        title = title or getattr(obj, "title", "") or name
        self._entries[name] = Entry(name, obj, str(title), origin)

    def unregister(self, name: str) -> None:
        """Remove `name` (a test's toy entry, a plugin undone)."""
        self._entries.pop(name, None)

    def alias(self, old: str, new: str, *, deprecated: bool = False) -> None:
        """`old` names the entry `new`; `deprecated` records each use (the CLI prints a line)."""
        self._aliases[old] = (new, deprecated)

    def load(self) -> None:
        """Import the built-in modules, then the plugins of this registry (once per process)."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self.modules:
                importlib.import_module(module)
            load_plugins(self.key)
            self._loaded = True
        finally:
            self._loading = False

    # --- lookups ----------------------------------------------------------------------------

    def canonical(self, name: str) -> str:
        """`name` with an alias replaced by the name it stands for (deprecations recorded)."""
        if name in self._entries:
            return name
        if name in self._aliases:
            new, deprecated = self._aliases[name]
            if deprecated and (self.kind, name, new) not in DEPRECATED_NAMES:
                DEPRECATED_NAMES.append((self.kind, name, new))
            return new
        return name

    def entry(self, name: str, option: str = "") -> Entry[T]:
        """The entry of `name` (an alias resolved); an unknown name is one UserError line with
        the close matches: `--loss tokn_mse: unknown loss; did you mean token_mse?`."""
        self.load()
        found = self._entries.get(self.canonical(name))
        if found is None:
            raise unknown_name(self.kind, name, self.names(), option)
        return found

    def get(self, name: str, option: str = "") -> T:
        """The object registered under `name` (see `entry`)."""
        return self.entry(name, option).obj

    def names(self) -> list[str]:
        """Registered names in registration order (built-ins first), aliases left out."""
        self.load()
        return list(self._entries)

    def list(self) -> list[Entry[T]]:
        self.load()
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return [(e.name, e.obj) for e in self.list()]

    def __contains__(self, name: object) -> bool:
        self.load()
        return isinstance(name, str) and self.canonical(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _origin(obj) -> str:
    """`module:qualname` of a class or function; of the registering code for a record."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module and qualname and (inspect.isclass(obj) or inspect.isroutine(obj)):
        return f"{module}:{qualname}"
    frame = inspect.currentframe()
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}" if frame else "?"


def load_plugins(key: str) -> None:
    """Import the plugin modules for the registry `key`: entry points named `KEY.*` or without a
    prefix, then the modules of `$SONODISTILL_IMPORT`; each module once per process. A plugin
    that fails to import is one UserError line naming it."""
    from importlib.metadata import entry_points

    for point in entry_points(group=PLUGIN_GROUP):
        prefix, dot, _ = point.name.partition(".")
        if dot and prefix != key:
            continue
        _import(point.value, f"plugin {point.name} (entry point {point.name} = {point.value})")
    for module in imports():
        _import(module, f"--import {module}")


def imports() -> list[str]:
    """The modules of `$SONODISTILL_IMPORT`, in order."""
    return [m.strip() for m in os.environ.get(IMPORT_ENV, "").split(",") if m.strip()]


def add_imports(modules: Sequence[str]) -> None:
    """What `--import MODULE` does: add modules to `$SONODISTILL_IMPORT`, so that this process's
    registries and every process it starts import them on their first lookup."""
    known = imports()
    os.environ[IMPORT_ENV] = ",".join([*known, *(m for m in modules if m not in known)])


def _import(target: str, what: str) -> None:
    module = target.partition(":")[0].strip()
    if module in _imported:
        return
    _imported.add(module)
    try:
        importlib.import_module(module)
    except Exception as err:
        _imported.discard(module)
        raise UserError(f"{what}: {type(err).__name__}: {err}") from err
