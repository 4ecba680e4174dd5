"""`sonodistill app`: a local web viewer for fine-tuned models (FastAPI + uvicorn, a static
page shipped in the package)."""

from sonodistill.deploy.app.server import AppConfig, create_app, discover_models, serve

__all__ = ["AppConfig", "create_app", "discover_models", "serve"]
