"""The shared work of tuning passes is exact: volumes cut to their box, truth digested once, the
held-apart search run in lockstep with the full one, and the decoded OOF cache keyed on its source."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from test_tune import write_designed, write_member

from pipeline.config import EnsembleConfig, MemberCfg, TuneCfg
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import CLASSES
from pipeline.datasets.uwmgi_metric import reference, score_volumes, volume_stats
from pipeline.infer.ensemble import load_oof
from pipeline.infer.evaluate import VaryStep, VaryWeights, evaluate
from pipeline.infer.oof_cache import oof_entry, read_oof_volume
from pipeline.infer.postprocess import ClassParams, apply_postprocess
from pipeline.infer.search import Search
from pipeline.infer.steps import with_value
from pipeline.paths import run_dir

SHAPE = (10, 3, 32, 32)


def _truth(rng: np.random.Generator) -> np.ndarray:
    """Organ blobs in the middle of the volume, away from every edge."""
    truth = np.zeros(SHAPE, bool)
    for c in range(3):
        z0, y0, x0 = rng.integers(3, 5), rng.integers(10, 16), rng.integers(10, 16)
        truth[z0 : z0 + rng.integers(2, 4), c, y0 : y0 + rng.integers(3, 7), x0 : x0 + rng.integers(3, 7)] = (
            True
        )
    return truth


def _member(truth: np.ndarray, rng: np.random.Generator, spread: int) -> np.ndarray:
    """Soft probabilities around the truth plus a few false blobs, zero elsewhere."""
    probs = np.zeros(truth.shape, np.float32)
    for c in range(3):
        soft = ndimage.uniform_filter(truth[:, c].astype(np.float32), size=(1, spread, spread))
        probs[:, c] = soft * rng.uniform(0.7, 1.0)
        for _ in range(2):
            s, y, x = rng.integers(1, 9), rng.integers(6, 24), rng.integers(6, 24)
            probs[s, c, y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = rng.uniform(0.3, 0.9)
    return np.rint(probs * 255).astype(np.uint8)


@pytest.fixture
def sparse_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Five cases; two members whose non-zero probabilities fill a fraction of each volume."""
    rng = np.random.default_rng(7)
    root = write_designed(isolated_dirs / "data", {case: _truth(rng) for case in range(1, 6)})
    monkeypatch.setenv("DATA_DIR", str(root))
    spec = get_dataset("uwmgi")
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    ids = {d: store[d].ids for d in store.volume_ids}
    for name, spread in (("a", 3), ("b", 5)):
        write_member(
            name, {d: _member(np.asarray(store[d].mask, bool), rng, spread) for d in store.volume_ids}, ids
        )
    return root


def _cfg(**tune) -> EnsembleConfig:
    grids = {
        "pixel_thresholds": (0.3, 0.5, 0.7),
        "gate_thresholds": (0.0,),
        "min_component_sizes": (0, 3, 8),
        "prob_gate_pixels": (0, 2, 6),
        "prob_gate_levels": (0.5, 0.8),
        "z_runs": (0, 2),
        "blend_steps": 4,
        "holdout": 0.4,
    }
    return EnsembleConfig(
        name="sparse", members=(MemberCfg(config="a"), MemberCfg(config="b")), tune=TuneCfg(**(grids | tune))
    )


def test_volumes_are_cut_to_a_box_smaller_than_the_volume(sparse_oof: Path) -> None:
    oof = load_oof(_cfg(), get_dataset("uwmgi"), sparse_oof, progress=False)
    for volume in oof.volumes:
        view = oof.view(volume)
        full = oof.view(volume, cut=False)
        assert view.truth.size < 0.5 * full.truth.size and view.grid == (SHAPE[0], SHAPE[2], SHAPE[3])
        box = oof.boxes[volume]
        for cut, whole in zip(view.probs, full.probs):
            assert np.array_equal(cut, whole[box[0], :, box[1], box[2]])
            outside = whole.copy()
            outside[box[0], :, box[1], box[2]] = 0
            assert not outside.any()  # nothing non-zero is left outside the box
        assert np.array_equal(view.truth, full.truth[box[0], :, box[1], box[2]])


def test_cut_stats_with_grid_equal_whole_volume_stats() -> None:
    rng = np.random.default_rng(3)
    truth = _truth(rng)
    pred = _member(truth, rng, 3) >= 128
    box = (slice(2, 9), slice(5, 27), slice(4, 30))
    assert not pred[:2].any() and not truth[:2].any()  # the box holds every voxel
    want = volume_stats(pred, truth, per_class=True)
    cut_p, cut_t = pred[box[0], :, box[1], box[2]], truth[box[0], :, box[1], box[2]]
    got = volume_stats(cut_p, reference(cut_t), per_class=True, grid=(SHAPE[0], SHAPE[2], SHAPE[3]))
    assert np.array_equal(got.dice_sum, want.dice_sum) and np.array_equal(got.n_rows, want.n_rows)
    assert got.hausdorff == pytest.approx(want.hausdorff, abs=1e-12)
    assert got.class_hausdorff == pytest.approx(want.class_hausdorff, abs=1e-12)
    # without the grid the distances are those of a smaller volume: the test can tell
    assert volume_stats(cut_p, cut_t).hausdorff != pytest.approx(want.hausdorff, abs=1e-6)


@pytest.mark.parametrize(
    ("stage", "values"),
    [
        ("pixel_threshold", [0.2, 0.5, 0.75]),
        ("prob_gate", [(0, 0.0), (2, 0.5), (6, 0.8)]),
        ("z_run", [0, 2, 3]),
        ("min_component_size", [0, 3, 8]),
        ("weights", [np.array([1.0, 0.0]), np.array([0.25, 0.75])]),
    ],
)
def test_evaluate_on_cut_volumes_equals_the_metric_on_whole_volumes(sparse_oof: Path, stage, values) -> None:
    oof = load_oof(_cfg(), get_dataset("uwmgi"), sparse_oof, progress=False)
    params = [
        ClassParams(0.4, 0.0, 2, 3, 0.6, 2),
        ClassParams(0.6, 0.0, 0),
        ClassParams(0.5, 0.0, 5, 0, 0.0, 3),
    ]
    weights = np.array([[0.5, 0.5], [0.75, 0.25], [0.0, 1.0]])
    vary = VaryWeights(1, values) if stage == "weights" else VaryStep(1, stage, values)
    got = evaluate(oof, [weights], params, vary, workers=2, progress=False)
    truths = {d: np.asarray(oof.truth_mask(d)) for d in oof.volumes}
    for value, result in zip(values, got, strict=True):
        w, p = weights.copy(), list(params)
        if stage == "weights":
            w[1] = value
        else:
            p[1] = with_value(p[1], stage, value)
        preds = {d: apply_postprocess(oof.blend(d, w), None, p) for d in oof.volumes}
        want = score_volumes(preds, truths, CLASSES, per_class=False)
        assert result["score"] == pytest.approx(want["score"], abs=1e-12)
        assert result["hausdorff"] == pytest.approx(want["hausdorff"], abs=1e-12)


def test_lockstep_tracks_equal_searches_run_alone(sparse_oof: Path) -> None:
    cfg = _cfg(sweeps=3)
    oof = load_oof(cfg, get_dataset("uwmgi"), sparse_oof, progress=False)
    part = oof.volumes[:3]
    both = Search(oof, cfg, [("", oof.volumes), ("part: ", part)], workers=2, progress=False).run().tracks
    alone = [Search(oof, cfg, [("", v)], progress=False).run().tracks[0] for v in (oof.volumes, part)]
    for lock, solo in zip(both, alone, strict=True):
        assert [r.step for r in lock.records] == [r.step for r in solo.records]
        assert [r.skipped for r in lock.records] == [r.skipped for r in solo.records]
        assert [r.result["score"] for r in lock.records] == [r.result["score"] for r in solo.records]
        assert [r.params for r in lock.records] == [r.params for r in solo.records]
        assert np.array_equal(lock.weights, solo.weights) and lock.curves == solo.curves
    assert both[0].records[-1].result["score"] != both[1].records[-1].result["score"]  # different volumes


def test_decoded_cache_holds_the_box_and_follows_its_source(
    sparse_oof: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = load_oof(_cfg(), get_dataset("uwmgi"), sparse_oof, progress=False).volumes[0]
    path = run_dir("seg", "a", 0) / "oof" / f"{volume}.npz"
    with np.load(path) as npz:
        probs = npz["probs"]
    entry = oof_entry(path)
    assert entry.crop().size < probs.size and np.array_equal(read_oof_volume(path)[0], probs)
    # a second RUNS_DIR with the same member and volume but other predictions, sharing the CACHE_DIR
    other = isolated_dirs / "runs2"
    monkeypatch.setenv("RUNS_DIR", str(other))
    path2 = run_dir("seg", "a", 0) / "oof" / f"{volume}.npz"
    flipped = probs[:, ::-1].copy()
    write_member("a", {volume: flipped}, {volume: entry.ids})
    assert oof_entry(path2).cache == entry.cache  # the same cache file: only its source tells them apart
    os.utime(path2, ns=(path.stat().st_mtime_ns, path.stat().st_mtime_ns))  # even with the same mtime
    assert np.array_equal(read_oof_volume(path2)[0], flipped)
    assert np.array_equal(read_oof_volume(path)[0], probs)  # and back
    empty = np.zeros_like(probs)
    write_member("a", {volume: empty}, {volume: entry.ids})
    assert oof_entry(path2).box is None and not read_oof_volume(path2)[0].any()


def test_blend_guard_keeps_the_member_that_wins_held_apart(sparse_oof: Path) -> None:
    """Member 'b' is the truth itself on the tuning part and noise on the held-apart groups: every
    in-sample choice wants it, the held-apart groups do not, so the guard keeps 'a' alone."""
    from pipeline.infer.postprocess import read_decisions
    from pipeline.infer.tune import run_tune, split_volumes

    cfg = _cfg(holdout=0.4, holdout_seed=1)
    oof = load_oof(cfg, get_dataset("uwmgi"), sparse_oof, progress=False)
    tuning, held, _ = split_volumes(oof, 0.4, 1)
    rng = np.random.default_rng(5)
    probs = {d: np.where(oof.truth_mask(d), 230, 0).astype(np.uint8) for d in tuning}
    probs |= {d: rng.integers(0, 256, SHAPE).astype(np.uint8) for d in held}
    write_member("b", probs, oof.ids)
    guarded = read_decisions(
        "sparse", run_tune(cfg, get_dataset("uwmgi"), sparse_oof, workers=2, progress=False)
    )
    guard = guarded.oof.blend_guard
    assert guard is not None and guard.kept == "a" and guard.blend_held_out < guard.alone_held_out
    assert guarded.used_members() == ["a"] and all(
        w == {"a": 1.0, "b": 0.0} for w in guarded.weights.values()
    )
    steps = {s["step"]: s for s in guarded.steps}
    assert steps["blend"]["skipped"] == steps["blend_raw"]["skipped"] == "weights held (blend guard)"
    assert all(w == {"a": 1.0, "b": 0.0} for w in guarded.holdout["weights"].values())
    # switched off, the blend (which leans on 'b') is kept, and it is what lost held apart
    cfg_off = _cfg(holdout=0.4, holdout_seed=1, blend_guard=False)
    blended = read_decisions(
        "sparse", run_tune(cfg_off, get_dataset("uwmgi"), sparse_oof, workers=2, progress=False)
    )
    assert blended.oof.blend_guard is None and "b" in blended.used_members()
    assert blended.holdout["held_score"] == pytest.approx(guard.blend_held_out)
    assert blended.steps[:2] == guarded.steps[:2]  # the members-alone rows are the blend search's
