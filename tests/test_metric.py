"""The competition metric: fast path == brute force, hand-computed cases, validation, the score CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layout import write_dataset
from scipy import ndimage as ndi
from scipy.spatial.distance import directed_hausdorff

from pipeline.datasets.uwmgi_files import CLASSES
from pipeline.datasets.uwmgi_metric import (
    aggregate,
    dice_pair,
    hausdorff_volume,
    hausdorff_volume_edt,
    score_volumes,
    volume_stats,
)
from pipeline.datasets.uwmgi_metric_runs import class_runs, dice_runs, line_runs, union_runs
from pipeline.datasets.uwmgi_submission import score_submission, slice_shapes, validate_submission
from pipeline.errors import DataError, SubmissionError
from pipeline.rle import rle_encode
from stages import score as score_stage
from stages._cli import run_cli
from stages.bench_metric import synthetic_pair

ROOT = Path(__file__).resolve().parents[1]


def brute_hausdorff(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """The definition, literally: directed_hausdorff both ways on every voxel scaled to the unit cube."""
    if not pred.any() and not truth.any():
        return None
    if not pred.any() or not truth.any():
        return 1.0
    scale = np.asarray(pred.shape, float)
    p, t = np.argwhere(pred) / scale, np.argwhere(truth) / scale
    return max(directed_hausdorff(p, t)[0], directed_hausdorff(t, p)[0]) / math.sqrt(3.0)


def random_pairs(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(int(v) for v in rng.integers(1, 13, 3))
        p = rng.random(shape) < rng.choice([0.003, 0.03, 0.2, 0.6, 0.97])
        t = rng.random(shape) < rng.choice([0.003, 0.03, 0.2, 0.6])
        yield p, t


def structured_pairs(seed: int, n: int):
    """Smooth blobs on anisotropic grids and their eroded, dilated, holed and moved versions."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (int(rng.integers(4, 24)), int(rng.integers(16, 48)), int(rng.integers(16, 48)))
        field = ndi.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.0, 3.0))
        p = field > 0.3 * field.std()
        kind = i % 4
        if kind == 0:
            t = ndi.binary_erosion(p, iterations=2)  # t inside p: far points deep in p
        elif kind == 1:
            t = ndi.binary_dilation(p, iterations=2) & (rng.random(shape) < 0.95)  # a noisy shell
        elif kind == 2:
            t = np.roll(p, (1, 3, -2), axis=(0, 1, 2))
            t[rng.integers(shape[0])] = False  # a missing slice
        else:
            t = np.zeros_like(p)
            t[0, 0, 0] = t[-1, -1, -1] = True  # two far corners
        yield p, t


@pytest.mark.parametrize("make", [random_pairs, structured_pairs])
def test_fast_and_edt_equal_brute_force(make) -> None:
    for p, t in make(seed=7, n=80 if make is random_pairs else 24):
        expected = brute_hausdorff(p, t)
        for fn in (hausdorff_volume, hausdorff_volume_edt):
            for a, b in ((p, t), (t, p)):
                got = fn(a, b)
                if expected is None:
                    assert got is None
                else:
                    assert got == pytest.approx(expected, abs=1e-9), (fn.__name__, p.shape)


def test_a_large_volume_with_far_points_equals_brute_force() -> None:
    """Enough outside voxels for the raster pass (past the first spread sample) to do the work."""
    rng = np.random.default_rng(3)
    shape = (30, 60, 50)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    t = ((z - 12) / 8) ** 2 + ((y - 30) / 15) ** 2 + ((x - 20) / 10) ** 2 <= 1
    p = ((z - 14) / 9) ** 2 + ((y - 28) / 14) ** 2 + ((x - 22) / 12) ** 2 <= 1  # overlaps, shifted
    p |= ((z - 25) / 3) ** 2 + ((y - 50) / 6) ** 2 + ((x - 42) / 5) ** 2 <= 1  # a far false positive
    t &= rng.random(shape) < 0.98  # a few holes
    assert (p & ~t).sum() > 2000 and (t & ~p).sum() > 300
    assert hausdorff_volume(p, t) == pytest.approx(brute_hausdorff(p, t), abs=1e-9)
    assert hausdorff_volume(t, p) == pytest.approx(brute_hausdorff(p, t), abs=1e-9)


def _agrees_with_brute_force(p: np.ndarray, t: np.ndarray) -> None:
    """The fast path equals brute force both ways round (and so does the EDT twin)."""
    expected = brute_hausdorff(p, t)
    for a, b in ((p, t), (t, p)):
        for fn in (hausdorff_volume, hausdorff_volume_edt):
            got = fn(a, b)
            if expected is None:
                assert got is None, (fn.__name__, p.shape)
            else:
                assert got == pytest.approx(expected, abs=1e-9), (fn.__name__, p.shape)


def edge_pairs():
    """Empty sets, single voxels, whole volumes, thin and anisotropic grids."""
    for shape in ((1, 1, 1), (1, 1, 9), (9, 1, 1), (1, 7, 1), (2, 41, 3), (5, 3, 70), (3, 2, 17)):
        empty, full = np.zeros(shape, bool), np.ones(shape, bool)
        one, far = empty.copy(), empty.copy()
        one[0, 0, 0] = True
        far[-1, -1, -1] = True
        yield empty, empty  # both empty: skipped (None)
        yield one, empty  # one empty: 1
        yield full, empty
        yield one, one
        yield one, far  # a single voxel each: the corner to corner distance (0 on a 1x1x1 grid)
        yield one, full
        yield far, full
        yield full, full
        mid = empty.copy()
        mid[shape[0] // 2, shape[1] // 2, shape[2] // 2] = True
        yield mid, one | far


@pytest.mark.parametrize("make", [edge_pairs])
def test_edge_cases_equal_brute_force(make) -> None:
    for p, t in make():
        _agrees_with_brute_force(p, t)


def test_out_of_fold_like_volumes_equal_brute_force() -> None:
    """The bench's synthetic organs (moved, grown, missed, false positives) on small grids."""
    rng = np.random.default_rng(21)
    for i in range(12):
        shape = (int(rng.integers(8, 30)), int(rng.integers(24, 70)), int(rng.integers(24, 70)))
        pred, truth = synthetic_pair(rng, shape, scale=float(rng.uniform(0.6, 1.4)), close=i % 3 == 0)
        _agrees_with_brute_force(pred.any(axis=1), truth.any(axis=1))
        c = i % 3
        _agrees_with_brute_force(pred[:, c], truth[:, c])


def test_far_voxels_inside_a_shell_and_far_false_positives_equal_brute_force() -> None:
    """The farthest voxel need not lie on a set's boundary: a ball in a hollow shell peaks at its
    centre; small far blobs are what the sample must not miss."""
    z, y, x = np.ogrid[:15, :31, :29]
    r2 = ((z - 7) / 7) ** 2 + ((y - 15) / 15) ** 2 + ((x - 14) / 14) ** 2
    shell, ball = (r2 <= 1) & (r2 > 0.8), r2 <= 0.5
    assert hausdorff_volume(ball, shell) == pytest.approx(brute_hausdorff(ball, shell), abs=1e-9)
    rng = np.random.default_rng(4)
    for _ in range(10):
        p, t = ball.copy(), ball.copy()
        t &= rng.random(t.shape) < 0.9  # holes: many short runs of P outside T
        for _ in range(int(rng.integers(1, 4))):  # small false positives anywhere
            cz, cy, cx = (int(rng.integers(n)) for n in p.shape)
            p[cz, max(0, cy - 1) : cy + 1, max(0, cx - 2) : cx + 2] = True
        _agrees_with_brute_force(p, t)


def test_noise_needing_thousands_of_searches_equals_brute_force() -> None:
    """Salt-and-pepper sets: every voxel is near the other set and few bounds settle it, so the
    searches number in the thousands and the ring of witnesses wraps round."""
    rng = np.random.default_rng(8)
    for density in (0.3, 0.6):
        p, t = rng.random((20, 40, 40)) < density, rng.random((20, 40, 40)) < density
        _agrees_with_brute_force(p, t)


def test_fast_path_reads_any_non_zero_uint8_and_views() -> None:
    rng = np.random.default_rng(9)
    for n_w in (7, 8, 9, 16, 17, 65):
        shape = (4, 6, n_w)
        p, t = rng.random(shape) < 0.15, rng.random(shape) < 0.3
        values = rng.choice(np.array([1, 2, 127, 128, 255], np.uint8), size=shape)
        expected = brute_hausdorff(p, t)
        assert hausdorff_volume(p * values, t.astype(np.uint8)) == pytest.approx(expected, abs=1e-9)
        wide = np.zeros((4, 6, 2 * n_w), bool)
        wide[:, :, ::2] = p
        assert hausdorff_volume(wide[:, :, ::2], t) == pytest.approx(expected, abs=1e-9)
        shifted = np.zeros(p.size + 3, bool)[3:].reshape(shape)  # contiguous, off the 8-byte grid
        shifted[:] = p
        assert hausdorff_volume(shifted, t) == pytest.approx(expected, abs=1e-9)


def test_hand_computed_distances_and_empty_rules() -> None:
    p, t = np.zeros((4, 5, 10), bool), np.zeros((4, 5, 10), bool)
    assert hausdorff_volume(p, t) is None
    p[1, 2, 3] = True
    assert hausdorff_volume(p, t) == 1.0 and hausdorff_volume(t, p) == 1.0
    t[3, 2, 8] = True  # 2 slices of 4 and 5 columns of 10 apart: sqrt(0.5^2 + 0.5^2) / sqrt(3)
    assert hausdorff_volume(p, t) == pytest.approx(math.sqrt(1 / 6), abs=1e-12)
    t[1, 2, 3] = True  # now p is inside t: the far voxel of t decides
    assert hausdorff_volume(p, t) == pytest.approx(math.sqrt(1 / 6), abs=1e-12)
    assert hausdorff_volume(t, t) == 0.0
    # uint8 masks with any non-zero value, and non-contiguous views, count as foreground
    assert hausdorff_volume((p * 255).astype(np.uint8), t[:, :, :]) == pytest.approx(math.sqrt(1 / 6))
    big = np.zeros((4, 10, 20), bool)
    big[::1, ::2, ::2] = t
    assert hausdorff_volume(p, big[:, ::2, ::2]) == pytest.approx(math.sqrt(1 / 6))


def _numpy_runs(row: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row != 0, [0]]).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_run_kernels_and_dice_counts_match_numpy() -> None:
    rng = np.random.default_rng(5)
    for n_w in (1, 7, 8, 9, 31, 70):  # widths around the 8-pixel words
        m = rng.choice(np.array([0, 1, 255], np.uint8), size=(3, 3, 4, n_w), p=[0.6, 0.3, 0.1])
        m[0, 1] = 0  # empty rows
        m[1, 2, 0] = 255  # a full row
        m[2, :, 1:3] = 1  # full rows in a row: one run in the byte stream, cut at each row end
        ptr, starts, ends = class_runs(m)
        merged = union_runs(ptr, starts, ends)
        for s in range(3):
            for y in range(4):
                r = s * 4 + y
                for c in range(3):
                    got = list(zip(starts[ptr[c, r] : ptr[c, r + 1]], ends[ptr[c, r] : ptr[c, r + 1]]))
                    assert got == _numpy_runs(m[s, c, y])
                got = list(
                    zip(
                        merged[1][merged[0][r] : merged[0][r + 1]], merged[2][merged[0][r] : merged[0][r + 1]]
                    )
                )
                assert got == _numpy_runs(m[s, :, y].any(axis=0))
        t = rng.random(m.shape) < 0.3
        counts = dice_runs(*class_runs(m), *class_runs(t.view(np.uint8)), 4)
        for s in range(3):
            for c in range(3):
                a, b = m[s, c] != 0, t[s, c]
                assert counts[s, c].tolist() == [a.sum(), b.sum(), (a & b).sum()]
        stats = volume_stats(m, t, per_class=False)
        rows = [dice_pair(m[s, c], t[s, c]) for s in range(3) for c in range(3)]
        assert stats.n_rows.sum() == sum(d is not None for d in rows)
        assert stats.dice_sum.sum() == pytest.approx(sum(d for d in rows if d is not None))


def test_line_runs_match_numpy_and_grow_their_arrays() -> None:
    """Many short runs (more than the first guess of the array size) and every byte value."""
    rng = np.random.default_rng(6)
    for n_rows, n_w in ((1, 1), (3, 5), (90, 97), (200, 64), (40, 1), (0, 5), (4, 0)):
        rows = rng.choice(np.array([0, 1, 128, 255], np.uint8), size=(n_rows, n_w), p=[0.5, 0.3, 0.1, 0.1])
        ptr, starts, ends = line_runs(rows)
        assert ptr.shape == (n_rows + 1,) and ptr[0] == 0
        for r in range(n_rows):
            got = list(zip(starts[ptr[r] : ptr[r + 1]].tolist(), ends[ptr[r] : ptr[r + 1]].tolist()))
            assert got == _numpy_runs(rows[r])
    assert line_runs(np.ones((200, 64), np.uint8))[0][-1] == 200  # one run a row


def test_dice_pair() -> None:
    p, t = np.zeros((3, 4), bool), np.zeros((3, 4), bool)
    assert dice_pair(p, t) is None
    p[0, :4] = True
    t[0, :2] = True
    assert dice_pair(p, t) == pytest.approx(2 * 2 / (4 + 2))
    assert dice_pair(p, np.zeros_like(t)) == 0.0


def test_score_volumes_by_hand_and_dice_skip_rule() -> None:
    pred = np.zeros((4, 3, 6, 8), bool)
    truth = np.zeros_like(pred)
    pred[0, 0, 1, 1:5] = truth[0, 0, 1, 1:5] = True  # row (0, large_bowel): dice 1
    pred[1, 0, 2, 2] = True  # row (1, large_bowel): dice 0 (truth empty)
    truth[1, 2, 2, 2:4] = True  # row (1, stomach): dice 0 (prediction empty)
    pred[2, 1, 3, 0:4] = True
    truth[2, 1, 3, 2:6] = True  # row (2, small_bowel): dice 2*2/8
    # every other (slice, class) row is empty in both and skipped
    result = score_volumes({"case1_day0": pred}, {"case1_day0": truth}, CLASSES)
    dice = (1 + 0 + 0 + 0.5) / 4
    # classes merged: pred (2, 3, 0) is 2 columns from truth (2, 3, 2), truth (2, 3, 5) 2 columns
    # from pred (2, 3, 3); nothing is farther: 2/8 in the unit cube
    expected_h = 0.25 / math.sqrt(3)
    assert brute_hausdorff(pred.any(axis=1), truth.any(axis=1)) == pytest.approx(expected_h)
    assert result["dice"] == pytest.approx(dice)
    assert result["hausdorff"] == pytest.approx(expected_h, abs=1e-12)
    assert result["score"] == pytest.approx(0.4 * dice + 0.6 * (1 - expected_h))
    assert result["n_rows"] == 4 and result["n_volumes"] == 1
    per = result["per_class"]
    assert per["large_bowel"]["dice"] == pytest.approx(0.5) and per["small_bowel"]["dice"] == pytest.approx(
        0.5
    )
    assert per["stomach"]["dice"] == 0.0 and per["stomach"]["hausdorff"] == 1.0  # prediction empty
    for c, name in enumerate(CLASSES):
        assert per[name]["hausdorff"] == pytest.approx(brute_hausdorff(pred[:, c], truth[:, c]), abs=1e-12)
    # a volume empty in both adds no row and no Hausdorff term; all empty scores 1
    empty = np.zeros((2, 3, 6, 8), np.uint8)
    both = score_volumes(
        {"case1_day0": pred, "case2_day0": empty}, {"case1_day0": truth, "case2_day0": empty}, CLASSES
    )
    assert both["score"] == pytest.approx(result["score"]) and both["n_volumes"] == 1
    nothing = score_volumes({"a": empty}, {"a": empty}, CLASSES)
    assert (nothing["score"], nothing["dice"], nothing["hausdorff"], nothing["n_rows"]) == (1.0, 1.0, 0.0, 0)
    # per-volume stats aggregate to the same dict (the tuner may cache them)
    stats = [volume_stats(pred, truth), volume_stats(empty, empty)]
    assert aggregate(stats, CLASSES) == both
    assert (
        score_volumes({"a": pred}, {"a": truth}, CLASSES, per_class=False)["per_class"]["stomach"][
            "hausdorff"
        ]
        is None
    )


def test_score_volumes_rejects_mismatched_inputs() -> None:
    vol = np.zeros((2, 3, 4, 4), bool)
    with pytest.raises(ValueError, match="missing predictions case2_day0"):
        score_volumes({"case1_day0": vol}, {"case1_day0": vol, "case2_day0": vol}, CLASSES)
    with pytest.raises(ValueError, match=r"case1_day0: prediction \(2, 3, 4, 5\)"):
        score_volumes({"case1_day0": np.zeros((2, 3, 4, 5), bool)}, {"case1_day0": vol}, CLASSES)


# ---------------------------------------------------------------- submissions


def _day(case: int, day: int, n_slices: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((n_slices, 3, *shape)), (1.0, 0, 2.0, 2.0))
    return field > 0.6 * field.std()


def _long(volumes: dict[str, np.ndarray], column: str, slice_numbers=None) -> pd.DataFrame:
    rows = []
    for volume_id, vol in volumes.items():
        numbers = slice_numbers or range(1, len(vol) + 1)
        for s, number in enumerate(numbers):
            for c, name in enumerate(CLASSES):
                rows.append(
                    {"id": f"{volume_id}_slice_{number:04d}", "class": name, column: rle_encode(vol[s, c])}
                )
    return pd.DataFrame(rows)


@pytest.fixture
def tiny() -> dict:
    """Two day-volumes (different shapes), a prediction and the tables for them."""
    truths = {"case1_day0": _day(1, 0, 5, (12, 16), 1), "case2_day3": _day(2, 3, 4, (10, 10), 2)}
    preds = {k: np.roll(v, 1, axis=3) | _day(9, 9, *v.shape[:1], v.shape[2:], 5) for k, v in truths.items()}
    truth = _long(truths, "segmentation", slice_numbers=None)
    shapes = {i: (12, 16) if i.startswith("case1_") else (10, 10) for i in truth["id"]}
    return {
        "truths": truths,
        "preds": preds,
        "truth": truth,
        "sub": _long(preds, "predicted"),
        "shapes": shapes,
    }


def test_submission_scores_like_the_arrays_and_perfect_is_one(tiny: dict) -> None:
    expected = score_volumes(tiny["preds"], tiny["truths"], CLASSES)
    sub = tiny["sub"].sample(frac=1.0, random_state=0)  # row order must not matter
    got = score_submission(sub, tiny["truth"], tiny["shapes"])
    assert got["score"] == pytest.approx(expected["score"], abs=1e-12)
    for name in CLASSES:
        assert got["per_class"][name]["dice"] == pytest.approx(expected["per_class"][name]["dice"], abs=1e-12)
    assert 0.0 < got["score"] < 1.0
    perfect = tiny["truth"].rename(columns={"segmentation": "predicted"})
    result = score_submission(perfect, tiny["truth"], tiny["shapes"])
    assert result["score"] == 1.0 and result["dice"] == 1.0 and result["hausdorff"] == 0.0


def test_slices_stack_by_slice_number_not_row_order() -> None:
    vol = _day(1, 0, 3, (8, 8), 4)
    truth = _long({"case1_day0": vol}, "segmentation", slice_numbers=[7, 2, 40])  # ids out of order
    pred = truth.rename(columns={"segmentation": "predicted"})
    order = np.argsort([7, 2, 40])
    shapes = dict.fromkeys(truth["id"], (8, 8))
    moved = vol.copy()
    moved[0] = False  # drop slice 7: the middle one in slice order, the first in row order
    sub = _long({"case1_day0": moved}, "predicted", slice_numbers=[7, 2, 40])
    got = score_submission(sub, truth, shapes)
    expected = score_volumes({"d": moved[order]}, {"d": vol[order]}, CLASSES)
    in_row_order = score_volumes({"d": moved}, {"d": vol}, CLASSES)
    assert got["hausdorff"] == pytest.approx(expected["hausdorff"], abs=1e-12)
    assert got["hausdorff"] != pytest.approx(in_row_order["hausdorff"])
    assert score_submission(pred, truth, shapes)["score"] == 1.0


def test_perfect_real_labels_score_one(shared_data: Path) -> None:
    truth = pd.read_csv(shared_data / "uwmgi-real-labels" / "train_partial.csv", keep_default_na=False)
    truth = truth[truth["id"].str.match(r"case(34|139)_")]  # two cases keep it quick
    size = np.where(truth["id"].str.startswith("case139_day0"), 234, 276)
    truth = truth.assign(image_height=size, image_width=size)
    sub = truth[["id", "class", "segmentation"]].rename(columns={"segmentation": "predicted"})
    result = score_submission(sub, truth, slice_shapes(truth))
    assert result["score"] == 1.0 and result["n_rows"] > 0


def test_validation_names_what_is_wrong(tiny: dict) -> None:
    truth, sub, shapes = tiny["truth"], tiny["sub"], tiny["shapes"]
    validate_submission(sub, truth, shapes)
    with pytest.raises(
        SubmissionError, match=r"missing \['predicted'\].*expected exactly id,class,predicted"
    ):
        validate_submission(sub.drop(columns="predicted"), truth)
    with pytest.raises(SubmissionError, match=r"unexpected \['extra'\]"):
        validate_submission(sub.assign(extra=1), truth)
    with pytest.raises(
        SubmissionError,
        match=r"1 duplicated \(id, class\) rows: row 27 \(case1_day0_slice_0001, large_bowel\)",
    ):
        validate_submission(pd.concat([sub, sub.iloc[[0]]], ignore_index=True), truth)
    with pytest.raises(
        SubmissionError,
        match=r"lacks 2 \(id, class\) rows of the truth: \('case1_day0_slice_0001', 'large_bowel'\)",
    ):
        validate_submission(sub.iloc[2:], truth)
    stray = pd.DataFrame([{"id": "case5_day0_slice_0001", "class": "stomach", "predicted": ""}])
    with pytest.raises(
        SubmissionError,
        match=r"1 \(id, class\) rows not in the truth: row 27 \(case5_day0_slice_0001, stomach\)",
    ):
        validate_submission(pd.concat([sub, stray], ignore_index=True), truth)
    bad = sub.copy()
    bad.loc[4, "predicted"] = "12 3 x"
    with pytest.raises(
        SubmissionError, match=r"malformed RLE in row 4 \(case1_day0_slice_0002, small_bowel\): '12 3 x'"
    ):
        validate_submission(bad, truth)
    bad.loc[4, "predicted"] = "12 3 20"
    with pytest.raises(SubmissionError, match="row 4"):
        validate_submission(bad, truth)
    bad.loc[4, "predicted"] = "190 5"  # 12 x 16 = 192 pixels
    validate_submission(bad, truth)  # syntax is fine; the shape check needs shapes
    with pytest.raises(SubmissionError, match=r"row 4 \(case1_day0_slice_0002, small_bowel\).*out of bounds"):
        validate_submission(bad, truth, shapes)
    with pytest.raises(SubmissionError, match=r"row 4 \(case1_day0_slice_0002, small_bowel\).*out of bounds"):
        score_submission(bad, truth, shapes)
    with pytest.raises(DataError, match="duplicated"):
        validate_submission(sub, pd.concat([truth, truth.iloc[[3]]], ignore_index=True))


def test_slice_shapes_from_columns_or_images(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", {1: [0]}, n_slices=2, shape=(24, 32))
    truth = pd.read_csv(root / "train.csv", keep_default_na=False)
    assert set(slice_shapes(truth, root).values()) == {(24, 32)}
    assert slice_shapes(truth.assign(image_height=7, image_width=9))["case1_day0_slice_0002"] == (7, 9)
    stray = pd.concat(
        [truth, pd.DataFrame([{"id": "case4_day2_slice_0009", "class": "stomach", "segmentation": ""}])]
    )
    with pytest.raises(
        DataError,
        match=r"1 ids of the truth have no slice image under .*train or .*test: case4_day2_slice_0009",
    ):
        slice_shapes(stray, root)
    with pytest.raises(DataError, match="no image_height/image_width columns"):
        slice_shapes(truth, None)


# ---------------------------------------------------------------- the score CLI


def _score_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the score stage on bad input: exit status 2 and one stderr line "score: error: ..."."""
    capsys.readouterr()
    assert run_cli("score", score_stage.main, argv) == 2  # what `python -m stages.score` returns
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("score: error: ")
    return err[0]


def test_score_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_dataset(tmp_path / "data", {1: [0], 3: [2]}, n_slices=4, shape=(24, 32))
    truth = pd.read_csv(root / "train.csv", keep_default_na=False)
    sub = truth.rename(columns={"segmentation": "predicted"})
    sub.loc[sub.index[::5], "predicted"] = ""  # lose a few masks
    sub.to_csv(tmp_path / "sub.csv", index=False)
    result = score_stage.main(
        [
            "--submission",
            str(tmp_path / "sub.csv"),
            "--truth",
            str(root / "train.csv"),
            "--data-dir",
            str(root),
            "--dataset",
            "uwmgi",
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps({"dataset": "uwmgi", **result}))
    assert set(result["per_class"]) == set(CLASSES)
    shapes = slice_shapes(truth, root)
    assert result["score"] == pytest.approx(score_submission(sub, truth, shapes)["score"])
    assert 0.0 < result["score"] < 1.0

    # bad input: a clear message and a non-zero exit, no traceback
    sub.drop(columns="class").to_csv(tmp_path / "bad.csv", index=False)
    args = ["--truth", str(root / "train.csv"), "--dataset", "uwmgi"]
    bad = ["--submission", str(tmp_path / "bad.csv"), "--data-dir", str(root)]
    assert "missing ['class']" in _score_error(capsys, bad + args)
    none = ["--submission", str(tmp_path / "none.csv"), "--data-dir", str(root)]
    assert "submission file not found" in _score_error(capsys, none + args)
    no_images = ["--submission", str(tmp_path / "sub.csv"), "--data-dir", str(tmp_path)]
    assert "no slice image under" in _score_error(capsys, no_images + args)


def test_score_cli_exit_status_without_traceback(tmp_path: Path) -> None:
    truth = pd.DataFrame(
        [
            {
                "id": "case1_day0_slice_0001",
                "class": "stomach",
                "segmentation": "1 3",
                "image_height": 4,
                "image_width": 4,
            }
        ]
    )
    truth.to_csv(tmp_path / "truth.csv", index=False)
    pd.DataFrame([{"id": "case1_day0_slice_0001", "class": "stomach", "predicted": "15 9"}]).to_csv(
        tmp_path / "sub.csv", index=False
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.score",
            "--submission",
            str(tmp_path / "sub.csv"),
            "--truth",
            str(tmp_path / "truth.csv"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "score: error: " in line]
    assert len(errors) == 1 and errors[0].rstrip().endswith("(wrong image shape?)")  # one line
    assert "row 0 (case1_day0_slice_0001, stomach)" in proc.stderr and "out of bounds" in proc.stderr


def test_threads_give_the_same_score() -> None:
    rng = np.random.default_rng(11)
    truths = {f"case{i}_day0": rng.random((3, 3, 9, 7)) < 0.2 for i in range(6)}
    preds = {k: v ^ (rng.random(v.shape) < 0.05) for k, v in truths.items()}
    assert score_volumes(preds, truths, CLASSES, workers=3) == score_volumes(preds, truths, CLASSES)
