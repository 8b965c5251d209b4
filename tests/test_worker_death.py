"""A fold worker dies with its stage: killed `make train-seg` must not leave folds training on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.paths import PROJECT_ROOT

PARENT = """
import multiprocessing, os, sys, time
from pipeline.train.parallel import die_with_parent

def child(armed):
    if armed:
        die_with_parent()
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, args=(sys.argv[1] == "1",))
    p.start()
    time.sleep(3)  # the child has imported and armed itself
    with open(sys.argv[2], "w") as f:
        f.write(f"{p.pid} {p.is_alive()}")
    os._exit(0)  # the parent dies without cleaning up, as under SIGKILL
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper counts as gone
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("armed", [True, False])
def test_worker_dies_with_its_parent(armed: bool, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"  # a file: the spawned child imports the parent's __main__ from it
    script.write_text(PARENT)
    subprocess.run(
        [sys.executable, str(script), "1" if armed else "0", str(tmp_path / "pid")],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )  # fmt: skip
    words = (tmp_path / "pid").read_text().split()
    pid, started = int(words[0]), words[1] == "True"
    assert started
    deadline = time.monotonic() + 6
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert _alive(pid) is not armed  # the unarmed twin shows the test can fail
    finally:
        if _alive(pid):
            os.kill(pid, 9)
