"""The one exception type that reaches the user as a single line."""


class BamJaxError(Exception):
    """A user-facing error: bad input, missing files, mismatched runs.

    The CLI prints `error: <message>` and exits non-zero, without a traceback.
    Anything else escaping is a bug and keeps its traceback.
    """
