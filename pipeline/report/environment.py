"""What the report says about where it was made and what the runs were made with.

Package versions (``importlib.metadata``), the device, the git commit of the project, every run
folder's resolved ``config.yaml`` and the ``machine:`` fingerprint block those files carry
(:func:`pipeline.runtime.record_machine`): comparing fingerprints tells whether two runs' scores
may differ because of the machine (docs/REPRODUCIBILITY.md).
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.paths import PROJECT_ROOT

PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "segmentation_models_pytorch",
    "monai",
    "ultralytics",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "pandas",
    "scipy",
    "numba",
    "scikit-learn",
    "matplotlib",
    "mlflow",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """name -> installed version ("not installed" where absent), Python first."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_summary() -> str:
    """The accelerator this machine offers (CUDA devices by name), or the CPU."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA {torch.version.cuda}: " + ", ".join(names)
    return f"CPU ({platform.processor() or platform.machine()}), no CUDA device"


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """``<sha> (<n> files changed)`` of the project's work tree, or why it is unknown."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git work tree, or no git)"
    return sha + (f" ({len(dirty)} tracked files changed since)" if dirty else " (clean)")


@dataclass
class RunConfig:
    """One run folder's resolved config: the text without its machine block, and that block."""

    label: str
    path: Path
    text: str
    machine: dict[str, Any] = field(default_factory=dict)


def read_run_config(label: str, path: Path) -> RunConfig | None:
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return RunConfig(label, path, text)
    machine = data.pop("machine", None) if isinstance(data, dict) else None
    shown = yaml.safe_dump(data, sort_keys=False) if machine is not None else text
    return RunConfig(label, path, shown, machine if isinstance(machine, dict) else {})


def machine_line(fingerprint: dict[str, Any]) -> str:
    """One line of a fingerprint (:func:`pipeline.runtime.machine_summary`), or the block's CPU where it
    lacks the fields that line needs."""
    from pipeline.runtime import machine_summary

    try:
        return machine_summary(fingerprint)
    except (KeyError, TypeError):
        return str(fingerprint.get("cpu", "unknown machine"))
