"""`make bench-scale`: growth exponents, nested subsets, planted predictions, per-process memory, a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.bench.growth import checks, extrapolate, growth_exponent, growth_table
from pipeline.bench.planted import STYLES, plant_gate, plant_probs, volume_rng
from pipeline.bench.scale import STAGES, BenchSettings, format_result, run_bench, run_child, write_result
from pipeline.phantoms import uwmgi as uwmgi_phantom
from pipeline.phantoms.uwmgi import Preset, generate_dataset, subset_cases, subset_dataset

TINY = Preset("bench_tiny", 4, 2, (1,), (1,), (10, 8))
FAST_TUNE = (
    "tune.pixel_thresholds=[0.4,0.5]",
    "tune.gate_thresholds=[0.0,0.3]",
    "tune.min_component_sizes=[0,50]",
    "tune.blend_steps=2",
    "report_slices=1",
)


# --------------------------------------------------------------------------- growth


def test_growth_exponent_recovers_a_planted_power_law() -> None:
    n = np.array([4000, 8000, 16000, 32000])
    assert growth_exponent(n, 3e-3 * n**1.5) == pytest.approx(1.5)
    assert growth_exponent(n, np.full(4, 7.0)) == pytest.approx(0.0, abs=1e-12)
    assert growth_exponent(n, 2.0 * n) == pytest.approx(1.0)
    assert np.isnan(growth_exponent([5000, 5000], [1.0, 2.0]))  # one size: no slope


def test_extrapolation_scales_the_largest_run_at_least_linearly() -> None:
    n = np.array([4000.0, 8000.0, 16000.0])
    assert extrapolate(n, 1e-2 * n**2, 32000) == pytest.approx(1e-2 * 32000**2)  # a power law: exact
    assert extrapolate(n, 2.0 * n, 8000) == 16000.0  # a size that was run: its measurement
    # tune's smallest scale ran a second sweep: the fit is flat, the projection stays linear from the largest
    bent = np.array([300.0, 360.0, 760.0])
    assert growth_exponent(n, bent) < 1
    assert extrapolate(n, bent, 32000, min_exponent=1.0) == pytest.approx(1520.0)
    assert extrapolate(n, np.full(3, 1.5), 32000) == pytest.approx(1.5)  # memory: flat stays flat
    assert np.isnan(extrapolate([4000], [1.0], 8000))


def test_growth_table_and_checks_flag_the_superlinear_stage() -> None:
    n_train, n_test = np.array([1000, 2000, 4000]), np.array([600, 1200, 2400])
    runs = pd.DataFrame(
        [{"stage": "tune", "scale": s, "n_slices": n, "n_mvox": n / 10, "work_s": 1e-4 * n**2, "peak_gib": 1.0}
         for s, n in zip((0.125, 0.25, 0.5), n_train)]
        + [{"stage": "submit", "scale": s, "n_slices": n, "n_mvox": n / 10, "work_s": 0.01 * n,
            "peak_gib": 0.8 + 1e-4 * n} for s, n in zip((0.125, 0.25, 0.5), n_test)]
    )  # fmt: skip
    full = {"train": {"slices": 8000, "mvox": 800.0}, "test": {"slices": 4800, "mvox": 480.0}}
    growth = growth_table(runs, full).set_index("stage")
    assert growth.loc["tune", "time_exponent"] == pytest.approx(2.0)
    assert growth.loc["tune", "time_exponent_voxels"] == pytest.approx(2.0)
    assert growth.loc["tune", "full_s"] == pytest.approx(1e-4 * 8000**2)  # test slices not used for tune
    assert growth.loc["submit", "time_exponent"] == pytest.approx(1.0)
    assert growth.loc["submit", "full_s"] == pytest.approx(48.0)
    assert growth.loc["submit", "full_slices"] == 4800
    assert growth.loc["submit", "rss_exponent"] > 0.05  # memory growing with n shows
    assert growth.loc["tune", "rss_exponent"] == pytest.approx(0.0, abs=1e-12)
    assert growth.loc["tune", "full_gib"] == pytest.approx(1.0)
    lines = checks(runs, growth.reset_index())
    assert any("faster than linear" in line and "tune" in line and "submit" not in line for line in lines)
    assert "tune at 1x: 6400 s (projected), OVER the 600 s limit" in lines


# --------------------------------------------------------------------------- data


def test_subsets_are_nested_and_hard_linked(tmp_path: Path) -> None:
    assert set(subset_cases(list(range(1, 41)), 0.25, 0)) <= set(subset_cases(list(range(1, 41)), 0.5, 0))
    assert len(subset_cases([3, 5], 0.1, 0)) == 1  # never empty
    base = tmp_path / "base"
    generate_dataset(base, TINY, seed=0)
    half = subset_dataset(base, tmp_path / "half", 0.5)
    whole = subset_dataset(base, tmp_path / "whole", 1.0)
    labels = pd.read_csv(base / "train.csv", dtype=str)
    assert whole["train"]["slices"] == labels["id"].nunique()
    assert 0 < half["train"]["slices"] < whole["train"]["slices"]
    half_cases = {p.name for p in (tmp_path / "half" / "train").iterdir()}
    assert half_cases < {p.name for p in (tmp_path / "whole" / "train").iterdir()}
    sub = pd.read_csv(tmp_path / "half" / "train.csv", dtype=str)
    assert set(sub["id"].str.extract(r"^(case\d+)_")[0]) == half_cases
    png = next((tmp_path / "half" / "train").rglob("*.png"))
    twin = base / png.relative_to(tmp_path / "half")
    assert png.stat().st_ino == twin.stat().st_ino  # a hard link, no second copy
    test_ids = set(pd.read_csv(tmp_path / "half" / "test_labels.csv", dtype=str)["id"])
    assert test_ids == set(pd.read_csv(tmp_path / "half" / "sample_submission.csv", dtype=str)["id"])
    stamp = (tmp_path / "half" / "dataset.json").stat().st_mtime_ns
    subset_dataset(base, tmp_path / "half", 0.5)  # same subset: kept as is
    assert (tmp_path / "half" / "dataset.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- planted predictions


def test_planted_members_follow_the_truth_and_differ() -> None:
    truth = np.zeros((6, 3, 64, 64), np.uint8)
    truth[1:5, 0, 20:40, 10:30] = 1
    truth[2:4, 2, 5:15, 40:60] = 1
    a = plant_probs(truth, STYLES[0], volume_rng("case1_day0", 0))
    again = plant_probs(truth, STYLES[0], volume_rng("case1_day0", 0))
    b = plant_probs(truth, STYLES[1], volume_rng("case1_day0", 1))
    assert a.dtype == np.uint8 and a.shape == truth.shape
    np.testing.assert_array_equal(a, again)  # seeded by the volume id
    assert not np.array_equal(a, b)
    for probs in (a, b):
        inside, outside = probs[truth == 1].mean(), probs[truth == 0].mean()
        assert inside > 100 > 10 > outside
    gate = plant_gate(truth, volume_rng("case1_day0", 2))
    present = truth.reshape(6, 3, -1).any(axis=2)
    assert gate.shape == (6, 3) and gate.dtype == np.float32
    assert gate[present].mean() > 0.6 > 0.4 > gate[~present].mean()


def test_child_peak_memory_is_its_own(tmp_path: Path) -> None:
    ballast = np.ones(400 * 2**20, np.uint8)  # this process is big: a child must not inherit its peak
    script = "import sys, numpy as np; from pipeline.bench.scale import peak_rss_gib; "
    big = [sys.executable, "-c", script + "a = np.ones(300 * 2**20, np.uint8); print(peak_rss_gib())"]
    small = [sys.executable, "-c", script + "print(peak_rss_gib())"]
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for command, name in ((big, "big"), (small, "small")):
        wall, status = run_child(command, env, tmp_path / f"{name}.log")
        assert status == 0 and wall > 0
    peak_big = float((tmp_path / "big.log").read_text())
    peak_small = float((tmp_path / "small.log").read_text())
    assert ballast.sum() > 0
    assert peak_big > 0.29  # GiB: the 300 MiB array
    assert peak_small < 0.25 < 0.39  # neither the parent's 400 MiB nor the previous child's
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "fail.log")[1] == 3


# --------------------------------------------------------------------------- end to end


def _settings(tmp_path: Path, scales: tuple[float, ...]) -> BenchSettings:
    return BenchSettings(
        root=tmp_path / "scale", preset=TINY.name, scales=scales, workers=1, n_folds=2, tune_set=FAST_TUNE
    )


def test_bench_runs_every_stage_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(uwmgi_phantom.PRESETS, TINY.name, TINY)
    result = run_bench(_settings(tmp_path, (1.0,)), progress=False)
    assert list(result.runs["stage"]) == list(STAGES)
    assert (result.runs["work_s"] > 0).all() and (result.runs["wall_s"] >= result.runs["work_s"]).all()
    assert (result.runs["peak_gib"] > 0.05).all()
    assert (result.runs.loc[result.runs["stage"].isin(["oof", "submit"]), "plant_s"] > 0).all()
    disk = result.disk.iloc[0]
    assert disk["volume_cache_gib"] > 0 and disk["oof_npz_gib"] > 0 and disk["oof_npy_gib"] > 0
    assert disk["oof_npy_gib"] > disk["oof_npz_gib"]  # the decoded cache is the uncompressed copy
    assert 0.5 < disk["oof_score"] <= 1 and 0.5 < disk["test_score"] <= 1  # planted predictions are good
    scale_dir = tmp_path / "scale" / f"{TINY.name}-1"
    assert not (scale_dir / "runs").exists() and not (scale_dir / "cache").exists()  # removed once measured
    sub = pd.read_csv(scale_dir / "submission.csv", dtype=str, keep_default_na=False)
    assert (sub["predicted"] != "").any()
    text = format_result(result)
    assert all(stage in text for stage in STAGES)
    written = write_result(tmp_path / "out", result)
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert json.loads((scale_dir / "logs" / "tune.json").read_text())["work_s"] > 0


@pytest.mark.slow
def test_bench_two_scales_give_exponents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(uwmgi_phantom.PRESETS, TINY.name, TINY)
    result = run_bench(_settings(tmp_path, (0.5, 1.0)), progress=False)
    assert result.runs.groupby("stage").size().eq(2).all()
    assert result.growth["time_exponent"].notna().all()
