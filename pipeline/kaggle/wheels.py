"""The wheels a Kaggle GPU image lacks, pinned to requirements.txt and fetched once.

The kernel installs them with ``pip install --no-index --find-links <wheels dataset>``, so the
folder must hold every wheel the resolver could ask for: the packages the code imports
(``KERNEL_PACKAGES``, each pinned and installed when the image has another version) and
their dependencies that the image may lack (``SUPPORT_PACKAGES``, there only for the resolver).
Wheels come from a local folder (``--wheels-from``) or from ``pip download`` into a cache that
later builds reuse.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from pipeline.errors import PipelineError
from pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

REQUIREMENTS = PROJECT_ROOT / "requirements.txt"
DEFAULT_CACHE = PROJECT_ROOT / "build" / "wheels-cache"

# Imported by the pipeline and missing (or at another version) on the Kaggle image.
KERNEL_PACKAGES = (
    "segmentation-models-pytorch",
    "ultralytics",
    "ultralytics-thop",
    "albumentations",
    "albucore",
    "numba-cuda",
    "tifffile",  # LGG and Ultrasound Nerve slices are TIFF files
    "imagecodecs",  # tifffile's codecs: the real nerve frames are LZW-compressed
    "monai",  # the 3D members' networks and sliding-window inference
    "einops",  # MONAI's SwinUNETR
)
# Dependencies of the above the image may lack; pip takes them only when it needs them.
SUPPORT_PACKAGES = (
    "stringzilla",
    "simsimd",
    "ultralytics-platform",
    "cuda-bindings",
    "cuda-core",
    "cuda-pathfinder",
)


class WheelError(PipelineError, RuntimeError):
    """A wheel could not be found or downloaded; the message names it and the way out."""


@dataclass(frozen=True)
class WheelSet:
    """Pinned versions (canonical name -> version) and the wheel files that provide them."""

    packages: dict[str, str]
    support: dict[str, str]
    files: tuple[Path, ...]

    def manifest(self) -> dict:
        """What the kernel reads: which pins to ensure, and which files the folder holds."""
        return {
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "packages": self.packages,
            "support": self.support,
            "files": sorted(p.name for p in self.files),
        }


def read_pins(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """``name==version`` lines of a requirements file, keyed by canonical name."""
    pins: dict[str, str] = {}
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def pinned(names: tuple[str, ...], pins: dict[str, str], requirements: Path = REQUIREMENTS) -> dict[str, str]:
    missing = [n for n in names if canonicalize_name(n) not in pins]
    if missing:
        raise WheelError(f"{requirements} has no '==' pin for {', '.join(missing)}: add one")
    return {canonicalize_name(n): pins[canonicalize_name(n)] for n in names}


def find_wheel(folder: Path, name: str, version: str) -> Path | None:
    """A wheel of ``name==version`` in ``folder`` that installs on this interpreter, if any."""
    if not folder.is_dir():
        return None
    supported = set(sys_tags())
    for path in sorted(folder.glob("*.whl")):
        try:
            wname, wversion, _, tags = parse_wheel_filename(path.name)
        except ValueError:
            continue
        if wname == canonicalize_name(name) and str(wversion) == version and tags & supported:
            return path
    return None


def download(specs: list[str], dest: Path) -> None:
    """``pip download --no-deps --only-binary=:all:`` of exact pins into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d"]
    log.info("downloading %d wheel(s) into %s: %s", len(specs), dest, " ".join(specs))
    result = subprocess.run([*cmd, str(dest), *specs], capture_output=True, text=True)
    if result.returncode != 0:
        raise WheelError(
            f"pip could not download {' '.join(specs)} into {dest}:\n{result.stderr.strip()[-2000:]}\n"
            "With no access to PyPI, put these wheels in a folder and pass --wheels-from DIR."
        )


def collect_wheels(
    wheels_from: Path | None = None,
    cache: Path = DEFAULT_CACHE,
    requirements: Path = REQUIREMENTS,
) -> WheelSet:
    """Every kernel and support wheel at its pinned version.

    ``wheels_from``: take them only from this folder (nothing is downloaded). Otherwise the
    ``cache`` folder is filled with ``pip download`` for whatever it lacks.
    """
    pins = read_pins(requirements)
    packages = pinned(KERNEL_PACKAGES, pins, requirements)
    support = pinned(SUPPORT_PACKAGES, pins, requirements)
    wanted = {**packages, **support}
    folder = Path(wheels_from) if wheels_from else Path(cache)
    found = {name: find_wheel(folder, name, version) for name, version in wanted.items()}
    missing = [f"{name}=={wanted[name]}" for name, path in found.items() if path is None]
    if missing and wheels_from:
        raise WheelError(
            f"{folder} lacks wheels for {', '.join(missing)} (python "
            f"{sys.version_info.major}.{sys.version_info.minor}): add them, e.g. "
            f"`pip download --no-deps --only-binary=:all: -d {folder} {' '.join(missing)}`"
        )
    if missing:
        download(missing, folder)
        found = {name: find_wheel(folder, name, version) for name, version in wanted.items()}
        still = [f"{n}=={wanted[n]}" for n, p in found.items() if p is None]
        if still:
            raise WheelError(f"pip downloaded no wheel for this interpreter for {', '.join(still)}")
    return WheelSet(packages, support, tuple(p for p in found.values() if p is not None))


def copy_wheels(wheels: WheelSet, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(src, dest / src.name)) for src in wheels.files]
