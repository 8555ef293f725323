"""cifarlab: train, compare, explain and serve small-image classifiers.

    cifarlab.train / evaluate / load / predict    the Python API (cifarlab.api)
    cifarlab.reuse_freed_memory()                 a block in which CPU inference runs as fast as
                                                  in the CLI (glibc: freed memory is reused,
                                                  1.95x for EfficientNet-Lite0; cifarlab.core.heap)

The API is imported on first use (PEP 562), so that `import cifarlab.cli` stays light."""

from cifarlab.core.version import __version__

__all__ = ["__version__", "train", "evaluate", "load", "predict", "reuse_freed_memory"]


def __getattr__(name: str):
    if name in ("train", "evaluate", "load", "predict"):
        from cifarlab import api

        return getattr(api, name)
    if name == "reuse_freed_memory":  # a process-wide malloc setting: the caller opts in
        from cifarlab.core.heap import reuse_freed_memory

        return reuse_freed_memory
    raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
