"""Tuning where the OOF is small: the cross-fitted held-apart estimate and the minimum gain.

The cross-fitted estimate must equal its brute-force twin (a search run alone on each fold's tuning
part, its settings scored volume by volume on the fold it never saw, pooled); ``tune.min_gain``
must keep a step's current value unless a candidate beats it by more than the margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_tune import planted_oof  # noqa: F401  (fixture)
from test_tune_passes import sparse_oof  # noqa: F401  (fixture)

from pipeline.config import EnsembleConfig, MemberCfg, TuneCfg
from pipeline.datasets import get_dataset
from pipeline.infer.ensemble import load_oof
from pipeline.infer.evaluate import VolumeWork, variant_stats
from pipeline.infer.postprocess import read_decisions
from pipeline.infer.search import Search
from pipeline.infer.tune import fold_splits, run_tune

GRIDS = {
    "pixel_thresholds": (0.3, 0.5, 0.7),
    "gate_thresholds": (0.0,),
    "min_component_sizes": (0, 4, 12),
    "prob_gate_pixels": (0, 3),
    "prob_gate_levels": (0.6,),
    "z_runs": (0, 2),
    "blend_steps": 2,
}


def _cfg(name: str, **tune: object) -> EnsembleConfig:
    members = (MemberCfg(config="a"), MemberCfg(config="b"))
    return EnsembleConfig(name=name, members=members, tune=TuneCfg(**{**GRIDS, **tune}))


def test_fold_splits_hold_every_group_apart_once_seeded(sparse_oof: Path) -> None:  # noqa: F811
    oof = load_oof(_cfg("f"), get_dataset("uwmgi"), sparse_oof, progress=False)
    splits = fold_splits(oof, 3, seed=4)
    assert len(splits) == 3
    held = [v for _, h, _ in splits for v in h]
    assert sorted(held) == sorted(oof.volumes) and len(held) == len(set(held))
    for tuning, h, groups in splits:
        assert set(tuning) | set(h) == set(oof.volumes) and not set(tuning) & set(h)
        assert {oof.groups[v] for v in h} == set(groups)
    assert fold_splits(oof, 3, seed=4) == splits
    assert [s[2] for s in fold_splits(oof, 3, seed=5)] != [s[2] for s in splits]
    assert len(fold_splits(oof, 9, seed=0)) == len(
        {oof.groups[v] for v in oof.volumes}
    )  # at most one per group


def test_cross_fitted_estimate_equals_searches_run_alone_on_each_fold(sparse_oof: Path) -> None:  # noqa: F811
    cfg = _cfg("xfit", holdout_folds=3, holdout_seed=2)
    decisions = read_decisions(
        "xfit", run_tune(cfg, get_dataset("uwmgi"), sparse_oof, workers=2, progress=False)
    )
    oof = load_oof(cfg, get_dataset("uwmgi"), sparse_oof, progress=False)
    splits = fold_splits(oof, 3, seed=2)
    # the twin: each fold's search alone, its settings after each step scored volume by volume on the
    # fold it did not see, the per-volume stats pooled over the folds
    pooled: list[list] = []
    for tuning, held, _ in splits:
        track = Search(oof, cfg, [("", tuning)], workers=1, progress=False).run().tracks[0]
        for i, rec in enumerate(track.records):
            stats = [
                variant_stats(VolumeWork(oof, v, cut=False), [rec.weights], list(rec.params))[0] for v in held
            ]
            if len(pooled) <= i:
                pooled.append([])
            pooled[i] += stats
    twin = [oof.spec.aggregate(stats)["score"] for stats in pooled]
    held_out = [s["held_out"] for s in decisions.steps if not s["step"].startswith("alone:")]
    assert held_out == pytest.approx(twin, abs=1e-12)
    h = decisions.holdout
    assert h["folds"] == 3 and h["days_held"] == len(oof.volumes) and len(h["fold_settings"]) == 3
    assert sorted(h["groups"]) == sorted({oof.groups[v] for v in oof.volumes})
    assert decisions.oof.held_out == pytest.approx(twin[-1])
    # the decisions themselves come from the search on every volume, as without the estimate
    plain = read_decisions(
        "plain",
        run_tune(_renamed(cfg, "plain", holdout=0.0), get_dataset("uwmgi"), sparse_oof, progress=False),
    )
    assert decisions.classes == plain.classes and decisions.weights == plain.weights


def _renamed(cfg: EnsembleConfig, name: str, **tune: object) -> EnsembleConfig:
    from dataclasses import replace

    return replace(cfg, name=name, tune=replace(cfg.tune, holdout_folds=0, **tune))


def test_min_gain_keeps_the_current_value_unless_a_candidate_clears_it(planted_oof: Path) -> None:  # noqa: F811
    members = (MemberCfg(config="good"), MemberCfg(config="bad"))
    grids = {"pixel_thresholds": (0.5, 0.65, 0.8), "gate_thresholds": (0.0,), "min_component_sizes": (0, 5)}
    free = EnsembleConfig(name="free", members=members, tune=TuneCfg(**grids, blend_steps=2, holdout=0.0))
    tuned = read_decisions(
        "free", run_tune(free, get_dataset("uwmgi"), planted_oof, workers=1, progress=False)
    )
    steps = {s["step"]: s for s in tuned.steps}
    moved = [s for s in ("blend_raw", "pixel_threshold", "min_component_size") if steps[s]["gain"] > 0]
    assert moved, "the planted OOF must reward some step, or this test cannot fail"
    # a margin above every step's gain: nothing moves from the start
    high = max(steps[s]["gain"] for s in moved) + 1e-6
    held = EnsembleConfig(
        name="held", members=members, tune=TuneCfg(**grids, blend_steps=2, holdout=0.0, min_gain=high)
    )
    kept = read_decisions(
        "held", run_tune(held, get_dataset("uwmgi"), planted_oof, workers=1, progress=False)
    )
    assert all(p.pixel_threshold == 0.5 and p.min_component_size == 0 for p in kept.classes.values())
    assert all(w == {"good": 0.5, "bad": 0.5} for w in kept.weights.values())
    assert all(s["gain"] in (None, 0) for s in kept.steps if not s["step"].startswith("alone:"))
    # a margin far below every gain changes nothing
    low = EnsembleConfig(
        name="low", members=members, tune=TuneCfg(**grids, blend_steps=2, holdout=0.0, min_gain=1e-9)
    )
    same = read_decisions("low", run_tune(low, get_dataset("uwmgi"), planted_oof, workers=1, progress=False))
    assert same.classes == tuned.classes and same.weights == tuned.weights


def test_min_gain_and_folds_are_checked_at_load(tmp_path: Path) -> None:
    from pipeline.config import ConfigError
    from pipeline.datasets import load_config

    for bad, key in (("holdout_folds: 1", "holdout_folds"), ("min_gain: -0.1", "min_gain")):
        path = tmp_path / "e.yaml"
        path.write_text(f"stage: ensemble\nmembers: [{{config: a}}]\ntune: {{{bad}}}\n")
        with pytest.raises(ConfigError, match=key):
            load_config(str(path), stage="ensemble")
    assert np.isfinite(TuneCfg().min_gain)
