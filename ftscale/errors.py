"""The base of every error caused by input a user can fix (a config key, a data row, a checkpoint, an adapter).

The command line prints these as one line, without a traceback; anything else is a bug and keeps its traceback."""


class FtscaleError(Exception):
    """Bad input, with a message that names the file, line or key and how to fix it."""


def first_line(e: BaseException) -> str:
    """A library exception in a few words, for inclusion in a one-line error (some have no message at all)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
