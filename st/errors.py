"""User-facing errors: the CLI turns these into one-line messages, never a traceback."""


class UserError(ValueError):
    """A problem with what the user passed (a path, a file, an option). The message says how to fix it."""
