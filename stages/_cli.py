"""How every stage's ``python -m stages.<name>`` ends: the project's own errors as one line.

``raise SystemExit(run_cli("train_seg", main))``: a :class:`~pipeline.errors.PipelineError` (bad
config value, missing or damaged file, refused submission...) is printed as
``<stage>: error: <message>`` on stderr with exit status 2; ``--debug`` (or ``DEBUG=1``) shows
its traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import PipelineError
from pipeline.report import timings

DEBUG_FLAG = "--debug"


def debug_wanted(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("DEBUG", "").strip() not in ("", "0")


def _close_progress_bars() -> None:
    """End any progress bar an exception left open, so the error starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(
    stage: str, main: Callable[[list[str]], Any], argv: list[str] | None = None, *, timed: bool = True
) -> int:
    """Run ``main(argv)``; the exit status (0, or 2 for a project error reported in one line).

    A ``timed`` stage that ends without error appends its time to ``$RUNS_DIR/timings.jsonl``
    (:mod:`pipeline.report.timings`; the report's timings section).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_wanted(argv)
    start = time.perf_counter()
    try:
        main([a for a in argv if a != DEBUG_FLAG])
    except PipelineError as exc:
        if debug:
            raise
        _close_progress_bars()
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{stage}: error: {message}", file=sys.stderr)
        return 2
    if timed:
        timings.record(stage, argv, time.perf_counter() - start)
    return 0
