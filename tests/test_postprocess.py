"""Post-processing on hand-computed volumes: thresholds, gates, z-continuity, 3D components, blend, decisions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipeline.infer.ensemble import blend_uint8, blend_uint8_numpy
from pipeline.infer.masks import (
    Components,
    gate_slices,
    prob_gate_keep,
    remove_small_components,
    threshold_probs,
    to_uint8,
    z_keep,
    z_range,
)
from pipeline.infer.postprocess import (
    ClassParams,
    Decisions,
    DecisionsError,
    OOFSummary,
    apply_class,
    apply_postprocess,
    read_decisions,
    write_decisions,
)
from pipeline.infer.steps import with_value
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
        oof=OOFSummary(days=3, metrics={"score": float("nan")}),
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
    assert back.oof == OOFSummary(days=3, metrics={"score": None})  # NaN is not JSON: written as null
    assert (back.dataset, back.volumetric) == ("uwmgi", True)
    assert back.params() == [decisions.classes[name] for name in ("large_bowel", "small_bowel", "stomach")]
    flat = Decisions(classes=decisions.classes, weights={}, members=[], dataset="lgg", volumetric=False)
    write_decisions(path, flat)
    assert (read_decisions("rt").dataset, read_decisions("rt").volumetric) == ("lgg", False)
    path.write_text('{"classes": {}}')
    with pytest.raises(DecisionsError, match="make tune"):
        read_decisions("rt")


# --------------------------------------------------------------------------- probability gate, z-continuity


def _slices_with(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)).tolist()


def test_probability_gate_counts_pixels_at_the_level() -> None:
    """1st place's rule: a slice keeps the class only if MORE than N pixels have p >= t (t = 0.6: level 153)."""
    probs = np.zeros((4, 5, 5), np.uint8)
    probs[0].flat[:13] = 153  # 13 > 12 pixels at the level: kept
    probs[1].flat[:12] = 200  # exactly 12: gated
    probs[2].flat[:20] = 152  # 20 pixels just under 0.6 (above the 0.5 pixel threshold): gated
    probs[3].flat[:25] = 140  # foreground at 0.5, none at 0.6: gated
    assert prob_gate_keep(probs, 12, 0.6).tolist() == [True, False, False, False]
    assert prob_gate_keep(probs, 11, 0.6).tolist() == [True, True, False, False]
    assert prob_gate_keep(probs, 12, 0.59).tolist() == [True, False, True, False]  # level round(150.45) = 150
    assert prob_gate_keep(probs, 0, 0.6) is None  # N = 0: off
    base = ClassParams(0.5, 0.0, 0)
    assert _slices_with(apply_class(probs, None, base)) == [0, 1, 2, 3]
    gated = apply_class(probs, None, with_value(base, "prob_gate", (12, 0.6)))
    assert _slices_with(gated) == [0] and gated[0].sum() == 13  # the kept slice keeps its whole 0.5 mask
    assert with_value(base, "prob_gate", (0, 0.7)) == base  # off is one state whatever t


def test_z_range_by_runs_of_k_slices() -> None:
    positive = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1], bool)
    assert z_range(positive, 1) == (1, 8)  # k = 1: first and last positive slice, nothing removed
    assert z_range(positive, 2) == (1, 6)  # first run of 2 starts at 1, last run of 2 ends at 6
    assert z_range(positive, 3) == (4, 6)
    assert z_range(positive, 4) is None
    assert z_range(np.zeros(5, bool), 2) is None
    assert z_range(np.ones(3, bool), 3) == (0, 2)


def test_z_continuity_empties_outside_the_range_and_everything_without_a_run() -> None:
    mask = np.zeros((9, 3, 3), bool)
    for s in (1, 2, 4, 5, 6, 8):
        mask[s, 1, 1] = True
    assert z_keep(mask, 0) is None and z_keep(mask, 1) is None  # off
    assert np.flatnonzero(z_keep(mask, 2)).tolist() == [1, 2, 3, 4, 5, 6]  # the gap at 3 stays inside
    probs = np.where(mask, 255, 0).astype(np.uint8)
    assert _slices_with(apply_class(probs, None, ClassParams(0.5, 0.0, 0, z_run=2))) == [1, 2, 4, 5, 6]
    assert _slices_with(apply_class(probs, None, ClassParams(0.5, 0.0, 0, z_run=3))) == [4, 5, 6]
    assert not apply_class(probs, None, ClassParams(0.5, 0.0, 0, z_run=4)).any()  # no run of 4: class emptied
    with pytest.raises(ValueError, match="z_runs"):
        apply_class(probs, None, ClassParams(0.5, 0.0, 0, z_run=2), volumetric=False)


def test_stages_run_in_order_gates_then_z_continuity_then_components() -> None:
    """Slices 0-3 hold the class; the classifier gates slice 1, so the runs are [0] and [2, 3]: with
    k = 2 z-continuity keeps 2-3; the 1-voxel component on slice 3 then goes with min size 2."""
    probs = np.zeros((5, 6, 6), np.uint8)
    probs[0:4, 1:3, 1:3] = 200
    probs[3, 5, 5] = 200
    probs[4, 0, 0] = 130  # one pixel over 0.5, none at 0.6: the probability gate (N = 1, t = 0.6) drops it
    gate = np.array([0.9, 0.1, 0.9, 0.9, 0.9])
    params = ClassParams(0.5, 0.5, 2, prob_gate_pixels=1, prob_gate_level=0.6, z_run=2)
    out = apply_class(probs, gate, params)
    assert _slices_with(out) == [2, 3] and out.sum() == 8 and not out[3, 5, 5]
    no_z = apply_class(probs, gate, ClassParams(0.5, 0.5, 2, prob_gate_pixels=1, prob_gate_level=0.6))
    assert _slices_with(no_z) == [0, 2, 3]  # without z-continuity slice 0 stays (4 voxels >= 2)
    no_gate = apply_class(probs, None, params)
    assert _slices_with(no_gate) == [0, 1, 2, 3]  # one run 0-3; slice 4 falls to the probability gate


def test_per_class_blend_twin_and_one_hot_rows() -> None:
    rng = np.random.default_rng(1)
    probs = [rng.integers(0, 256, (4, 3, 9, 11), dtype=np.uint8) for _ in range(3)]
    matrices = (
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0.5, 0.5, 0], [0.2, 0.2, 0.6], [0, 0.3, 0.7]],
        [[0, 0, 0], [1, 1, 0], [0, 2, 2]],  # an all-zero class gives zeros; rows need not sum to 1
    )
    for w in matrices:
        fast, twin = blend_uint8(probs, w), blend_uint8_numpy(probs, w)
        assert fast.dtype == np.uint8 and np.array_equal(fast, twin)
        for c, row in enumerate(np.asarray(w, float)):  # each class is the 1D blend of that class
            if row.sum() == 0:
                assert not fast[:, c].any()
            else:
                assert np.array_equal(fast[:, c], blend_uint8_numpy([p[:, c] for p in probs], row))
    one_hot = blend_uint8(probs, matrices[0])
    assert all(np.array_equal(one_hot[:, c], probs[c][:, c]) for c in range(3))
    same_rows = blend_uint8(probs, [[0.7, 0.2, 0.1]] * 3)
    assert np.array_equal(same_rows, blend_uint8(probs, [0.7, 0.2, 0.1]))  # a repeated row = one vector
    with pytest.raises(ValueError, match="blend weights"):
        blend_uint8(probs, [[1, 0, 0]] * 2)


def test_format_1_decisions_still_read_and_bad_weights_say_rerun(isolated_dirs: Path) -> None:
    path = run_dir("ensemble", "old") / "postprocess.json"
    path.parent.mkdir(parents=True)
    old = {
        "version": 1,
        "classes": {"tumour": {"pixel_threshold": 0.4, "gate_threshold": 0.0, "min_component_size": 50}},
        "weights": {"a": 0.7, "b": 0.3},
        "members": [{"config": "a", "folds": [0]}, {"config": "b", "folds": [0]}],
    }
    path.write_text(json.dumps(old))
    back = read_decisions("old")
    assert back.weights == {"tumour": {"a": 0.7, "b": 0.3}}
    assert back.classes["tumour"] == ClassParams(
        0.4, 0.0, 50, prob_gate_pixels=0, prob_gate_level=0.0, z_run=0
    )
    assert back.weight_matrix(["b", "a"]).tolist() == [[0.3, 0.7]]
    path.write_text(json.dumps({**old, "weights": {"tumor": {"a": 1.0}}}))  # not a class of the file
    with pytest.raises(DecisionsError, match="make tune"):
        read_decisions("old")
    path.write_text(json.dumps({**old, "version": 99}))
    with pytest.raises(DecisionsError, match="make tune"):
        read_decisions("old")


def test_used_members_skip_members_without_weight_in_any_class() -> None:
    decisions = Decisions(
        classes={"x": ClassParams(0.5, 0.0, 0), "y": ClassParams(0.5, 0.0, 0)},
        weights={"x": {"a": 1.0, "b": 0.0, "c": 0.0}, "y": {"a": 0.0, "b": 1.0, "c": 0.0}},
        members=[{"config": n, "folds": [0]} for n in ("a", "b", "c")],
    )
    assert decisions.used_members() == ["a", "b"]
    assert decisions.weight_matrix().tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
