"""Atomic writes: the old file survives a failed write; a finished one has the usual mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.io import atomic_path, write_json, write_text


def test_failed_write_leaves_previous_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_file_mode_and_content(tmp_path: Path) -> None:
    out = write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert out.read_text().strip() == '{\n  "a": 1\n}'
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
