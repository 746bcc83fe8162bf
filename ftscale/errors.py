"""The base of every error caused by input a user can fix (a config key, a data row, a checkpoint, an adapter).

The command line prints these as one line, without a traceback; anything else is a bug and keeps its traceback."""


class FtscaleError(Exception):
    """Bad input, with a message that names the file, line or key and how to fix it."""
