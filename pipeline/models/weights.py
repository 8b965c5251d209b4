"""The local cache of pretrained starting weights: filled once by `make weights`, read offline.

``$WEIGHTS_DIR`` (default ``weights/``) holds one safetensors file per pretrained network and
``manifest.json`` describing each (name, source, sha256, size). A key names the library, the
network and its weights: ``smp/resnet34.imagenet`` (an smp encoder's state dict),
``timm/tf_efficientnet_b4.imagenet`` (a whole timm model, its head included: it serves both an
``arch: timm`` classifier and an smp ``tu-`` encoder), ``ultralytics/yolov8n.coco`` (a YOLO
detection model). Which entry a config starts from is decided by
:func:`pipeline.models.registry.model_request` and :func:`pipeline.models.detector.det_request`. Files
are plain tensors (no pickle); every read checks size and sha256 against
the manifest first. Nothing here downloads: :mod:`pipeline.models.fetch_weights` is the one place
that does, and only `make weights` calls it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.io import write_json, write_with
from pipeline.paths import PROJECT_ROOT

WEIGHTS_ENV = "WEIGHTS_DIR"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class WeightsError(ConfigError):
    """Pretrained weights a config asks for are missing from the cache or damaged there (a config
    error: the stage that loaded the config names it in front of the message)."""


def weights_dir() -> Path:
    """The cache folder: ``$WEIGHTS_DIR``, else ``weights/`` in the project."""
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    return Path(value).expanduser() if value else PROJECT_ROOT / "weights"


@dataclasses.dataclass(frozen=True)
class WeightsRequest:
    """One network's pretrained weights as a config asks for them."""

    library: str  # smp | timm | ultralytics
    name: str  # smp encoder, timm model or ultralytics model (yolov8n)
    weights: str  # imagenet | coco
    config_key: str = "model.encoder_weights"  # the key that asked, for messages

    @property
    def key(self) -> str:
        return f"{self.library}/{self.name}.{self.weights}"

    @property
    def file(self) -> str:
        return f"{self.key}.safetensors"

    def describe(self) -> str:
        return f"{self.weights} weights of {self.library} '{self.name}'"


# --------------------------------------------------------------------------- manifest


def read_manifest(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Key -> entry of the cache's manifest ({} when there is no cache)."""
    path = (root or weights_dir()) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
    except (ValueError, KeyError, TypeError):
        raise WeightsError(
            f"{path} is not a weights manifest (a JSON object with 'entries'): delete it and run `make weights`"
        ) from None
    return dict(entries)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    # one hash per file version and process: every fold and member of a run reads the same files
    return sha256_file(Path(path))


def fix_hint(root: Path, command: str) -> str:
    """What to do about a missing or damaged cache entry: where to fetch it, and Kaggle notebooks."""
    return (
        f"run `{command}` once on a machine with internet (it fills {root}); on a Kaggle notebook, "
        f"upload {root} as a dataset (`kaggle datasets init -p {root}`, then `kaggle datasets create -p "
        f"{root}`), add it to the notebook and set WEIGHTS_DIR=/kaggle/input/<its slug>"
    )


def cached_file(request: WeightsRequest, root: Path | None = None, command: str | None = None) -> Path:
    """The verified file of ``request`` in the cache; a WeightsError (one line, with the fix) otherwise."""
    root = root or weights_dir()
    command = command or "make weights CONFIG=<this config>"
    entry = read_manifest(root).get(request.key)
    path = root / request.file
    what = f"{request.config_key}: the {request.describe()}"
    if entry is None or not path.is_file():
        reason = f"{MANIFEST} has no '{request.key}'" if entry is None else f"{path.name} is missing"
        raise WeightsError(
            f"{what} are not in the weights cache {root} ({reason}): {fix_hint(root, command)}"
        )
    stat = path.stat()
    if stat.st_size != entry.get("size") or _digest_of(
        str(path), stat.st_size, stat.st_mtime_ns
    ) != entry.get("sha256"):
        raise WeightsError(
            f"{what} in {path} are damaged (size or sha256 differs from {root / MANIFEST}): delete the file "
            f"and {fix_hint(root, command + ' FORCE=1')}"
        )
    return path


def load_cached(
    request: WeightsRequest, root: Path | None = None, command: str | None = None
) -> dict[str, torch.Tensor]:
    """The verified state dict of ``request`` (plain tensors from safetensors, no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(cached_file(request, root, command)), device="cpu")


def entry_meta(request: WeightsRequest, root: Path | None = None) -> dict[str, Any]:
    """The ``meta`` an entry was stored with (e.g. a detector's class count)."""
    return dict(read_manifest(root).get(request.key, {}).get("meta", {}))


def store(
    request: WeightsRequest,
    state: dict[str, torch.Tensor],
    source: str,
    root: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``state`` as ``request``'s safetensors file and record it in the manifest; the entry.

    Floating tensors are kept at float32 and every tensor is made contiguous and unshared (what
    safetensors stores); the file and the manifest are each written atomically.
    """
    from safetensors.torch import save_file

    root = root or weights_dir()
    plain = {
        k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).contiguous().clone()
        for k, v in state.items()
    }
    path = root / request.file
    write_with(path, lambda tmp: save_file(plain, str(tmp), metadata={"key": request.key, "source": source}))
    entry = {
        "key": request.key,
        "library": request.library,
        "name": request.name,
        "weights": request.weights,
        "file": request.file,
        "source": source,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "tensors": len(plain),
        "meta": dict(meta or {}),
    }
    entries = read_manifest(root)
    entries[request.key] = entry
    write_json(root / MANIFEST, {"format": MANIFEST_FORMAT, "entries": dict(sorted(entries.items()))})
    return entry
