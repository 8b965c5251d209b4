"""Augmentations from config specs, with every argument checked (albumentations 2.x).

A spec is ``{name: <albumentations class>, params: {...}}``; ``OneOf`` / ``SomeOf`` /
``Sequential`` take ``params.transforms``: a list of nested specs. Albumentations 2.x drops an
argument it does not know with only a warning (``var_limit``, ``max_holes``, ``always_apply``
from 1.x configs silently stop doing anything), so :func:`build_augment` rejects any argument
missing from the transform's signature, naming the transform and the argument, and builds
with ``strict=True`` as a second guard.

The 2.5D stack goes through as one multi-channel HWC float32 image and the masks as one HWC
``mask``, so every channel and the masks see the same geometric transform.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import numpy as np

from pipeline.config import AugSpec
from pipeline.errors import PipelineError

COMPOSITES = ("OneOf", "SomeOf", "Sequential")
RESERVED = ("strict", "always_apply")  # set by us / removed in albumentations 2.x


class AugmentError(PipelineError, ValueError):
    """An augmentation spec names an unknown transform or an argument it does not accept."""


def transform_names() -> list[str]:
    """Every albumentations transform class (pixel-level and spatial)."""
    names = []
    for name in dir(A):
        obj = getattr(A, name)
        if inspect.isclass(obj) and issubclass(obj, A.BasicTransform) and not name.startswith("_"):
            names.append(name)
    return sorted(names)


def _transform_class(name: str, where: str) -> type:
    obj = getattr(A, name, None)
    valid = inspect.isclass(obj) and (issubclass(obj, A.BasicTransform) or name in COMPOSITES)
    if not valid or not isinstance(obj, type):
        close = difflib.get_close_matches(name, [*transform_names(), *COMPOSITES], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else " (no close match)"
        raise AugmentError(f"{where}: unknown albumentations transform '{name}'{hint}")
    return obj


def accepted_args(cls: type) -> list[str]:
    """Constructor arguments a transform accepts (its ``__init__`` signature)."""
    params = inspect.signature(cls).parameters  # the constructor's, without self
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _as_spec(item: Any, where: str) -> AugSpec:
    if isinstance(item, AugSpec):
        return item
    if isinstance(item, Mapping) and set(item) <= {"name", "params"} and "name" in item:
        return AugSpec(name=str(item["name"]), params=dict(item.get("params") or {}))
    raise AugmentError(f"{where}: expected {{name: ..., params: {{...}}}}, got {item!r}")


def build_transform(spec: AugSpec | Mapping[str, Any], where: str = "augment") -> A.BasicTransform:
    """One transform (or composite) from its spec; every argument must be one it accepts."""
    spec = _as_spec(spec, where)
    where = f"{where} '{spec.name}'"
    cls = _transform_class(spec.name, where)
    params = dict(spec.params)
    valid = accepted_args(cls)
    for key in params:
        if key in RESERVED or key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise AugmentError(
                f"{where}: argument '{key}' is not accepted by albumentations {A.__version__} "
                f"{spec.name}{hint} (accepted: {', '.join(valid)})"
            )
    if spec.name in COMPOSITES:
        children = params.get("transforms")
        if not isinstance(children, Sequence) or isinstance(children, str) or not children:
            raise AugmentError(f"{where}: needs params.transforms, a non-empty list of {{name, params}}")
        params["transforms"] = [
            build_transform(_as_spec(c, f"{where}[{i}]"), f"{where}[{i}]") for i, c in enumerate(children)
        ]
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise AugmentError(f"{where}: {exc}") from None
    try:
        return cls(**params, strict=True)
    except (TypeError, ValueError) as exc:  # pydantic ValidationError is a ValueError
        raise AugmentError(f"{where}: invalid arguments {params}: {exc}") from None


def build_augment(specs: Sequence[AugSpec | Mapping[str, Any]]) -> A.Compose | None:
    """An ``A.Compose`` of the specs in order; None when there are none."""
    if not specs:
        return None
    transforms = [build_transform(spec, f"augment[{i}]") for i, spec in enumerate(specs)]
    return A.Compose(transforms, p=1.0, strict=True)


def _walk(transform: Any) -> list[Any]:
    out = [transform]
    for child in getattr(transform, "transforms", []) or []:
        out += _walk(child)
    return out


def seed_augment(compose: A.Compose, seed: int | Sequence[int]) -> None:
    """Give the compose and each transform in it its own stream derived from ``seed``.

    (``Compose.set_random_seed`` hands every transform the same seed, which makes e.g. a
    horizontal and a vertical flip of equal ``p`` fire together.)
    """
    nodes = _walk(compose)
    children = np.random.SeedSequence(seed).spawn(len(nodes))
    for node, child in zip(nodes, children):
        value = int(child.generate_state(1)[0])
        node.seed = value
        node.random_generator = np.random.default_rng(value)
        node.py_random.seed(value)


def apply_augment(
    compose: A.Compose, image: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augment a (C, H, W) float32 stack and its optional (3, H, W) masks together."""
    data = {"image": np.ascontiguousarray(image.transpose(1, 2, 0))}
    if mask is not None:
        data["mask"] = np.ascontiguousarray(mask.transpose(1, 2, 0))
    out = compose(**data)
    new_image = np.ascontiguousarray(np.asarray(out["image"], dtype=np.float32).transpose(2, 0, 1))
    new_mask = None if mask is None else np.ascontiguousarray(np.asarray(out["mask"]).transpose(2, 0, 1))
    return new_image, new_mask
