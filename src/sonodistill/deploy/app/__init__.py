"""`sonodistill app`: a local web viewer for fine-tuned models (FastAPI + uvicorn, a static
page shipped in the package).

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

import importlib

_EXPORTS = {
    "AppConfig": "sonodistill.deploy.app.server",
    "create_app": "sonodistill.deploy.app.server",
    "discover_models": "sonodistill.deploy.app.server",
    "serve": "sonodistill.deploy.app.server",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
