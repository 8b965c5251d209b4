"""Slice classifiers (which classes are present): a timm model, or an smp encoder with a head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError, ModelCfg
from pipeline.models.registry import TIMM_ARCH, cls_arch, load_start_weights
from pipeline.models.segmenter import create_smp, freeze_encoder_stages
from pipeline.runtime import set_offline_env

TIMM_PREFIXES = ("",)
SMP_PREFIXES = ("", "encoder.", "encoder.model.")  # classifier/segmenter, smp encoder, bare timm model


class EncoderClassifier(nn.Module):
    """The encoder and classification head of an smp model (``aux_params``), without the decoder.

    Its state-dict keys (``encoder.*``) are those of the segmenter built with the same
    encoder, so a trained segmenter's weights can start a classifier and vice versa.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.classification_head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.encoder(x)[-1])


def _head_keys(model: Any) -> set[str]:
    """State-dict keys of a timm model's classification head (``get_classifier()``)."""
    head = model.get_classifier()
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(head), "")
    return {k for k in model.state_dict() if prefix and k.startswith(prefix + ".")}


def _timm_classifier(model_cfg: ModelCfg, in_channels: int, classes: int) -> nn.Module:
    """``timm.create_model(encoder, pretrained=False, ...)`` with its own head; a failure names the settings."""
    import timm

    kwargs = {k: v for k, v in model_cfg.kwargs.items() if v is not None}
    try:
        return timm.create_model(
            model_cfg.encoder,
            pretrained=False,
            in_chans=in_channels,
            num_classes=classes,
            drop_rate=model_cfg.dropout,
            **kwargs,
        )
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot build classifier timm with encoder '{model_cfg.encoder}' and kwargs {kwargs}: {exc}"
        ) from exc


def build_classifier(
    model_cfg: ModelCfg, in_channels: int, classes: int = 3, *, pretrained: bool = True
) -> nn.Module:
    """A model returning logits (B, classes), one independent (sigmoid) output per class.

    ``arch: timm`` builds ``timm.create_model(encoder, pretrained=False, num_classes=classes,
    drop_rate=dropout)``; an smp architecture name builds that architecture's encoder +
    classification head (``encoder`` is then an smp / ``tu-`` encoder name). The backbone then starts
    from ``encoder_weights`` (ImageNet, from the local weights cache) or ``pretrained_path`` (a local
    file holding the whole model or its backbone); a head for another class count is skipped.
    ``pretrained=False`` skips both. ``freeze_encoder: N`` freezes the first N stages of an smp
    encoder (not of ``arch: timm``).
    """
    set_offline_env()
    arch = cls_arch(model_cfg.arch)
    if arch == TIMM_ARCH and model_cfg.freeze_encoder:
        raise ConfigError(
            "model.freeze_encoder needs an smp encoder: set model.arch to an smp architecture "
            f"(e.g. Unet, encoder 'tu-{model_cfg.encoder}') or freeze_encoder to 0"
        )
    if arch == TIMM_ARCH:
        model = _timm_classifier(model_cfg, in_channels, classes)
    else:
        aux = {"classes": classes, "dropout": model_cfg.dropout or None}
        net = create_smp(arch, model_cfg, in_channels, classes, aux_params=aux)
        model = EncoderClassifier(net.encoder, net.classification_head)
    if pretrained and arch == TIMM_ARCH:
        required = set(model.state_dict()) - _head_keys(model)
        load_start_weights(model, model_cfg, "cls", required, TIMM_PREFIXES, in_channels)
    elif pretrained:
        required = {k for k in model.state_dict() if k.startswith("encoder.")}
        load_start_weights(model, model_cfg, "cls", required, SMP_PREFIXES, in_channels)
    if isinstance(model, EncoderClassifier):  # an smp encoder (arch: timm refuses freeze_encoder above)
        freeze_encoder_stages(model.encoder, model_cfg.freeze_encoder, in_channels, model_cfg.encoder)
    return model
