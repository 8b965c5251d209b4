"""OOF tuning that must find planted optima: thresholds, gate, component size, blend weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layout import write_dataset
from scipy import ndimage

from pipeline.config import EnsembleConfig, MemberCfg, TuneCfg
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import CLASSES
from pipeline.infer.postprocess import DecisionsError, read_decisions
from pipeline.infer.tune import run_tune, simplex_grid
from pipeline.io import write_with
from pipeline.paths import run_dir


def test_simplex_grid_sums_to_one() -> None:
    grid = simplex_grid(3, 4)
    assert len(grid) == 15 and all(abs(w.sum() - 1) < 1e-12 and (w >= 0).all() for w in grid)


@pytest.fixture
def planted_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two members: 'good' puts 0.7 on the truth and 0.6 on scattered false pixels; 'bad' is noise."""
    root = write_dataset(isolated_dirs / "data", {c: [0] for c in range(1, 5)}, n_slices=5)
    monkeypatch.setenv("DATA_DIR", str(root))
    spec = get_dataset("uwmgi")
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    rng = np.random.default_rng(0)
    for volume_id in store.days:
        volume = store[volume_id]
        truth = np.asarray(volume.mask, bool)
        noise = (rng.random(truth.shape) < 0.02) & ~truth
        good = np.where(truth, round(0.7 * 255), np.where(noise, round(0.6 * 255), 0)).astype(np.uint8)
        bad = rng.integers(0, 256, truth.shape).astype(np.uint8)
        ids = np.array(volume.ids)
        for name, probs in (("good", good), ("bad", bad)):
            path = run_dir("seg", name, 0) / "oof" / f"{volume_id}.npz"
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
        "refine",
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


@pytest.fixture
def gated_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One member exact on the truth, plus what only the gate or only the size step removes:
    4-voxel patches on slices without the organ (classifier says 0.2 there, 0.8 elsewhere) and
    one isolated voxel per class on a slice with the organ; a classifier OOF to gate with."""
    root = write_dataset(isolated_dirs / "data", {c: [0] for c in range(1, 5)}, n_slices=5)
    monkeypatch.setenv("DATA_DIR", str(root))
    spec = get_dataset("uwmgi")
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    rows = []
    for volume_id in store.days:
        volume = store[volume_id]
        truth = np.asarray(volume.mask, bool)
        probs = np.where(truth, 200, 0).astype(np.uint8)
        present = truth.any(axis=(2, 3))  # (S, 3)
        for c in range(3):
            for s in np.flatnonzero(~present[:, c]):
                probs[s, c, 0:2, 0:2] = 230  # gate's job: a whole slice that should be empty
            near = ndimage.binary_dilation(truth[:, c], np.ones((3, 3, 3)), iterations=2)
            near[:, :4, :4] = True  # away from the patches too
            lone = np.argwhere(~near & present[:, c, None, None])
            if len(lone):
                s, y, x = lone[len(lone) // 2]
                probs[s, c, y, x] = 230  # size step's job: a lone voxel on a slice the gate keeps
        path = run_dir("seg", "m", 0) / "oof" / f"{volume_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array(volume.ids)
        write_with(path, lambda p, probs=probs, ids=ids: np.savez_compressed(p, probs=probs, ids=ids))
        for i, slice_id in enumerate(volume.ids):
            rows.append(
                {
                    "id": slice_id,
                    "volume_id": volume_id,
                    **{n: 0.8 if present[i, c] else 0.2 for c, n in enumerate(CLASSES)},
                }
            )
    cls_oof = run_dir("cls", "gate_cls", 0) / "oof.csv"
    cls_oof.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(cls_oof, index=False)
    return root


def test_tune_finds_planted_gate_and_component_size(gated_oof: Path) -> None:
    cfg = EnsembleConfig(
        name="gated",
        members=(MemberCfg(config="m"),),
        classifier="gate_cls",
        tune=TuneCfg(
            pixel_thresholds=(0.5,), gate_thresholds=(0.0, 0.5, 0.9), min_component_sizes=(0, 3, 5000)
        ),
    )
    decisions = read_decisions("gated", run_tune(cfg, gated_oof, workers=2, progress=False))
    assert {
        c: (p.gate_threshold, p.min_component_size) for c, p in decisions.classes.items()
    } == dict.fromkeys(CLASSES, (0.5, 3))
    assert decisions.classifier == {"config": "gate_cls", "folds": [0]}
    scores = {s["step"]: s["score"] for s in decisions.steps}
    assert scores["raw"] < scores["gate_threshold"] < scores["min_component_size"] == pytest.approx(1.0)
    assert decisions.per_class["stomach"]["dice"] == pytest.approx(1.0)
    curve = decisions.curves["gate_threshold"]["stomach"]
    assert curve["values"] == [0.0, 0.5, 0.9] and curve["chosen"] == 0.5


def test_evaluate_equals_score_volumes(planted_oof: Path) -> None:
    """The per-day, per-variant evaluation of tuning is the metric itself (score_volumes twin)."""
    from pipeline.infer.ensemble import load_oof
    from pipeline.infer.postprocess import ClassParams, apply_postprocess
    from pipeline.infer.tune import evaluate
    from pipeline.metric import score_volumes

    cfg = EnsembleConfig(name="twin", members=(MemberCfg(config="good"), MemberCfg(config="bad")))
    oof = load_oof(cfg, planted_oof, progress=False)
    params = [ClassParams(0.55, 0.0, 0), ClassParams(0.3, 0.0, 4), ClassParams(0.8, 0.0, 0)]
    weights = [np.array([0.6, 0.4]), np.array([1.0, 0.0])]
    values = [0.2, 0.5, 0.9]
    got = evaluate(oof, weights, params, (1, "pixel_threshold", values), workers=2, progress=False)
    truths = {d: np.asarray(oof.truth_mask(d)) for d in oof.days}
    for i, (w, v) in enumerate((w, v) for w in weights for v in values):
        varied = [*params[:1], params[1].with_value("pixel_threshold", v), *params[2:]]
        preds = {d: apply_postprocess(oof.blend(d, w), None, varied) for d in oof.days}
        want = score_volumes(preds, truths, CLASSES, per_class=False)
        assert got[i]["score"] == pytest.approx(want["score"], abs=1e-12)
        assert got[i]["dice"] == pytest.approx(want["dice"], abs=1e-12)
