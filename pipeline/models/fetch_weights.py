"""`make weights`: the one step that downloads, filling the local weights cache once.

Each network a config starts from is fetched through its library's own mechanism, on a machine
with internet: smp's ``get_encoder(..., weights="imagenet")`` (the ``smp-hub/<encoder>.imagenet``
repositories of the Hugging Face hub), timm's ``create_model(name, pretrained=True)`` (the model's
default pretrained tag, from the hub), ultralytics' ``YOLO("<name>.pt")`` (its GitHub release
asset). The network's plain state dict then goes into the cache with its manifest entry
(:func:`pipeline.models.weights.store`); training and inference read only that. An entry already
cached and intact is not fetched again (``force`` refetches).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import (
    ClsConfig,
    Config,
    ConfigError,
    DetConfig,
    EnsembleConfig,
    MemberConfig,
    SegConfig,
    resolve_config_path,
)
from pipeline.datasets import load_config
from pipeline.models.detector import det_request, fetch_yolo_state
from pipeline.models.registry import check_model, model_request
from pipeline.models.weights import (
    WeightsError,
    WeightsRequest,
    cached_file,
    read_manifest,
    store,
    weights_dir,
)
from pipeline.runtime import OFFLINE_ENV

log = logging.getLogger(__name__)

# the "*_OFFLINE" switches of pipeline.runtime.OFFLINE_ENV, lifted for the one process that downloads
ONLINE_ENV = {key: "0" for key in OFFLINE_ENV if key.endswith("_OFFLINE")}

Fetched = tuple[dict[str, torch.Tensor], str, dict[str, Any]]  # (state dict, source, meta)


def allow_downloads() -> None:
    """Let the libraries download in this process; call before any of them is imported.

    huggingface_hub reads its offline switch once, at import: a process that imported it offline
    cannot fetch, which is said here rather than as a network error later.
    """
    os.environ.update(ONLINE_ENV)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and hub.is_offline_mode():
        raise WeightsError(
            "huggingface_hub was imported offline in this process: run `make weights` in a fresh "
            "process (python -m stages.weights)"
        )


def fetch_smp(request: WeightsRequest, folder: Path) -> Fetched:
    """smp's own download of an encoder's weights (3 input channels, depth 5: the whole encoder)."""
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[request.name]["pretrained_settings"][request.weights]
    encoder = smp.encoders.get_encoder(request.name, in_channels=3, depth=5, weights=request.weights)
    source = f"huggingface.co/{settings['repo_id']} (revision {settings.get('revision')})"
    return encoder.state_dict(), source, {}


def fetch_timm(request: WeightsRequest, folder: Path) -> Fetched:
    """timm's own download of a model's default pretrained tag (the whole model, head included)."""
    import timm

    model = timm.create_model(request.name, pretrained=True)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub = cfg.get("hf_hub_id")
    source = f"huggingface.co/{hub}" if hub else str(cfg.get("url") or f"timm {request.name}")
    tag = f"{cfg.get('architecture', request.name)}.{cfg.get('tag')}" if cfg.get("tag") else request.name
    return model.state_dict(), source, {"timm_tag": tag}


def fetch_ultralytics(request: WeightsRequest, folder: Path) -> Fetched:
    """ultralytics' own download of ``<name>.pt``, turned into a plain state dict here (once)."""
    return fetch_yolo_state(request.name, folder)


FETCHERS: dict[str, Callable[[WeightsRequest, Path], Fetched]] = {
    "smp": fetch_smp,
    "timm": fetch_timm,
    "ultralytics": fetch_ultralytics,
}


# --------------------------------------------------------------------------- which weights


def config_requests(cfg: Config) -> list[WeightsRequest]:
    """Every cache entry a seg, cls or det config starts from."""
    if isinstance(cfg, DetConfig):
        found = det_request(cfg.det)
    elif isinstance(cfg, SegConfig | ClsConfig):
        found = model_request(cfg.model, cfg.stage)
    else:
        found = None
    return [found] if found else []


def expand_configs(names: Iterable[str]) -> list[DetConfig | MemberConfig]:
    """The seg, cls and det configs behind ``names`` (files or bare names), in order, once each.

    An ensemble brings its members, classifier and detector; a seg or cls config that crops
    brings the detector of ``data.det_config``.
    """
    seen: dict[Path, Config] = {}
    queue = [resolve_config_path(n) for n in names]
    while queue:
        path = queue.pop(0).resolve()
        if path in seen:
            continue
        cfg = seen[path] = load_config(path)
        more: list[str] = []
        if isinstance(cfg, EnsembleConfig):
            more = [m.config for m in cfg.members] + [c for c in (cfg.classifier, cfg.det_config) if c]
        elif isinstance(cfg, SegConfig | ClsConfig) and cfg.data.crop:
            more = [cfg.data.det_config]
        queue += [resolve_config_path(n, relative_to=path.parent) for n in more]
    return [c for c in seen.values() if isinstance(c, SegConfig | ClsConfig | DetConfig)]


def wanted(configs: Iterable[DetConfig | MemberConfig]) -> list[tuple[WeightsRequest, str]]:
    """(request, the first config asking for it) of every distinct cache entry, names checked first."""
    out: dict[str, tuple[WeightsRequest, str]] = {}
    for cfg in configs:
        for request in config_requests(cfg):
            if isinstance(cfg, SegConfig | ClsConfig):
                with contextlib.suppress(WeightsError):  # not cached yet: what this step is for
                    check_model(cfg.model, cfg.stage)
            out.setdefault(request.key, (request, cfg.name))
    return list(out.values())


# --------------------------------------------------------------------------- fetching


def fetch_weights(
    configs: Iterable[DetConfig | MemberConfig], root: Path | None = None, force: bool = False
) -> list[dict[str, Any]]:
    """Fill the cache with every entry ``configs`` start from; one report row per entry.

    Row: ``key``, ``status`` (``cached``: already there and intact; ``fetched``), ``size``,
    ``source``, ``config``. A download that fails raises a WeightsError naming the entry and
    the library's own message (no network, an unknown name...).
    """
    root = root or weights_dir()
    rows = []
    for request, config in wanted(configs):
        entry = None if force else _intact(request, root)
        status = "cached"
        if entry is None:
            entry, status = _fetch_one(request, root), "fetched"
        rows.append({"key": request.key, "status": status, "size": entry["size"], "source": entry["source"],
                     "config": config})  # fmt: skip
        log.info("%s %s (%.1f MiB, %s)", status, request.key, entry["size"] / 2**20, entry["source"])
    return rows


def _intact(request: WeightsRequest, root: Path) -> dict[str, Any] | None:
    try:
        cached_file(request, root)
    except WeightsError:
        return None
    return read_manifest(root)[request.key]


def _fetch_one(request: WeightsRequest, root: Path) -> dict[str, Any]:
    log.info("fetching %s through %s", request.describe(), request.library)
    with tempfile.TemporaryDirectory(prefix="weights-") as folder:
        try:
            state, source, meta = FETCHERS[request.library](request, Path(folder))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise WeightsError(
                f"could not fetch the {request.describe()} ({type(exc).__name__}: {first}); `make weights` "
                "needs internet (the Hugging Face hub for smp and timm, GitHub for ultralytics)"
            ) from exc
    if not state:
        raise ConfigError(f"{request.library} returned no tensors for {request.key}")
    return store(request, state, source, root, meta)
