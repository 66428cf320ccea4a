"""The one error type for mistakes a user can fix (bad input, missing files, wrong environment).

Command-line entry points print it as a single `error: ...` line and exit with status 2;
any other exception is a bug and keeps its traceback.
"""


class CovipalError(ValueError):
    """A user-facing error: the message says what is wrong and, where it can, how to fix it."""
