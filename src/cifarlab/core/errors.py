"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (path, option, file content), with a fix in the message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what was kept and how to continue."""


# optional dependencies: the import name, and the pip extra that installs it
EXTRAS = {
    "onnx": "serve",
    "onnxruntime": "serve",
    "onnxscript": "serve",
    "fastapi": "serve",
    "uvicorn": "serve",
    "python_multipart": "serve",
    "mlflow": "",
}


def require(*modules: str, what: str) -> None:
    """Fail with one line naming the extra to install when an optional dependency is missing."""
    import importlib.util

    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing, or a stub in sys.modules
            found = False
        if not found:
            extra = EXTRAS.get(name, "serve")
            pip = f"pip install 'cifarlab[{extra}]'" if extra else "pip install cifarlab"
            raise UserError(f"{what} needs the {name} package, which is not installed: {pip}")


class RunFailed(Exception):
    """A run stopped for a reason outside the user's input (another process of a distributed
    run died); the message says what was kept and how to continue. Exit code 1."""
