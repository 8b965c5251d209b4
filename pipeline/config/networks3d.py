"""The MONAI networks a 3D member may name, their default arguments and their total stride.

Plain Python (MONAI is not imported): the config loader refuses an unknown ``model.arch`` and a
``seg3d.patch_size`` / ``roi_size`` the network cannot take when the config is loaded, and
:mod:`pipeline.models.segmenter3d` builds the network from the same arguments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config.schema import ConfigError

ARCHS_3D = ("SegResNet", "UNet", "DynUNet", "SwinUNETR")  # MONAI networks of the 3D member


def arch3d(name: str) -> str:
    """The canonical MONAI network name for ``name`` (case-insensitive), or a ConfigError."""
    by_lower = {a.lower(): a for a in ARCHS_3D}
    if name.lower() not in by_lower:
        raise ConfigError(
            f"model.arch '{name}' is not a 3D network of this pipeline (model.spatial_dims: 3); "
            f"valid: {', '.join(ARCHS_3D)}"
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


def network_kwargs(arch: str, patch_size: Sequence[int], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``arch``: its defaults (DynUNet's planned from the training patch)
    under ``model.kwargs`` (a None value keeps the default)."""
    return {**_defaults(arch, patch_size), **{k: v for k, v in kwargs.items() if v is not None}}


def total_stride(arch: str, kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    """Per-axis (D, H, W) factor every input size must be a multiple of."""
    if arch == "SegResNet":
        f = 2 ** (len(kwargs["blocks_down"]) - 1)
        return (f, f, f)
    if arch == "UNet":
        f = math.prod(int(s) for s in kwargs["strides"])
        return (f, f, f)
    if arch == "DynUNet":
        strides = [[s] * 3 if isinstance(s, int) else list(s) for s in kwargs["strides"]]
        depth, height, width = (math.prod(int(s[a]) for s in strides) for a in range(3))
        return (depth, height, width)
    return (32, 32, 32)  # SwinUNETR: patch 2 then four merges


def size_problems(
    arch: str, kwargs: Mapping[str, Any], sizes: Mapping[str, Sequence[int]]
) -> list[tuple[str, str]]:
    """(config key, problem) of every (D, H, W) size in ``sizes`` that is not a multiple of the stride."""
    stride = total_stride(arch, kwargs)
    return [
        (
            key,
            f"= {list(size)} must be a multiple of {list(stride)} per axis (slices, H, W): the total "
            f"stride of {arch} with these settings",
        )
        for key, size in sizes.items()
        if any(int(s) % f for s, f in zip(size, stride))
    ]


def check_sizes(arch: str, kwargs: Mapping[str, Any], sizes: Mapping[str, Sequence[int]]) -> None:
    """Every (D, H, W) size in ``sizes`` (config key -> size) is a multiple of the network's stride."""
    for key, problem in size_problems(arch, kwargs, sizes):
        raise ConfigError(f"config key '{key}' {problem}")
