"""cifarlab: train, compare, explain and serve small-image classifiers.

    cifarlab.train / evaluate / load / predict    the Python API (cifarlab.api)

The API is imported on first use (PEP 562), so that `import cifarlab.cli` stays light."""

from cifarlab.core.version import __version__

__all__ = ["__version__", "train", "evaluate", "load", "predict"]


def __getattr__(name: str):
    if name in ("train", "evaluate", "load", "predict"):
        from cifarlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
