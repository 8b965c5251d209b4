"""The project's own error types, at the bottom of the layers so every module can raise them.

Each message names the file, row or key at fault and says what to do; the stage entry points
print it as one line.
"""

from __future__ import annotations


class DataError(ValueError):
    """The dataset on disk does not match its layout; the message names the file or row."""


class SubmissionError(ValueError):
    """A submission that cannot be written or scored: the message names the rows and what is wrong."""
