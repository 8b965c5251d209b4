"""How long each stage run took: one JSON line per finished stage in ``$RUNS_DIR/timings.jsonl``.

:func:`record` is called by ``stages._cli.run_cli`` when a stage ends without error; the report's
timings section reads the lines back with :func:`read_timings`. A line is appended in one ``write``
of a file opened for appending (POSIX keeps such a line whole when several stages finish at once),
and only where the runs folder already exists, so a test or a stage that writes no run leaves no file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.paths import runs_dir

TIMINGS_FILE = "timings.jsonl"


@dataclass(frozen=True)
class StageTime:
    """One finished stage run: its name, the config it ran (``--config``, if any), its arguments."""

    stage: str
    config: str | None
    seconds: float
    finished: str  # local time, ISO 8601
    argv: tuple[str, ...] = ()

    @property
    def config_name(self) -> str | None:
        """The config's name (its file stem: the run folder it wrote)."""
        return None if self.config is None else Path(self.config).stem


def timings_path() -> Path:
    return runs_dir() / TIMINGS_FILE


def config_arg(argv: list[str]) -> str | None:
    """The value of ``--config`` in a stage's arguments (None when absent)."""
    for i, item in enumerate(argv):
        if item == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith("--config="):
            return item.split("=", 1)[1]
    return None


def record(stage: str, argv: list[str], seconds: float) -> Path | None:
    """Append one stage run (rank 0 only under torchrun); None when there is no runs folder yet."""
    if os.environ.get("RANK", "0") != "0" or not runs_dir().is_dir():
        return None
    row = StageTime(
        stage, config_arg(argv), round(seconds, 3), time.strftime("%Y-%m-%dT%H:%M:%S"), tuple(argv)
    )
    path = timings_path()
    with path.open("a") as f:
        f.write(json.dumps(asdict(row)) + "\n")
    return path


def read_timings(path: Path | None = None) -> list[StageTime]:
    """Every recorded stage run, oldest first (a damaged line is skipped)."""
    path = path or timings_path()
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
            out.append(StageTime(**{**data, "argv": tuple(data.get("argv", ()))}))
        except (ValueError, TypeError):
            continue
    return out


def latest(timings: list[StageTime]) -> dict[tuple[str, str | None], StageTime]:
    """The last run of each (stage, config name)."""
    return {(t.stage, t.config_name): t for t in timings}
