"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class LmforgeError(Exception):
    """A problem the user can fix (bad recipe, missing path, corrupt artifact).

    The message must be a complete, single-line explanation: the CLI prints it as
    ``error: <message>`` and exits with status 2.
    """
