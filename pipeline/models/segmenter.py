"""Segmenters: any segmentation-models-pytorch architecture by name, built offline.

Also the freezing of an smp encoder's first stages (``model.freeze_encoder``), shared with the
classifier built from the same encoders.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError, ModelCfg
from pipeline.models.registry import load_start_weights, seg_arch
from pipeline.runtime import set_offline_env

ENCODER_PREFIXES = ("", "encoder.", "encoder.model.")  # whole model, smp encoder, bare timm model
PROBE_SIZE = 64  # side of the blank image traced to find which parameters each encoder stage owns


def build_segmenter(
    model_cfg: ModelCfg, in_channels: int, classes: int = 3, *, pretrained: bool = True
) -> nn.Module:
    """An smp model returning logits (B, classes, H, W); classes overlap, so apply a sigmoid later.

    ``model_cfg.arch`` is an smp architecture (``Unet``, ``UnetPlusPlus``, ``FPN``...),
    ``model_cfg.encoder`` an smp encoder or a timm one with the ``tu-`` prefix,
    ``model_cfg.kwargs`` extra constructor arguments (``decoder_channels``, ``encoder_depth``...).
    The model is built with ``encoder_weights=None`` (smp never downloads); the encoder then starts
    from ``model_cfg.encoder_weights`` (ImageNet, read from the local weights cache that `make
    weights` fills) or from ``model_cfg.pretrained_path`` (a local file holding the whole model, its
    encoder, or the bare timm model of a ``tu-`` encoder), else stays random; ``pretrained=False``
    skips both (a checkpoint is loaded next, or a benchmark). ``freeze_encoder: N`` then freezes the
    first N encoder stages (see :func:`freeze_encoder_stages`).
    """
    set_offline_env()
    model = create_smp(seg_arch(model_cfg.arch), model_cfg, in_channels, classes)
    if pretrained:
        required = [k for k in model.state_dict() if k.startswith("encoder.")]
        load_start_weights(model, model_cfg, "seg", required, ENCODER_PREFIXES, in_channels)
    freeze_encoder_stages(model.encoder, model_cfg.freeze_encoder, in_channels, model_cfg.encoder)
    return model


def create_smp(arch: str, model_cfg: ModelCfg, in_channels: int, classes: int, **extra: Any) -> Any:
    """``smp.create_model`` offline: ``encoder_weights=None`` (smp never downloads), ``model.kwargs``
    (None values left out) and ``extra`` (a classifier's ``aux_params``); a failure names the settings."""
    import segmentation_models_pytorch as smp

    kwargs = {k: v for k, v in model_cfg.kwargs.items() if v is not None}
    try:
        return smp.create_model(
            arch,
            encoder_name=model_cfg.encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=classes,
            **extra,
            **kwargs,
        )
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot build {arch} with encoder '{model_cfg.encoder}' and kwargs {kwargs}: {exc}"
        ) from exc


def encoder_stage_params(
    encoder: nn.Module, stages: int, in_channels: int, name: str = "encoder"
) -> set[str]:
    """Names of the ``encoder`` parameters its first ``stages`` stages compute with.

    An smp encoder returns one feature map per output stride, ``features[i]`` at stride ``2**i``
    (``features[0]`` is the input, or a full-resolution map for VGG-style encoders). Stage ``i``
    (1-based) is what produces ``features[i]``, so the first N stages are every parameter that
    the stride-``2**N`` feature map depends on: for ``resnet50`` and N=2 the stem
    (``conv1``/``bn1``) and ``layer1``; for ``vgg16`` every convolution before the third max-pool.
    The dependency is read off autograd on one blank image, so it holds for any smp or ``tu-``
    encoder (a transformer's empty stride-2 placeholder owns no parameters).
    """
    if stages < 0:
        raise ConfigError(f"model.freeze_encoder must be >= 0 (0 freezes nothing), got {stages}")
    was_training = encoder.training
    encoder.eval()  # no batch-norm statistics are updated by the probe
    try:
        size = max(PROBE_SIZE, 2 ** len(getattr(encoder, "out_channels", ())))
        with torch.enable_grad():
            features = encoder(torch.zeros(1, in_channels, size, size))
            count = len(features) - 1
            if stages > count:
                raise ConfigError(
                    f"model.freeze_encoder is {stages} but encoder '{name}' has {count} stages: use 0..{count}"
                )
            outputs = [f.sum() for f in features[1 : stages + 1] if f.requires_grad and f.numel()]
            if not outputs:
                return set()
            params = dict(encoder.named_parameters())
            grads = torch.autograd.grad(sum(outputs), list(params.values()), allow_unused=True)
    finally:
        encoder.train(was_training)
    return {key for key, grad in zip(params, grads, strict=True) if grad is not None}


def _stay_in_eval(module: nn.Module, args: tuple) -> None:
    module.training = False  # frozen batch-norm: use the stored statistics, never update them


def freeze_encoder_stages(
    encoder: nn.Module, stages: int, in_channels: int, name: str = "encoder"
) -> list[str]:
    """Freeze the first ``stages`` stages of an smp encoder; return the frozen parameter names.

    Their parameters get ``requires_grad=False`` (the optimizer skips them), and a batch-norm
    layer whose parameters are all frozen stays in eval mode even under ``model.train()``: a
    forward pre-hook resets its ``training`` flag, so its running statistics are used and kept.
    ``stages=0`` changes nothing; more stages than the encoder has raises a ConfigError.
    """
    if stages == 0:
        return []
    frozen = encoder_stage_params(encoder, stages, in_channels, name)
    for key, param in encoder.named_parameters():
        if key in frozen:
            param.requires_grad_(False)
    for module in encoder.modules():
        own = [p for p in module.parameters(recurse=False)]
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and own
            and not any(p.requires_grad for p in own)
        ):
            module.register_forward_pre_hook(_stay_in_eval)
    return sorted(frozen)
