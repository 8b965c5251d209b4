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
from pipeline.infer.steps import REGISTRY
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
    for volume_id in store.volume_ids:
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
    path = run_tune(cfg, get_dataset("uwmgi"), planted_oof, workers=1, progress=False)
    decisions = read_decisions("planted", path)
    assert path == run_dir("ensemble", "planted") / "postprocess.json"
    assert decisions.weights == {c: {"good": 1.0, "bad": 0.0} for c in CLASSES}
    assert decisions.used_members() == ["good"]
    assert decisions.oof.score == pytest.approx(1.0)
    assert all(decisions.classes[c].pixel_threshold in (0.5, 0.65, 0.8) for c in CLASSES)
    steps = {s["step"]: s for s in decisions.steps}
    assert list(steps) == [
        "alone:good",
        "alone:bad",
        "raw",
        "blend_raw",
        *REGISTRY.names(),
        "refine",
        "blend",
    ]
    assert steps["blend_raw"]["score"] > steps["raw"]["score"]  # dropping the noisy member helps
    assert steps["gate_threshold"]["skipped"] == "no classifier"
    assert steps["prob_gate"]["skipped"] == steps["z_run"]["skipped"] == "one value in the grid"
    assert steps["alone:good"]["score"] == pytest.approx(1.0)
    assert steps["alone:bad"]["score"] < 0.9
    assert decisions.oof.blend_gain.over == "good"
    assert decisions.oof.blend_gain.score == pytest.approx(0.0)
    assert all(s["held_out"] is not None for s in decisions.steps)  # 4 cases: one held apart


def test_tune_single_member_picks_known_threshold(planted_oof: Path) -> None:
    cfg = EnsembleConfig(
        name="single",
        members=(MemberCfg(config="good"),),
        tune=TuneCfg(
            pixel_thresholds=(0.5, 0.65, 0.8), gate_thresholds=(0.0,), min_component_sizes=(0,), blend_steps=1
        ),
    )
    decisions = read_decisions(
        "single", run_tune(cfg, get_dataset("uwmgi"), planted_oof, workers=1, progress=False)
    )
    assert {c: decisions.classes[c].pixel_threshold for c in CLASSES} == dict.fromkeys(CLASSES, 0.65)
    assert decisions.oof.score == pytest.approx(1.0)
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
    for volume_id in store.volume_ids:
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
    decisions = read_decisions(
        "gated", run_tune(cfg, get_dataset("uwmgi"), gated_oof, workers=2, progress=False)
    )
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
    """The per-volume, per-variant evaluation of tuning is the metric itself (score_volumes twin)."""
    from pipeline.datasets.uwmgi_metric import score_volumes
    from pipeline.infer.ensemble import load_oof
    from pipeline.infer.evaluate import VaryStep
    from pipeline.infer.postprocess import ClassParams, apply_postprocess
    from pipeline.infer.steps import with_value
    from pipeline.infer.tune import evaluate

    cfg = EnsembleConfig(name="twin", members=(MemberCfg(config="good"), MemberCfg(config="bad")))
    oof = load_oof(cfg, get_dataset("uwmgi"), planted_oof, progress=False)
    params = [ClassParams(0.55, 0.0, 0), ClassParams(0.3, 0.0, 4), ClassParams(0.8, 0.0, 0)]
    weights = [np.array([0.6, 0.4]), np.array([1.0, 0.0])]
    values = [0.2, 0.5, 0.9]
    got = evaluate(oof, weights, params, VaryStep(1, "pixel_threshold", values), workers=2, progress=False)
    truths = {d: np.asarray(oof.truth_mask(d)) for d in oof.volumes}
    for i, (w, v) in enumerate((w, v) for w in weights for v in values):
        varied = [*params[:1], with_value(params[1], "pixel_threshold", v), *params[2:]]
        preds = {d: apply_postprocess(oof.blend(d, w), None, varied) for d in oof.volumes}
        want = score_volumes(preds, truths, CLASSES, per_class=False)
        assert got[i]["score"] == pytest.approx(want["score"], abs=1e-12)
        assert got[i]["dice"] == pytest.approx(want["dice"], abs=1e-12)


# --------------------------------------------------------------------------- designed volumes


def write_designed(root: Path, masks: dict[int, np.ndarray]) -> Path:
    """A UW-layout train split whose truth is given: {case: (S, 3, H, W) bool} (day 0 of each case)."""
    import cv2

    from pipeline.datasets.uwmgi_files import make_id, slice_filename
    from pipeline.rle import rle_encode

    rows = []
    for case, volume in masks.items():
        folder = root / "train" / f"case{case}" / f"case{case}_day0" / "scans"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = volume.shape[2:]
        for s in range(len(volume)):
            image = np.full((height, width), 1000 + 10 * s, np.uint16)
            cv2.imwrite(str(folder / slice_filename(s + 1, width, height, 1.5, 1.5)), image)
            for c, name in enumerate(CLASSES):
                rows.append(
                    {"id": make_id(case, 0, s + 1), "class": name, "segmentation": rle_encode(volume[s, c])}
                )
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def write_member(name: str, probs_by_day: dict[str, np.ndarray], ids_by_day: dict[str, list[str]]) -> None:
    for day, probs in probs_by_day.items():
        path = run_dir("seg", name, 0) / "oof" / f"{day}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array(ids_by_day[day])
        write_with(path, lambda p, probs=probs, ids=ids: np.savez_compressed(p, probs=probs, ids=ids))


@pytest.fixture
def designed_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two cases of 8 slices. Truth: large bowel 4x4 on slices 2-5, small bowel 4x4 on 1-4, stomach
    2x2 on slice 3 only. Member 'm' puts 0.9 on the truth plus false positives at 0.67 on one
    isolated slice: a 3x3 patch of large bowel on slice 7, a 2x2 patch of small bowel on slice 6."""
    truth = np.zeros((8, 3, 16, 16), bool)
    truth[2:6, 0, 2:6, 2:6] = True
    truth[1:5, 1, 8:12, 8:12] = True
    truth[3, 2, 12:14, 2:4] = True
    root = write_designed(isolated_dirs / "data", {1: truth, 2: truth})
    monkeypatch.setenv("DATA_DIR", str(root))
    probs = np.where(truth, 230, 0).astype(np.uint8)
    probs[7, 0, 10:13, 10:13] = 170
    probs[6, 1, 1:3, 12:14] = 170
    spec = get_dataset("uwmgi")
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    assert all(np.array_equal(store[d].mask, truth) for d in store.volume_ids)
    write_member("m", dict.fromkeys(store.volume_ids, probs), {d: store[d].ids for d in store.volume_ids})
    return root


def _designed_cfg(name: str, **tune) -> EnsembleConfig:
    grids = {
        "pixel_thresholds": (0.5,),
        "gate_thresholds": (0.0,),
        "min_component_sizes": (0,),
        "holdout": 0.0,
    }
    return EnsembleConfig(name=name, members=(MemberCfg(config="m"),), tune=TuneCfg(**(grids | tune)))


def test_tune_probability_gate_on_where_it_helps_off_where_it_hurts(designed_oof: Path) -> None:
    """N = 5: at t = 0.7 the large-bowel patch (9 pixels at 0.67) has none and goes, at t = 0.6 it stays;
    the 4-pixel small-bowel patch goes at either t; the 4-pixel stomach truth would go too: off."""
    cfg = _designed_cfg("pg", prob_gate_pixels=(5, 100), prob_gate_levels=(0.6, 0.7))
    decisions = read_decisions(
        "pg", run_tune(cfg, get_dataset("uwmgi"), designed_oof, workers=1, progress=False)
    )
    gates = {c: (p.prob_gate_pixels, p.prob_gate_level) for c, p in decisions.classes.items()}
    assert gates == {"large_bowel": (5, 0.7), "small_bowel": (5, 0.6), "stomach": (0, 0.0)}
    steps = {s["step"]: s for s in decisions.steps}
    assert steps["raw"]["score"] < steps["prob_gate"]["score"] == pytest.approx(1.0)
    assert steps["prob_gate"]["gain"] == pytest.approx(1.0 - steps["raw"]["score"])
    assert steps["z_run"]["skipped"] == "one value in the grid" and "alone:m" not in steps
    curve = decisions.curves["prob_gate"]["stomach"]
    assert curve["values"] == [[0, 0.0], [5, 0.6], [5, 0.7], [100, 0.6], [100, 0.7]]
    assert curve["chosen"] == [0, 0.0] and max(curve["score"]) == curve["score"][0]
    assert decisions.holdout["skipped"] == "tune.holdout is 0" and steps["raw"]["held_out"] is None


def test_tune_z_continuity_on_where_it_helps_off_where_it_hurts(designed_oof: Path) -> None:
    """k = 2 cuts the isolated false slices of both bowels; k = 5 finds no run and empties them (worse);
    the stomach lies on one slice, so any k >= 2 would empty it: off."""
    cfg = _designed_cfg("zr", z_runs=(2, 5))
    decisions = read_decisions(
        "zr", run_tune(cfg, get_dataset("uwmgi"), designed_oof, workers=1, progress=False)
    )
    assert {c: p.z_run for c, p in decisions.classes.items()} == {
        "large_bowel": 2,
        "small_bowel": 2,
        "stomach": 0,
    }
    steps = {s["step"]: s for s in decisions.steps}
    assert steps["raw"]["score"] < steps["z_run"]["score"] == pytest.approx(1.0)
    assert steps["prob_gate"]["skipped"] == "one value in the grid"
    assert decisions.curves["z_run"]["large_bowel"]["values"] == [0, 2, 5]


def test_class_variants_equal_applying_each_candidate(planted_oof: Path) -> None:
    """Shared work and reused keys give exactly the mask of apply_class with that one value changed."""
    from pipeline.infer.ensemble import load_oof
    from pipeline.infer.evaluate import class_variants
    from pipeline.infer.postprocess import ClassParams, apply_class
    from pipeline.infer.steps import with_value

    cfg = EnsembleConfig(name="cv", members=(MemberCfg(config="good"), MemberCfg(config="bad")))
    oof = load_oof(cfg, get_dataset("uwmgi"), planted_oof, progress=False)
    q = oof.blend(oof.volumes[0], [0.7, 0.3])[:, 1]
    gate = np.linspace(0, 1, len(q))
    base = ClassParams(0.55, 0.3, 3, prob_gate_pixels=2, prob_gate_level=0.6, z_run=2)
    stages = {
        "pixel_threshold": [0.3, 0.5, 0.7],
        "gate_threshold": [0.0, 0.1, 0.2, 0.5, 0.9],
        "prob_gate": [(0, 0.0), (1, 0.5), (2, 0.5), (3, 0.6), (50, 0.9), (60, 0.9)],
        "z_run": [0, 1, 2, 3, 5],
        "min_component_size": [0, 1, 2, 3, 4, 8, 1000],
    }
    for stage, values in stages.items():
        by_key: dict = {}
        for value, (key, mask) in zip(values, class_variants(q, gate, base, stage, values), strict=True):
            if mask is None:
                mask = by_key[key]
            elif key is not None:
                by_key[key] = mask
            assert np.array_equal(mask, apply_class(q, gate, with_value(base, stage, value))), (stage, value)


# --------------------------------------------------------------------------- per-class blend, held apart


@pytest.fixture
def split_oof(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two members each exact on some classes and noise on the others: 'a' on large bowel, 'b' on the rest."""
    root = write_dataset(isolated_dirs / "data", {c: [0] for c in range(1, 5)}, n_slices=5)
    monkeypatch.setenv("DATA_DIR", str(root))
    spec = get_dataset("uwmgi")
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    rng = np.random.default_rng(3)
    for day in store.volume_ids:
        truth = np.asarray(store[day].mask, bool)
        exact = np.where(truth, 230, 0).astype(np.uint8)
        noise = rng.integers(0, 256, truth.shape).astype(np.uint8)
        a, b = noise.copy(), noise.copy()
        a[:, 0], b[:, 1:] = exact[:, 0], exact[:, 1:]
        write_member("a", {day: a}, {day: store[day].ids})
        write_member("b", {day: b}, {day: store[day].ids})
    return root


def test_per_class_blend_picks_each_class_member(split_oof: Path) -> None:
    tune = {
        "pixel_thresholds": (0.5,),
        "gate_thresholds": (0.0,),
        "min_component_sizes": (0,),
        "blend_steps": 2,
    }
    members = (MemberCfg(config="a"), MemberCfg(config="b"))
    per_class = EnsembleConfig(name="pc", members=members, tune=TuneCfg(**tune))
    decisions = read_decisions(
        "pc", run_tune(per_class, get_dataset("uwmgi"), split_oof, workers=2, progress=False)
    )
    assert decisions.weights == {
        "large_bowel": {"a": 1.0, "b": 0.0},
        "small_bowel": {"a": 0.0, "b": 1.0},
        "stomach": {"a": 0.0, "b": 1.0},
    }
    assert decisions.oof.score == pytest.approx(1.0)
    steps = {s["step"]: s for s in decisions.steps}
    assert max(steps["alone:a"]["score"], steps["alone:b"]["score"]) < 0.95
    assert decisions.oof.blend_gain.score > 0.05 and decisions.oof.blend_gain.held_out > 0.05
    assert set(decisions.curves["blend_raw"]) == {"members", *CLASSES}

    one = EnsembleConfig(name="one", members=members, tune=TuneCfg(**tune, per_class_blend=False))
    shared = read_decisions("one", run_tune(one, get_dataset("uwmgi"), split_oof, workers=2, progress=False))
    rows = list(shared.weights.values())
    assert all(r == rows[0] for r in rows) and shared.oof.score < decisions.oof.score


def test_split_volumes_holds_whole_groups_apart_seeded() -> None:
    from types import SimpleNamespace

    from pipeline.infer.tune import split_volumes

    days = [f"case{c}_day{d}" for c in range(10) for d in range(3)]
    oof = SimpleNamespace(volumes=days, groups={d: d.split("_")[0] for d in days})
    tuning, held, groups = split_volumes(oof, 0.3, seed=0)
    assert len(groups) == 3 and len(held) == 9 and sorted(tuning + held) == sorted(days)
    assert {d.split("_")[0] for d in held} == set(groups) and not set(groups) & {
        d.split("_")[0] for d in tuning
    }
    assert split_volumes(oof, 0.3, seed=0) == (tuning, held, groups)
    assert split_volumes(oof, 0.3, seed=1)[2] != groups
    assert split_volumes(oof, 0.0, seed=0) == (days, [], [])
    assert len(split_volumes(oof, 0.99, seed=0)[2]) == 9  # at least one group is left to tune on
    one_group = SimpleNamespace(volumes=days[:3], groups={d: "case0" for d in days[:3]})
    assert split_volumes(one_group, 0.5, seed=0) == (days[:3], [], [])


def test_held_out_scores_are_the_tuning_part_choices_on_held_days(planted_oof: Path) -> None:
    from pipeline.infer.ensemble import load_oof
    from pipeline.infer.evaluate import evaluate_settings
    from pipeline.infer.postprocess import ClassParams
    from pipeline.infer.tune import raw_params, split_volumes

    tune = TuneCfg(
        pixel_thresholds=(0.5, 0.65, 0.8),
        gate_thresholds=(0.0,),
        min_component_sizes=(0, 5),
        blend_steps=2,
        holdout=0.5,
        holdout_seed=3,
    )
    cfg = EnsembleConfig(name="held", members=(MemberCfg(config="good"), MemberCfg(config="bad")), tune=tune)
    decisions = read_decisions(
        "held", run_tune(cfg, get_dataset("uwmgi"), planted_oof, workers=2, progress=False)
    )
    oof = load_oof(cfg, get_dataset("uwmgi"), planted_oof, progress=False)
    tuning, held, groups = split_volumes(oof, 0.5, 3)
    h = decisions.holdout
    assert (h["groups"], h["days_held"], h["days_tuning"]) == (groups, len(held), len(tuning)) and len(
        groups
    ) == 2
    part = [ClassParams(**h["classes"][c]) for c in CLASSES]
    part_weights = np.array([[h["weights"][c][m] for m in ("good", "bad")] for c in CLASSES])
    raw_w = np.full((3, 2), 0.5)
    got = evaluate_settings(oof, [(raw_w, raw_params(3)), (part_weights, part)], held)
    steps = {s["step"]: s for s in decisions.steps}
    assert steps["raw"]["held_out"] == pytest.approx(got[0]["score"])
    assert steps["blend"]["held_out"] == pytest.approx(got[1]["score"]) == pytest.approx(h["held_score"])
    assert decisions.oof.held_out == pytest.approx(h["held_score"])
    gains = [s["held_gain"] for s in decisions.steps if s["step"] not in ("alone:good", "alone:bad", "raw")]
    assert sum(gains) == pytest.approx(steps["blend"]["held_out"] - steps["raw"]["held_out"])


def test_cv_report_shows_members_alone_held_out_and_new_stages(split_oof: Path) -> None:
    from pipeline.datasets import load_config
    from stages import cv

    config = split_oof.parent / "split_ensemble.yaml"
    config.write_text(
        "stage: ensemble\nmembers: [{config: a}, {config: b}]\nreport_slices: 1\n"
        "tune: {pixel_thresholds: [0.5], gate_thresholds: [0.0], min_component_sizes: [0],"
        " prob_gate_pixels: [0, 12], prob_gate_levels: [0.6], z_runs: [0, 2], blend_steps: 1, holdout: 0.5}\n"
    )
    cfg = load_config(str(config), stage="ensemble")
    tuned = read_decisions(
        "split_ensemble", run_tune(cfg, get_dataset("uwmgi"), split_oof, workers=2, progress=False)
    )
    report = cv.main(["--config", str(config), "--workers", "2"])
    steps = pd.read_csv(report / "cv_steps.csv")
    assert steps["step"].tolist()[:3] == ["alone:a", "alone:b", "raw"]
    assert steps["held_out"].notna().all() and steps["gap"].notna().all()
    assert steps["score"].tolist() == pytest.approx([s["score"] for s in tuned.steps])
    table = pd.read_csv(report / "cv_table.csv")
    assert {"w:a", "w:b", "prob_gate_pixels", "z_run"} <= set(table.columns)
    assert {"steps.png", "prob_gate.png", "z_run.png", "overlays.png"} <= {p.name for p in report.iterdir()}
