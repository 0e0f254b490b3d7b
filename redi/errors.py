"""The one exception type that reaches users as a single line (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a data row. The CLI prints it as one line and exits 2."""
