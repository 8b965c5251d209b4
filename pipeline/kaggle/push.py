"""`make kernel-push`: upload the bundle's datasets and kernel with the official kaggle CLI.

Each dataset is created the first time (``kaggle datasets create -p DIR --dir-mode zip``) and
versioned afterwards (``kaggle datasets version -p DIR -m MSG --dir-mode zip``); whether it
exists is asked with ``kaggle datasets status <id>``, which fails for an unknown dataset. The
kernel goes last (``kaggle kernels push -p DIR``), once every dataset reports ``ready``, so the
kernel's run sees the versions just uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.kaggle.bundle import PLACEHOLDER_USER, kaggle_config_dir
from pipeline.kaggle.wheels import read_pins

log = logging.getLogger(__name__)

DATASET_PARTS = ("code", "weights", "wheels")
TOKEN_HELP = (
    "create an API token at https://www.kaggle.com/settings (section API, 'Create New Token') and "
    "save the downloaded kaggle.json as {path} (chmod 600), or export KAGGLE_USERNAME and "
    "KAGGLE_KEY (or KAGGLE_API_TOKEN)"
)


class PushError(PipelineError, RuntimeError):
    """Pushing cannot start or a kaggle command failed; the message says what to do."""


def cli_pin() -> str:
    """``kaggle==<version>`` as requirements.txt pins it (what `make install` puts in the venv)."""
    return f"kaggle=={read_pins().get('kaggle', '2.2.5')}"


def interpreter_bin() -> Path:
    """The running interpreter's scripts folder (``.venv/bin`` under make, not always on PATH)."""
    return Path(sys.executable).parent


def find_cli() -> str | None:
    """The ``kaggle`` executable: ``$KAGGLE_CLI``, else on PATH, else beside the interpreter."""
    explicit = os.environ.get("KAGGLE_CLI", "").strip()
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("kaggle") or shutil.which("kaggle", path=str(interpreter_bin()))


def find_credentials() -> str | None:
    """Where the CLI will find credentials, described; None when it will find none."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME and KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("kaggle.json", "access_token", "credentials.json"):  # the last: `kaggle auth login`
        if (kaggle_config_dir() / name).is_file():
            return str(kaggle_config_dir() / name)
    return None


def bundle_owner(out: Path) -> str:
    """The Kaggle user the bundle under ``out`` was built for (from its kernel metadata)."""
    meta = out / "kernel" / "kernel-metadata.json"
    if not meta.is_file():
        raise PushError(f"{meta} not found: build the bundle first (`make kernel`)")
    return json.loads(meta.read_text())["id"].split("/", 1)[0]


def preflight(out: Path, user: str | None) -> str:
    """Every reason pushing cannot start, all at once; returns the CLI path when there is none."""
    problems = []
    cli = find_cli()
    if cli is None:
        where = os.environ.get("KAGGLE_CLI") or f"PATH or {interpreter_bin()}"
        problems.append(
            f"the kaggle CLI is not installed (looked in {where}): run "
            f"`{sys.executable} -m pip install {cli_pin()}`"
        )
    if find_credentials() is None:
        token = kaggle_config_dir() / "kaggle.json"
        problems.append(
            f"no Kaggle credentials: {token} is missing and KAGGLE_USERNAME/KAGGLE_KEY are unset; "
            + TOKEN_HELP.format(path=token)
        )
    owner = bundle_owner(out)
    if owner == PLACEHOLDER_USER:
        problems.append(
            f"the bundle in {out} was built without a Kaggle user name ('{owner}'): run "
            "`make kernel-push KAGGLE_USER=<your user name>` (or put kaggle.json in place first)"
        )
    elif user and user != owner:
        problems.append(
            f"the bundle in {out} was built for '{owner}', not '{user}': rebuild it (`make kernel`)"
        )
    if problems:
        raise PushError("cannot push to Kaggle:\n" + "\n".join(f"  - {p}" for p in problems))
    assert cli is not None
    return cli


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    log.info("$ %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if output:
        log.info("%s", output)
    if check and result.returncode != 0:
        raise PushError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{output}")
    return result


def wait_ready(cli: str, ref: str, timeout: float, poll: float, sleep: Callable[[float], None]) -> None:
    """Poll ``kaggle datasets status`` until the upload is processed (``ready``)."""
    deadline = time.monotonic() + timeout
    while True:
        result = _run([cli, "datasets", "status", ref], check=False)
        status = (result.stdout + result.stderr).strip().lower()
        if result.returncode == 0 and "ready" in status:
            return
        if result.returncode == 0 and ("error" in status or "fail" in status):
            raise PushError(f"Kaggle could not process dataset {ref}: {status}")
        if time.monotonic() >= deadline:
            raise PushError(
                f"dataset {ref} is not ready after {timeout:.0f} s ({status}); push the kernel later"
            )
        sleep(poll)


def push_bundle(
    out: Path,
    user: str | None = None,
    message: str | None = None,
    *,
    wait_timeout: float | None = 1800.0,
    poll: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[list[str]]:
    """Create or version the three datasets, wait until they are ready, push the kernel.

    ``wait_timeout`` None pushes the kernel without waiting for the datasets. Returns the kaggle command lines that uploaded something, in order.
    """
    out = Path(out)
    cli = preflight(out, user)
    build_id = json.loads((out / "code" / "BUNDLE.json").read_text())["build_id"]
    message = message or f"bundle {build_id}"
    uploads = []
    refs = []
    for part in DATASET_PARTS:
        folder = out / part
        ref = json.loads((folder / "dataset-metadata.json").read_text())["id"]
        exists = _run([cli, "datasets", "status", ref], check=False).returncode == 0
        if exists:
            cmd = [cli, "datasets", "version", "-p", str(folder), "-m", message, "--dir-mode", "zip"]
        else:
            cmd = [cli, "datasets", "create", "-p", str(folder), "--dir-mode", "zip"]
        _run(cmd)
        uploads.append(cmd)
        refs.append(ref)
    if wait_timeout is not None:
        for ref in refs:
            wait_ready(cli, ref, wait_timeout, poll, sleep)
    cmd = [cli, "kernels", "push", "-p", str(out / "kernel")]
    _run(cmd)
    uploads.append(cmd)
    return uploads
