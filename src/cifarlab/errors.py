"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (path, option, file content), with a fix in the message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what was kept and how to continue."""
