"""The project's own error types, at the bottom of the layers so every module can raise them.

Each message names the file, row or key at fault and says what to do; the stage entry points
print it as one line.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Any error of the project's own: its message is the whole story (what, where, what to do).

    The stage entry points print it as ``<stage>: error: <message>`` and exit with status 2; a
    traceback only with ``--debug`` or ``DEBUG=1``. Anything else keeps its traceback.
    """


class DataError(PipelineError, ValueError):
    """The dataset on disk does not match its layout; the message names the file or row."""


class SubmissionError(PipelineError, ValueError):
    """A submission that cannot be written or scored: the message names the rows and what is wrong."""


class CheckpointError(PipelineError, ValueError):
    """A checkpoint that does not load: the message names its path, its run and how to retrain it."""


class RunLockedError(PipelineError, RuntimeError):
    """Another process is writing the same run folder."""
