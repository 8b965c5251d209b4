"""3D segmenters: MONAI networks by name, built offline (no weights are ever downloaded).

``model.arch`` names a MONAI network (``SegResNet``, ``UNet``, ``DynUNet``, ``SwinUNETR``);
``model.kwargs`` are its constructor arguments over the defaults of :mod:`pipeline.config.networks3d`.
Input (B, C, D, H, W) with D the slices, output logits (B, classes, D, H, W). Every size the network
sees (training patch, sliding-window ROI) must be a multiple of its total stride per axis: checked
when the config is loaded, naming the key to change.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.config import ConfigError, ModelCfg
from pipeline.config.networks3d import arch3d, check_sizes, network_kwargs
from pipeline.models.registry import load_pretrained


def build_segmenter3d(
    model_cfg: ModelCfg,
    in_channels: int,
    classes: int,
    patch_size: Sequence[int],
    *,
    pretrained: bool = True,
) -> nn.Module:
    """A MONAI 3D network returning logits (B, classes, D, H, W) (see the module doc).

    ``patch_size`` sizes DynUNet's default plan and must be a multiple of the network's stride (the
    config loader checks it, and ``seg3d.roi_size``, when the config is loaded). ``model.pretrained_path`` (a local file) loads the whole network
    (not with ``pretrained=False``); ``model.encoder_weights`` is refused: MONAI's networks have no
    ImageNet weights.
    """
    import monai.networks.nets as nets

    if model_cfg.encoder_weights:
        raise ConfigError(
            f"model.encoder_weights = {model_cfg.encoder_weights!r}: MONAI's 3D networks have no ImageNet "
            "weights; set it to null (model.pretrained_path loads a local file of your own)"
        )
    arch = arch3d(model_cfg.arch)
    kwargs = network_kwargs(arch, patch_size, model_cfg.kwargs)
    check_sizes(arch, kwargs, {"seg3d.patch_size": patch_size})
    try:
        model = getattr(nets, arch)(spatial_dims=3, in_channels=in_channels, out_channels=classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build {arch} with model.kwargs {model_cfg.kwargs}: {exc}") from None
    if pretrained and model_cfg.pretrained_path:
        load_pretrained(model, model_cfg.pretrained_path, list(model.state_dict()), ("",), in_channels)
    return model
