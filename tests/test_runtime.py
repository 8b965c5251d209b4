"""The library has no import-time side effects; ultralytics stays behind its one adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.paths import PROJECT_ROOT, fold_name, run_dir
from pipeline.runtime import OFFLINE_ENV

PROBE = r"""
import importlib, json, os, pkgutil, sys
before = dict(os.environ)
import pipeline
names = [m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline.")]
for name in names:
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"modules": names, "changed": changed, "ultralytics": "ultralytics" in sys.modules}))
"""


def test_importing_every_pipeline_module_changes_nothing() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "pipeline.config" in report["modules"] and "pipeline.rle" in report["modules"]
    # third-party imports (cv2, smp) set a few variables of their own; the project sets none
    assert set(report["changed"]) & (set(OFFLINE_ENV) | {"YOLO_CONFIG_DIR", "OMP_NUM_THREADS"}) == set()
    assert report["ultralytics"] is False  # imported lazily by pipeline.models.detector only
    assert not (PROJECT_ROOT / "pipeline" / "runs").exists()


def test_ultralytics_is_imported_by_one_module_only() -> None:
    hits = [
        path.relative_to(PROJECT_ROOT).as_posix()
        for folder in ("pipeline", "stages")
        for path in (PROJECT_ROOT / folder).rglob("*.py")
        if "import ultralytics" in path.read_text() or "from ultralytics" in path.read_text()
    ]
    assert hits == ["pipeline/models/detector.py"]


def test_run_dirs_derive_from_name_and_fold(monkeypatch) -> None:
    monkeypatch.setenv("RUNS_DIR", "/tmp/r")
    assert run_dir("seg", "demo_seg", 3) == Path("/tmp/r/seg/demo_seg/fold_3")
    assert run_dir("seg", "demo_seg", "all") == Path("/tmp/r/seg/demo_seg/fold_all")
    assert run_dir("ensemble", "demo_ensemble") == Path("/tmp/r/ensemble/demo_ensemble")
    assert fold_name(0) == "fold_0"


def test_offline_switches_are_listed_once() -> None:
    """runtime.OFFLINE_ENV is the one list: no other module, stage, kernel or conftest spells a key."""
    files = [
        *(PROJECT_ROOT / "pipeline").rglob("*.py"),
        *(PROJECT_ROOT / "stages").rglob("*.py"),
        *(PROJECT_ROOT / "kernels").glob("*.py"),
        PROJECT_ROOT / "tests" / "conftest.py",
    ]
    runtime_py = PROJECT_ROOT / "pipeline" / "runtime.py"
    hits = [
        f"{path.relative_to(PROJECT_ROOT)}: {key}"
        for path in files
        if path != runtime_py
        for key in OFFLINE_ENV
        if any(spelling in path.read_text() for spelling in (f'"{key}"', f"'{key}'", f"{key}="))
    ]
    assert hits == []


def test_conftest_and_model_factories_apply_the_offline_switches(monkeypatch) -> None:
    import os

    from pipeline.runtime import set_offline_env

    assert all(key in os.environ for key in OFFLINE_ENV)  # set by tests/conftest.py
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a value already set is kept
    set_offline_env()
    assert {key: os.environ[key] for key in OFFLINE_ENV} == {**OFFLINE_ENV, "WANDB_MODE": "offline"}
