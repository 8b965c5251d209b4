"""3D segmenters: MONAI networks by name, built offline (no weights are ever downloaded).

``model.arch`` names a MONAI network (``SegResNet``, ``UNet``, ``DynUNet``, ``SwinUNETR``);
``model.kwargs`` are its constructor arguments over the defaults below. Input (B, C, D, H, W)
with D the slices, output logits (B, classes, D, H, W). Every size the network sees (training
patch, sliding-window ROI) must be a multiple of its total stride per axis: checked when the model
is built, naming the key to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from pipeline.config import ConfigError, ModelCfg
from pipeline.models.registry import load_pretrained

ARCHS = ("SegResNet", "UNet", "DynUNet", "SwinUNETR")


def arch3d(name: str) -> str:
    """The canonical MONAI network name for ``name`` (case-insensitive), or a ConfigError."""
    by_lower = {a.lower(): a for a in ARCHS}
    if name.lower() not in by_lower:
        raise ConfigError(
            f"model.arch '{name}' is not a 3D network of this pipeline; valid: {', '.join(ARCHS)}"
        )
    return by_lower[name.lower()]


def dynunet_plan(patch_size: Sequence[int], max_levels: int = 6) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net-style kernels and strides for a (D, H, W) patch: halve an axis while it stays >= 8.

    An axis much shorter than the others (the depth of a few slices) is not strided until the
    others have come down to its size, and gets a kernel of 1 while its voxels are far coarser.
    """
    sizes = [int(s) for s in patch_size]
    kernels, strides = [[3, 3, 3]], [[1, 1, 1]]
    for _ in range(max_levels - 1):
        largest = max(sizes)
        stride = [2 if s >= 8 and s * 2 > largest else 1 for s in sizes]
        if not any(s == 2 for s in stride):
            break
        sizes = [s // st for s, st in zip(sizes, stride)]
        strides.append(stride)
        kernels.append([3 if s * 2 > max(sizes) else 1 for s in sizes])
    return kernels, strides


def _defaults(arch: str, patch_size: Sequence[int]) -> dict[str, Any]:
    if arch == "SegResNet":  # the 1st place's member: init_filters 32 on GPUs
        return {"init_filters": 16, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout_prob": 0.2}
    if arch == "UNet":
        return {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}
    if arch == "DynUNet":
        kernels, strides = dynunet_plan(patch_size)
        return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:]}
    return {"feature_size": 24}  # SwinUNETR


def total_stride(arch: str, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """Per-axis (D, H, W) factor every input size must be a multiple of."""
    if arch == "SegResNet":
        f = 2 ** (len(kwargs["blocks_down"]) - 1)
        return (f, f, f)
    if arch == "UNet":
        f = math.prod(int(s) for s in kwargs["strides"])
        return (f, f, f)
    if arch == "DynUNet":
        strides = [[s] * 3 if isinstance(s, int) else list(s) for s in kwargs["strides"]]
        return tuple(math.prod(s[a] for s in strides) for a in range(3))
    return (32, 32, 32)  # SwinUNETR: patch 2 then four merges


def check_sizes(arch: str, kwargs: dict[str, Any], sizes: dict[str, Sequence[int]]) -> None:
    """Every (D, H, W) size in ``sizes`` (config key -> size) is a multiple of the network's stride."""
    stride = total_stride(arch, kwargs)
    for key, size in sizes.items():
        if any(int(s) % f for s, f in zip(size, stride)):
            raise ConfigError(
                f"config key '{key}' = {list(size)} must be a multiple of {list(stride)} per axis "
                f"(slices, H, W): the total stride of {arch} with these settings"
            )


def build_segmenter3d(
    model_cfg: ModelCfg,
    in_channels: int,
    classes: int,
    patch_size: Sequence[int],
    sizes: dict[str, Sequence[int]] | None = None,
    *,
    pretrained: bool = True,
) -> nn.Module:
    """A MONAI 3D network returning logits (B, classes, D, H, W) (see the module doc).

    ``patch_size`` sizes DynUNet's default plan; ``sizes`` (config key -> (D, H, W)) are checked
    against the network's stride. ``model.pretrained_path`` (a local file) loads the whole network
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
    kwargs = {**_defaults(arch, patch_size), **{k: v for k, v in model_cfg.kwargs.items() if v is not None}}
    check_sizes(arch, kwargs, sizes or {"seg3d.patch_size": patch_size})
    try:
        model = getattr(nets, arch)(spatial_dims=3, in_channels=in_channels, out_channels=classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build {arch} with model.kwargs {model_cfg.kwargs}: {exc}") from None
    if pretrained and model_cfg.pretrained_path:
        load_pretrained(model, model_cfg.pretrained_path, list(model.state_dict()), ("",), in_channels)
    return model
