"""Names of the architectures the factories accept, and loading of local starting weights.

Both factories go through here: an unknown name fails with the list of valid ones; a network
starts from ``model.encoder_weights`` (read from the local cache of :mod:`pipeline.models.weights`,
filled by `make weights`) or ``model.pretrained_path`` (a local file), and nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, ModelCfg
from pipeline.config.networks3d import arch3d
from pipeline.errors import PipelineError
from pipeline.models.weights import WeightsRequest, cached_file, load_cached

log = logging.getLogger(__name__)

TIMM_ARCH = "timm"  # classifier: a plain timm model with its own head
WRAPPER_KEYS = ("model", "state_dict", "ema")  # checkpoint dicts that hold the state dict under a key


class PretrainedError(PipelineError, ValueError):
    """A local weights file is missing or does not fit the model."""


def seg_archs() -> tuple[str, ...]:
    """The architectures of the installed segmentation-models-pytorch, by class name (``Unet``...).

    Read from smp's own registry (``MODEL_ARCHITECTURES_MAPPING``), so a new smp release brings
    its new architectures without an edit here.
    """
    import segmentation_models_pytorch as smp

    return tuple(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def seg_arch(name: str) -> str:
    """The canonical smp architecture name for ``name`` (case-insensitive), or a ConfigError."""
    archs = seg_archs()
    by_lower = {arch.lower(): arch for arch in archs}
    if name.lower() not in by_lower:
        raise ConfigError(f"model.arch '{name}' is not a known architecture; valid: {', '.join(archs)}")
    return by_lower[name.lower()]


def cls_arch(name: str) -> str:
    """``timm`` or an smp architecture (its encoder + classification head), else a ConfigError."""
    if name.lower() == TIMM_ARCH:
        return TIMM_ARCH
    try:
        return seg_arch(name)
    except ConfigError:
        raise ConfigError(
            f"model.arch '{name}' is not a known classifier; valid: {TIMM_ARCH}, {', '.join(seg_archs())}"
        ) from None


def model_request(model_cfg: ModelCfg, stage: str) -> WeightsRequest | None:
    """The weights-cache entry a seg/cls ``model`` section starts from (None: random or its own file).

    ``arch: timm`` classifiers and ``tu-`` encoders read the whole timm model (its default pretrained
    tag); any other encoder reads smp's encoder of that name.
    """
    if not model_cfg.encoder_weights or model_cfg.spatial_dims == 3:
        return None
    encoder = model_cfg.encoder
    if (stage == "cls" and model_cfg.arch.lower() == TIMM_ARCH) or encoder.startswith("tu-"):
        return WeightsRequest("timm", encoder.removeprefix("tu-"), model_cfg.encoder_weights)
    return WeightsRequest("smp", encoder, model_cfg.encoder_weights)


def check_model(model_cfg: ModelCfg, stage: str) -> None:
    """Refuse an unknown architecture or encoder by name, and missing starting weights, before any
    data is read or model built.

    Names come from the libraries themselves: smp's architectures and encoders, timm's models (for
    ``arch: timm`` classifiers and ``tu-`` encoders). The error lists close matches. With
    ``model.encoder_weights`` the library must publish such weights for the encoder, and the local
    cache must hold them, intact (a :class:`~pipeline.models.weights.WeightsError` says how to fetch them).
    """
    import segmentation_models_pytorch as smp
    import timm

    if model_cfg.spatial_dims == 3:
        arch3d(model_cfg.arch)  # a MONAI network: model.encoder is not used
        return
    arch = seg_arch(model_cfg.arch) if stage == "seg" else cls_arch(model_cfg.arch)
    encoder = model_cfg.encoder
    if arch == TIMM_ARCH or encoder.startswith("tu-"):
        name = encoder.removeprefix("tu-")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            raise ConfigError(
                f"model.encoder '{encoder}' is not a timm model"
                + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()")
            )
        published = not model_cfg.encoder_weights or timm.is_model_pretrained(name)
    else:
        names = smp.encoders.get_encoder_names()
        if encoder not in names:
            close = difflib.get_close_matches(encoder, names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"model.encoder '{encoder}' is not an smp encoder{hint} (timm models need the 'tu-' prefix)"
            )
        published = (
            not model_cfg.encoder_weights
            or model_cfg.encoder_weights in (smp.encoders.encoders[encoder]["pretrained_settings"])
        )
    if not published:
        raise ConfigError(
            f"model.encoder_weights: '{encoder}' has no published {model_cfg.encoder_weights} weights; "
            "pick another encoder or set model.encoder_weights to null"
        )
    request = model_request(model_cfg, stage)
    if request is not None:
        cached_file(request)


# --------------------------------------------------------------------------- local weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: a bare state dict or a checkpoint holding one."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(
            f"model.pretrained_path: weights file not found: {path} (put the file there or set it to null)"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path}: expected a state dict of tensors (or a checkpoint with 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _norm(key: str) -> str:
    # timm's feature wrappers flatten module paths ("stages.2" -> "stages_2"); compare both spellings
    return key.replace(".", "_")


def _match_keys(source: Iterable[str], target: Iterable[str], prefixes: Iterable[str]) -> dict[str, str]:
    """File key -> model key, under the prefix among ``prefixes`` that matches the most keys."""
    best: dict[str, str] = {}
    for prefix in prefixes:
        index = {_norm(k[len(prefix) :]): k for k in target if k.startswith(prefix)}
        match = {k: index[_norm(k)] for k in source if _norm(k) in index}
        if len(match) > len(best):
            best = match
    return best


def _fit_tensor(value: torch.Tensor, want: torch.Size, in_channels: int | None) -> torch.Tensor | None:
    """``value`` as a tensor of shape ``want``, or None when it does not fit.

    The one conversion: a first convolution saved for 1 or 3 input channels becomes one for
    the model's ``in_channels`` (timm's ``adapt_input_conv``: repeated and rescaled).
    """
    if value.shape == want:
        return value
    first_conv = (
        value.ndim == 4
        and len(want) == 4
        and want[1] == in_channels
        and value.shape[1] in (1, 3)
        and value.shape[0] == want[0]
        and value.shape[2:] == want[2:]
    )
    if not first_conv:
        return None
    from timm.models import adapt_input_conv

    return adapt_input_conv(int(want[1]), value, base_chans=int(value.shape[1]))


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    required: Iterable[str],
    prefixes: Iterable[str] = ("",),
    in_channels: int | None = None,
) -> dict[str, int]:
    """Load a local weights file into ``model``; every key in ``required`` must be found.

    The file may hold the whole model or only a part of it (e.g. the encoder): see :func:`load_state`.
    """
    return load_state(model, read_state_dict(path), str(path), required, prefixes, in_channels)


def load_start_weights(
    model: nn.Module,
    model_cfg: ModelCfg,
    stage: str,
    required: Iterable[str],
    prefixes: Iterable[str],
    in_channels: int,
) -> dict[str, int] | None:
    """Load what ``model_cfg`` starts from: ``pretrained_path`` (a local file) or ``encoder_weights``
    (the verified cache entry of :func:`model_request`); None when it starts random."""
    if model_cfg.pretrained_path:
        return load_pretrained(model, model_cfg.pretrained_path, required, prefixes, in_channels)
    request = model_request(model_cfg, stage)
    if request is None:
        return None
    label = f"weights cache {request.key}"
    return load_state(model, load_cached(request), label, required, prefixes, in_channels)


def load_state(
    model: nn.Module,
    source: dict[str, torch.Tensor],
    label: str,
    required: Iterable[str],
    prefixes: Iterable[str] = ("",),
    in_channels: int | None = None,
) -> dict[str, int]:
    """Load the tensors ``source`` (read from ``label``) into ``model``; every key in ``required`` must fit.

    ``source`` may hold the whole model or only a part of it (e.g. the encoder): the key prefix
    among ``prefixes`` that matches the most model keys is added to its keys (so a bare timm
    state dict fits an smp ``tu-`` encoder under ``encoder.model.``). A first convolution saved
    for 1 or 3 input channels is adapted to ``in_channels`` (timm's rule); other keys that do
    not fit (a head for another class count, stages a shallower encoder lacks) are skipped and logged.
    """
    target = model.state_dict()
    names = _match_keys(source, target, prefixes)
    loaded: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in source.items():
        name = names.get(key)
        fitted = None if name is None else _fit_tensor(value, target[name].shape, in_channels)
        if name is None or fitted is None:
            skipped.append(key)
        else:
            loaded[name] = fitted.to(target[name].dtype)
    missing = sorted(set(required) - set(loaded))
    if missing:
        raise PretrainedError(
            f"{label}: {len(missing)} of the model's required weights are missing or of another shape "
            f"(first: {', '.join(missing[:5])}); file keys look like {', '.join(list(source)[:3])}. "
            "Is model.encoder the encoder these weights were saved from?"
        )
    model.load_state_dict(loaded, strict=False)
    if skipped:
        log.info("%s: skipped %d keys that do not fit the model (e.g. %s)", label, len(skipped), skipped[0])
    log.info("loaded %d tensors from %s", len(loaded), label)
    return {"loaded": len(loaded), "skipped": len(skipped)}
