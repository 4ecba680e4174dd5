"""Lazy package exports (PEP 562): a package names each public object and the module that
defines it, and importing the package loads none of them, so that `--help` and the light config
modules load no torch. (The standard library has no helper for this, and `lazy_loader` would be
one more dependency for a dozen lines.)"""

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """The `__getattr__` and `__dir__` of `package`, whose public names are `exports`
    ({name: module}): a name's module is imported on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
