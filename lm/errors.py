"""`LMError`: a mistake in what the user asked for (a config, a path, a checkpoint, an input).

Its message says what was wrong and what to do. `lm` prints it as one line (no traceback) and exits
with status 2; every other exception is a bug and keeps its traceback. It subclasses `ValueError`, so
Python callers that catch bad input as `ValueError` keep working.
"""


class LMError(ValueError):
    """Bad input, explained: the message names the problem and the fix."""


class MissingFileError(LMError, FileNotFoundError):
    """A file or folder the user named does not exist."""
