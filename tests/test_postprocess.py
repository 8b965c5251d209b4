"""Post-processing on known volumes: thresholds, gate, 3D components, blend, decisions file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline.infer.ensemble import blend_uint8, blend_uint8_numpy
from pipeline.infer.postprocess import (
    ClassParams,
    Components,
    Decisions,
    DecisionsError,
    apply_postprocess,
    gate_slices,
    read_decisions,
    remove_small_components,
    threshold_probs,
    to_uint8,
    write_decisions,
)
from pipeline.paths import run_dir


def test_small_3d_components_removed_large_kept() -> None:
    mask = np.zeros((3, 8, 8), bool)
    mask[0:2, 1:3, 1:3] = True  # 8 voxels across two slices: one 3D component
    mask[2, 6, 6] = True  # 1 voxel
    mask[0, 6, 0] = mask[1, 7, 1] = True  # 2 voxels touching diagonally across slices (26-connected)
    out = remove_small_components(mask, 3)
    assert out[0:2, 1:3, 1:3].all() and out.sum() == 8
    assert remove_small_components(mask, 2).sum() == 10
    assert remove_small_components(mask, 0).sum() == mask.sum()
    # per image (a 2D dataset): the 8-voxel block is two 4-pixel components, the diagonal pair two singles
    flat = remove_small_components(mask, 3, volumetric=False)
    assert flat[0:2, 1:3, 1:3].all() and flat.sum() == 8
    assert remove_small_components(mask, 5, volumetric=False).sum() == 0
    assert remove_small_components(mask, 2, volumetric=False).sum() == 8


def test_gate_empties_exactly_the_gated_slices() -> None:
    mask = np.ones((4, 2, 2), bool)
    gate_slices(mask, np.array([0.9, 0.1, 0.5, 0.49]), 0.5)
    assert mask.any(axis=(1, 2)).tolist() == [True, False, True, False]
    untouched = np.ones((2, 2, 2), bool)
    assert gate_slices(untouched, None, 0.5).all() and gate_slices(untouched, np.zeros(2), 0.0).all()


def test_thresholds_on_uint8_probabilities() -> None:
    probs = np.array([[[0, 127, 128, 255]]], np.uint8)
    assert threshold_probs(probs, 0.5).tolist() == [[[False, False, True, True]]]
    params = [ClassParams(0.5, 0.0, 0), ClassParams(0.99, 0.0, 0), ClassParams(0.0, 0.7, 0)]
    out = apply_postprocess(np.stack([probs] * 3, axis=1), np.array([[1.0, 1.0, 0.2]]), params)
    assert out[0, 0].sum() == 2 and out[0, 1].sum() == 1 and not out[0, 2].any()


@pytest.mark.parametrize("seed", range(4))
def test_components_in_the_foreground_box_match_whole_volume_labelling(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((9, 40, 50), bool)
    mask[2:7, 5:30, 10:45] = rng.random((5, 25, 35)) < 0.25  # many small touching components
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())
    components = Components.of(mask)
    assert sorted(components.sizes[1:]) == sorted(sizes[1:])
    for min_size in (1, 2, 5, 20, 10_000):
        brute = np.isin(labels, np.flatnonzero(sizes >= min_size)) & mask
        assert np.array_equal(components.keep(min_size), brute)
        assert np.array_equal(remove_small_components(mask, min_size), brute if min_size > 1 else mask)
    assert not Components.of(np.zeros((2, 3, 4), bool)).keep(1).any()


def test_probabilities_round_trip_through_uint8_thresholds() -> None:
    p = np.linspace(0, 1, 1001, dtype=np.float32)
    q = to_uint8(p)
    assert q.dtype == np.uint8 and q[0] == 0 and q[-1] == 255
    assert np.abs(q / 255.0 - p).max() <= 0.5 / 255 + 1e-6
    for t in (0.1, 0.5, 0.73):
        assert np.array_equal(threshold_probs(q, t), q >= round(t * 255))


def test_numba_blend_equals_numpy_twin() -> None:
    rng = np.random.default_rng(0)
    probs = [rng.integers(0, 256, (5, 3, 17, 23), dtype=np.uint8) for _ in range(3)]
    for weights in ([1, 1, 1], [0.7, 0.2, 0.1], [0.0, 0.4, 0.6], [0, 1, 0]):
        fast, twin = blend_uint8(probs, weights), blend_uint8_numpy(probs, weights)
        assert fast.dtype == np.uint8 and np.array_equal(fast, twin)
    assert np.array_equal(blend_uint8(probs, [0, 1, 0]), probs[1])
    same = blend_uint8([probs[0], probs[0]], [0.3, 0.7])
    assert np.abs(same.astype(int) - probs[0]).max() == 0  # a mean of equal arrays is that array


def test_decisions_json_round_trip(isolated_dirs: Path) -> None:
    decisions = Decisions(
        classes={
            "large_bowel": ClassParams(0.45, 0.3, 100),
            "small_bowel": ClassParams(0.5, 0.0, 0),
            "stomach": ClassParams(0.35, 0.7, 25),
        },
        weights={"a": 0.6, "b": 0.4},
        members=[{"config": "a", "folds": [0, 1]}, {"config": "b", "folds": [0, 1]}],
        classifier={"config": "c", "folds": [0, 1]},
        ensemble="rt",
        steps=[{"step": "raw", "score": 0.8, "gain": None}],
        curves={"pixel_threshold": {"stomach": {"values": [0.3], "score": [0.81], "chosen": 0.3}}},
        oof={"days": 3, "score": float("nan")},
        dataset="uwmgi",
        volumetric=True,
    )
    path = write_decisions(run_dir("ensemble", "rt") / "postprocess.json", decisions)
    back = read_decisions("rt")
    assert back.classes == decisions.classes and isinstance(back.classes["stomach"].min_component_size, int)
    assert (back.weights, back.members, back.classifier) == (
        decisions.weights,
        decisions.members,
        decisions.classifier,
    )
    assert back.curves == decisions.curves and back.steps == decisions.steps
    assert back.oof == {"days": 3, "score": None}  # NaN is not JSON: written as null
    assert (back.dataset, back.volumetric) == ("uwmgi", True)
    assert back.params() == [decisions.classes[name] for name in ("large_bowel", "small_bowel", "stomach")]
    flat = Decisions(classes=decisions.classes, weights={}, members=[], dataset="lgg", volumetric=False)
    write_decisions(path, flat)
    assert (read_decisions("rt").dataset, read_decisions("rt").volumetric) == ("lgg", False)
    path.write_text('{"classes": {}}')
    with pytest.raises(DecisionsError, match="make tune"):
        read_decisions("rt")
