"""Shared test setup: offline environment, tiny thread counts, paths to the shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import toy_dataset  # noqa: F401 - registers the toy dataset: every test over the registry runs it too

from pipeline.runtime import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

for key, value in OFFLINE_ENV.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / ".yolo"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# `make test` exports the Makefile's DATASET and DATA_DIR: a test names its dataset and data itself
for key in ("DATASET", "DATA_DIR", "DEBUG"):
    os.environ.pop(key, None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RUNS_DIR and CACHE_DIR inside tmp_path, so a test never touches the project's runs/."""
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path
