"""Augmentations: every configured argument reaches its transform, 1.x arguments fail loudly,
and the channels of a 2.5D stack move together with the masks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pytest

from pipeline.config import AugSpec, load_config
from pipeline.data.augment import AugmentError, apply_augment, build_augment, build_transform, seed_augment

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_specs(spatial_dims: int = 2) -> list[tuple[str, AugSpec]]:
    """The augment items of every shipped config of 2D members (albumentations) or 3D ones (MONAI)."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        model = getattr(cfg, "model", None)
        if getattr(model, "spatial_dims", 2) != spatial_dims:
            continue
        for i, spec in enumerate(getattr(cfg, "augment", ())):
            out.append((f"{path.stem}[{i}]", spec))
    return out


def same(given: Any, stored: Any) -> bool:
    """``stored`` (as albumentations keeps it) holds exactly ``given`` (as the config wrote it)."""
    if isinstance(stored, Mapping) and not isinstance(given, Mapping) and set(stored) == {"x", "y"}:
        return same(given, stored["x"]) and same(given, stored["y"])  # Affine keeps scale per axis
    if isinstance(given, (list, tuple)) and isinstance(stored, (list, tuple)):
        return len(given) == len(stored) and all(same(g, s) for g, s in zip(given, stored))
    if isinstance(given, (int, float)) and not isinstance(given, bool) and isinstance(stored, (int, float)):
        return float(given) == float(stored)
    return given == stored


def check_transform(spec: AugSpec | Mapping, transform: Any) -> None:
    spec = spec if isinstance(spec, AugSpec) else AugSpec(**spec)
    assert type(transform).__name__ == spec.name
    if spec.name in ("OneOf", "SomeOf", "Sequential"):
        children = spec.params["transforms"]
        assert len(transform.transforms) == len(children)
        for child_spec, child in zip(children, transform.transforms):
            check_transform(child_spec, child)
        assert transform.p == spec.params.get("p", transform.p)
        return
    stored = transform.get_transform_init_args() | {"p": transform.p}
    for key, value in spec.params.items():
        assert key in stored, f"{spec.name}: '{key}' was not kept"
        assert same(value, stored[key]), f"{spec.name}.{key}: gave {value!r}, transform holds {stored[key]!r}"


def test_configs_have_augmentations() -> None:
    names = {spec.name for _, spec in config_specs()}
    assert {
        "HorizontalFlip",
        "Affine",
        "RandomBrightnessContrast",
        "GaussNoise",
        "CoarseDropout",
        "OneOf",
    } <= names


@pytest.mark.parametrize(("where", "spec"), config_specs(), ids=[w for w, _ in config_specs()])
def test_config_transforms_receive_exactly_their_arguments(where: str, spec: AugSpec) -> None:
    check_transform(spec, build_transform(spec, where))


@pytest.mark.parametrize(("where", "spec"), config_specs(3), ids=[w for w, _ in config_specs(3)])
def test_3d_config_transforms_are_monai_dictionary_transforms_with_their_arguments(
    where: str, spec: AugSpec
) -> None:
    from pipeline.data.volume3d import build_augment3d

    (transform,) = build_augment3d([spec]).transforms
    assert type(transform).__name__ == spec.name
    if "prob" in spec.params:
        assert transform.prob == spec.params["prob"]
    assert tuple(transform.keys) == (
        ("image",) if ".intensity." in type(transform).__module__ else ("image", "label")
    )


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("GaussNoise", {"var_limit": [10.0, 50.0]}, "var_limit"),
        ("HorizontalFlip", {"always_apply": True}, "always_apply"),
        ("ElasticTransform", {"alpha": 1.0, "alpha_affine": 10.0}, "alpha_affine"),
        ("CoarseDropout", {"max_holes": 8, "max_height": 8}, "max_holes"),
        ("Affine", {"rotate": [-5, 5], "strict": False}, "strict"),
    ],
)
def test_deprecated_or_unknown_arguments_are_rejected(name: str, params: dict, bad: str) -> None:
    with pytest.raises(AugmentError, match=rf"{name}.*'{bad}'"):
        build_augment([AugSpec(name, params)])


def test_unknown_transform_lists_close_matches() -> None:
    with pytest.raises(AugmentError, match="HorizontalFlip"):
        build_augment([AugSpec("HorizontalFlipp", {})])
    with pytest.raises(AugmentError, match=r"unknown albumentations transform 'Blurr'.*Blur"):
        build_augment([AugSpec("Blurr", {})])


def test_bad_values_and_nested_specs_fail_naming_the_transform() -> None:
    with pytest.raises(AugmentError, match="RandomBrightnessContrast"):
        build_augment([AugSpec("RandomBrightnessContrast", {"p": 2.0})])
    nested = {"p": 0.5, "transforms": [{"name": "GridDistortion", "params": {"num_step": 5}}]}
    with pytest.raises(AugmentError, match=r"OneOf.*GridDistortion.*'num_step'.*did you mean 'num_steps'"):
        build_augment([AugSpec("OneOf", nested)])
    assert build_augment([]) is None


def stack_and_masks(size: int = 64, channels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Masks (3, H, W) of three blobs and a stack whose channel c is mask[c % 3] * 0.25 * (c + 1)."""
    masks = np.zeros((3, size, size), np.uint8)
    for c, (cy, cx, r) in enumerate([(20, 22, 9), (40, 44, 12), (30, 14, 6)]):
        cv2.circle(masks[c], (cx, cy), r, 1, -1)
    image = np.stack([masks[c % 3] * 0.25 * (c + 1) for c in range(channels)]).astype(np.float32)
    return image, masks


GEOMETRIC_NEAREST = [
    AugSpec("HorizontalFlip", {"p": 1.0}),
    AugSpec("VerticalFlip", {"p": 1.0}),
    AugSpec(
        "Affine",
        {
            "scale": [0.8, 1.2],
            "rotate": [-30, 30],
            "translate_percent": [-0.1, 0.1],
            "interpolation": 0,
            "p": 1.0,
        },
    ),
    AugSpec("ElasticTransform", {"alpha": 40.0, "sigma": 5.0, "interpolation": 0, "p": 1.0}),
    AugSpec("GridDistortion", {"num_steps": 5, "distort_limit": [-0.3, 0.3], "interpolation": 0, "p": 1.0}),
]


@pytest.mark.parametrize("spec", GEOMETRIC_NEAREST, ids=lambda s: s.name)
def test_channels_and_masks_move_together(spec: AugSpec) -> None:
    image, masks = stack_and_masks()
    compose = build_augment([spec])
    for seed in range(3):
        seed_augment(compose, seed)
        out_image, out_masks = apply_augment(compose, image, masks)
        assert out_image.shape == image.shape and out_masks.shape == masks.shape
        assert out_masks.dtype == np.uint8 and out_masks.any()
        for c in range(image.shape[0]):
            np.testing.assert_array_equal(out_image[c], out_masks[c % 3] * np.float32(0.25 * (c + 1)))


def test_linear_interpolation_keeps_channels_identical_and_close_to_masks() -> None:
    image, masks = stack_and_masks()
    compose = build_augment([AugSpec("Affine", {"rotate": [20, 20], "scale": [1.1, 1.1], "p": 1.0})])
    seed_augment(compose, 0)
    out_image, out_masks = apply_augment(compose, image, masks)
    np.testing.assert_array_equal(out_image[3] / 4, out_image[0])  # same warp for every channel
    for c in range(3):
        soft = out_image[c] / (0.25 * (c + 1)) > 0.5
        assert (soft == out_masks[c].astype(bool)).mean() > 0.98
    assert not np.array_equal(out_masks, masks)


def test_seeded_augmentation_is_reproducible_and_transforms_draw_independently() -> None:
    image, masks = stack_and_masks()
    compose = build_augment([AugSpec("HorizontalFlip", {"p": 0.5}), AugSpec("VerticalFlip", {"p": 0.5})])
    seen = set()
    for seed in range(40):
        seed_augment(compose, [7, seed])
        first, _ = apply_augment(compose, image, masks)
        seed_augment(compose, [7, seed])
        again, _ = apply_augment(compose, image, masks)
        np.testing.assert_array_equal(first, again)
        h = bool((first[0] == image[0][:, ::-1]).all() or (first[0] == image[0][::-1, ::-1]).all())
        v = bool((first[0] == image[0][::-1]).all() or (first[0] == image[0][::-1, ::-1]).all())
        seen.add((h, v))
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_pixel_transforms_accept_a_float_stack() -> None:
    image, masks = stack_and_masks()
    specs = [
        s for _, s in config_specs() if s.name in ("RandomBrightnessContrast", "GaussNoise", "CoarseDropout")
    ]
    compose = build_augment([AugSpec(s.name, {**s.params, "p": 1.0}) for s in specs])
    assert isinstance(compose, A.Compose)
    seed_augment(compose, 1)
    out_image, out_masks = apply_augment(compose, image, masks)
    assert out_image.dtype == np.float32 and out_image.shape == image.shape
    np.testing.assert_array_equal(out_masks, masks)  # pixel-level: masks untouched
    assert not np.array_equal(out_image, image)
