"""Segmenters: any segmentation-models-pytorch architecture by name, built offline."""

from __future__ import annotations

from torch import nn

from pipeline.config import ModelCfg
from pipeline.models.registry import load_pretrained, seg_arch, set_offline

ENCODER_PREFIXES = ("", "encoder.", "encoder.model.")  # whole model, smp encoder, bare timm model


def build_segmenter(model_cfg: ModelCfg, in_channels: int, classes: int = 3) -> nn.Module:
    """An smp model returning logits (B, classes, H, W); classes overlap, so apply a sigmoid later.

    ``model_cfg.arch`` is an smp architecture (``Unet``, ``UnetPlusPlus``, ``FPN``...),
    ``model_cfg.encoder`` an smp encoder or a timm one with the ``tu-`` prefix,
    ``model_cfg.kwargs`` extra constructor arguments (``decoder_channels``, ``encoder_depth``...).
    Weights are random unless ``model_cfg.pretrained_path`` names a local file holding the
    whole model, its encoder, or the bare timm model of a ``tu-`` encoder.
    """
    import segmentation_models_pytorch as smp

    set_offline()
    arch = seg_arch(model_cfg.arch)
    kwargs = {k: v for k, v in model_cfg.kwargs.items() if v is not None}
    try:
        model = smp.create_model(
            arch,
            encoder_name=model_cfg.encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot build {arch} with encoder '{model_cfg.encoder}' and kwargs {kwargs}: {exc}"
        ) from exc
    if model_cfg.pretrained_path:
        required = [k for k in model.state_dict() if k.startswith("encoder.")]
        load_pretrained(model, model_cfg.pretrained_path, required, ENCODER_PREFIXES, in_channels)
    return model
