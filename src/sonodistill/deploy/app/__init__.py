"""`sonodistill app`: a local web viewer for fine-tuned models (FastAPI + uvicorn, a static
page shipped in the package).

Public names are imported on first use (PEP 562), so that importing the package (or a light
module in it) loads no torch.
"""

from sonodistill.utils.lazy import lazy_exports

_EXPORTS = {
    "AppConfig": "sonodistill.deploy.app.server",
    "create_app": "sonodistill.deploy.app.server",
    "discover_models": "sonodistill.deploy.app.server",
    "serve": "sonodistill.deploy.app.server",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
