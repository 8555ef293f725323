"""The prediction service (`cifarlab serve`): FastAPI app, micro-batching, web page."""

from cifarlab.deploy.serve.app import bind, create_app, run

__all__ = ["bind", "create_app", "run"]
