"""Post-processing on known volumes, and OOF tuning that must find planted optima."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from layout import write_dataset

from pipeline.config import CLASSES, EnsembleConfig, MemberCfg, TuneCfg
from pipeline.data.catalog import load_split
from pipeline.data.volumes import VolumeStore
from pipeline.infer.postprocess import (
    ClassParams,
    DecisionsError,
    apply_postprocess,
    gate_slices,
    read_decisions,
    remove_small_components,
    threshold_probs,
)
from pipeline.infer.tune import run_tune, simplex_grid
from pipeline.io import write_with
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


def test_simplex_grid_sums_to_one() -> None:
    grid = simplex_grid(3, 4)
    assert len(grid) == 15 and all(abs(w.sum() - 1) < 1e-12 and (w >= 0).all() for w in grid)


@pytest.fixture
def planted_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two members: 'good' puts 0.7 on the truth and 0.6 on scattered false pixels; 'bad' is noise."""
    root = write_dataset(isolated_dirs / "data", {c: [0] for c in range(1, 5)}, n_slices=5)
    monkeypatch.setenv("DATA_DIR", str(root))
    store = VolumeStore(root, load_split(root, "train"))
    rng = np.random.default_rng(0)
    for case_day in store.days:
        volume = store[case_day]
        truth = np.asarray(volume.mask, bool)
        noise = (rng.random(truth.shape) < 0.02) & ~truth
        good = np.where(truth, round(0.7 * 255), np.where(noise, round(0.6 * 255), 0)).astype(np.uint8)
        bad = rng.integers(0, 256, truth.shape).astype(np.uint8)
        ids = np.array(volume.ids)
        for name, probs in (("good", good), ("bad", bad)):
            path = run_dir("seg", name, 0) / "oof" / f"{case_day}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_with(path, lambda p, probs=probs, ids=ids: np.savez_compressed(p, probs=probs, ids=ids))
    return root


def test_tune_finds_planted_threshold_and_blend(planted_oof: Path) -> None:
    cfg = EnsembleConfig(
        name="planted",
        members=(MemberCfg(config="good"), MemberCfg(config="bad")),
        tune=TuneCfg(
            pixel_thresholds=(0.5, 0.65, 0.8),
            gate_thresholds=(0.0,),
            min_component_sizes=(0, 5),
            blend_steps=2,
        ),
    )
    with pytest.raises(DecisionsError, match="make tune"):
        read_decisions("planted")
    path = run_tune(cfg, planted_oof, workers=1, progress=False)
    decisions = read_decisions("planted", path)
    assert path == run_dir("ensemble", "planted") / "postprocess.json"
    assert decisions.weights == {"good": 1.0, "bad": 0.0}
    assert decisions.oof["score"] == pytest.approx(1.0)
    assert all(decisions.classes[c].pixel_threshold in (0.5, 0.65, 0.8) for c in CLASSES)
    assert [s["step"] for s in decisions.steps] == [
        "raw",
        "blend_raw",
        "pixel_threshold",
        "gate_threshold",
        "min_component_size",
        "blend",
    ]
    assert decisions.steps[1]["score"] > decisions.steps[0]["score"]  # dropping the noisy member helps


def test_tune_single_member_picks_known_threshold(planted_oof: Path) -> None:
    cfg = EnsembleConfig(
        name="single",
        members=(MemberCfg(config="good"),),
        tune=TuneCfg(
            pixel_thresholds=(0.5, 0.65, 0.8), gate_thresholds=(0.0,), min_component_sizes=(0,), blend_steps=1
        ),
    )
    decisions = read_decisions("single", run_tune(cfg, planted_oof, workers=1, progress=False))
    assert {c: decisions.classes[c].pixel_threshold for c in CLASSES} == dict.fromkeys(CLASSES, 0.65)
    assert decisions.oof["score"] == pytest.approx(1.0)
    assert decisions.steps[0]["score"] < 1.0  # raw 0.5 keeps the planted false positives
