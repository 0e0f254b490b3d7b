"""The exception types that reach users as a single line (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a data row. The CLI prints it as one line and exits 2."""


class Interrupted(Exception):
    """Ctrl-C, with one line saying where the work stopped and how to pick it up. The CLI exits 130."""
