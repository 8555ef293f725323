"""cifarlab: train, compare, explain and serve small-image classifiers."""

__version__ = "0.1.0"

from cifarlab.api import evaluate, load, predict, train  # noqa: E402

__all__ = ["__version__", "train", "evaluate", "load", "predict"]
