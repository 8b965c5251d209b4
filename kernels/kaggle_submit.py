"""Kaggle script kernel: the same inference as `make submit`, offline.

Built by `make kernel` (pipeline/kaggle/bundle.py), which fills in the SETTINGS block below.
The kernel's inputs are three datasets made by the same build and the real data (a competition, or
LGG's Kaggle dataset; SETTINGS names the dataset plug-in and its input folder):

- <code>:    the pipeline and stages packages and the resolved configs;
- <weights>: runs/... (trained members, classifier, detector, tuned post-processing);
- <wheels>:  pinned wheels of what the Kaggle image lacks, and manifest.json naming them.

Steps: install the wheels whose package is missing or at another version
(``pip install --no-index --find-links``), point RUNS_DIR and DATA_DIR at the inputs, and call
``stages.submit.main``, which writes <KAGGLE_ROOT>/working/submission.csv. Nothing is fetched
from the network. ``KAGGLE_ROOT`` (default /kaggle) lets tests run this against a fake tree;
``DEBUG_TRAIN_VOLUMES`` overrides the debug switch (predict that many train volumes).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# --- settings: written by `make kernel` (pipeline/kaggle/bundle.py) ---
SETTINGS = {
    "dataset": "uwmgi",
    "data_input": "uw-madison-gi-tract-image-segmentation",
    "datasets": {"code": "gi-tract-code", "weights": "gi-tract-weights", "wheels": "gi-tract-wheels"},
    "ensemble": "demo_ensemble",
    "build_id": "unbuilt",
    "debug_train_volumes": 0,
    "packages": {"segmentation-models-pytorch": "0.6.0", "ultralytics": "8.4.190"},
}
# --- end settings ---

KAGGLE_ROOT = Path(os.environ.get("KAGGLE_ROOT") or "/kaggle")
INPUT = KAGGLE_ROOT / "input"
WORKING = KAGGLE_ROOT / "working"
SCRATCH = Path(tempfile.gettempdir()) / "kaggle_submit"


def say(message: str) -> None:
    print(f"[kaggle_submit {time.strftime('%H:%M:%S')}] {message}", flush=True)


def find_input(slug: str) -> Path:
    """``/kaggle/input/<slug>``, or a folder of that name a level or two deeper (newer mounts)."""
    direct = INPUT / slug
    if direct.is_dir():
        return direct
    for pattern in (f"*/{slug}", f"*/*/{slug}"):
        found = sorted(p for p in INPUT.glob(pattern) if p.is_dir())
        if found:
            return found[0]
    present = sorted(p.name for p in INPUT.iterdir()) if INPUT.is_dir() else []
    raise SystemExit(
        f"input '{slug}' not found under {INPUT} (present: {present or 'nothing'}). Add it to the "
        "kernel's inputs: dataset_sources / competition_sources in kernel-metadata.json."
    )


def check_build(folder: Path) -> None:
    """The dataset version attached must be the one this script was built with."""
    stamp = folder / "BUNDLE.json"
    found = json.loads(stamp.read_text()).get("build_id") if stamp.is_file() else None
    if found != SETTINGS["build_id"]:
        raise SystemExit(
            f"{folder} is from build {found}, this kernel from build {SETTINGS['build_id']}: the "
            "attached dataset version is stale (still processing?). Re-run `make kernel-push`, "
            "or wait for the dataset version to be ready and run the kernel again."
        )


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels(slug: str) -> list[str]:
    """pip-install, offline, each pinned package that is absent or at another version."""
    wanted = [f"{n}=={v}" for n, v in SETTINGS["packages"].items() if installed_version(n) != v]
    if not wanted:
        say("every pinned package is already installed")
        return []
    folder = find_input(slug)
    manifest = json.loads((folder / "manifest.json").read_text())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.get("python") != py:
        say(f"warning: the wheels were collected for python {manifest.get('python')}, this is {py}")
    say(f"installing from {folder}: {' '.join(wanted)}")
    before = {d: set(d.glob("*.pth")) for d in site_dirs()}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    cmd += ["--disable-pip-version-check", "--no-warn-script-location", "--no-cache-dir", "--quiet"]
    subprocess.run([*cmd, *wanted], check=True)
    # This process goes on with the new packages: run the .pth hooks they brought (numba-cuda's
    # redirector of numba.cuda), as a fresh interpreter would have.
    for where in site_dirs():
        for pth in sorted(set(where.glob("*.pth")) - before.get(where, set())):
            site.addpackage(str(where), pth.name, set(sys.path))
    importlib.invalidate_caches()
    still = [f"{n}=={v}" for n, v in SETTINGS["packages"].items() if installed_version(n) != v]
    if still:
        raise SystemExit(f"pip ran but {' '.join(still)} is still not installed: see pip's output above")
    return wanted


def site_dirs() -> list[Path]:
    """The folders pip may install into."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(d) for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def main() -> Path:
    datasets = SETTINGS["datasets"]
    code = find_input(datasets["code"])
    weights = find_input(datasets["weights"])
    data = find_input(SETTINGS["data_input"])
    check_build(code)
    check_build(weights)
    install_wheels(datasets["wheels"])

    SCRATCH.mkdir(parents=True, exist_ok=True)
    WORKING.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(code))  # the kernel script, not the library: the code dataset goes first
    from pipeline.runtime import OFFLINE_ENV  # the one list of offline switches (imports numpy only)

    os.environ.update(
        RUNS_DIR=str(weights / "runs"),
        DATA_DIR=str(data),
        DATASET=SETTINGS["dataset"],
        CACHE_DIR=str(SCRATCH / "cache"),  # the inputs are read-only
        YOLO_CONFIG_DIR=str(SCRATCH / "yolo"),
        NUMBA_CACHE_DIR=str(SCRATCH / "numba"),
        MPLCONFIGDIR=str(SCRATCH / "matplotlib"),
        **OFFLINE_ENV,
    )
    from stages.submit import main as submit

    out = WORKING / "submission.csv"
    args = ["--config", str(code / "configs" / f"{SETTINGS['ensemble']}.yaml"), "--out", str(out)]
    args += ["--data-dir", str(data)]
    debug = int(os.environ.get("DEBUG_TRAIN_VOLUMES") or SETTINGS["debug_train_volumes"])
    if debug > 0:
        args += ["--debug-train-volumes", str(debug)]
    say(f"stages.submit {' '.join(args)}")
    submit(args)
    say(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
