"""Folds are case-disjoint, stratified, seeded and written once; 2.5D stacks clamp at the ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layout import write_dataset

from pipeline.data.folds import fold_numbers, fold_volumes, make_folds, read_folds
from pipeline.data.stack import neighbour_indices
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import load_split
from pipeline.errors import DataError
from stages import folds as folds_stage

SPEC = get_dataset("uwmgi")


def _has_label(catalog: pd.DataFrame) -> np.ndarray:
    return SPEC.presence(catalog).loc[catalog["id"]].to_numpy().any(axis=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    return write_dataset(root, {c: [0, 1] for c in range(1, 11)} | {7: [0, 5]}, n_slices=4, shape=(16, 16))


def test_folds_case_disjoint_and_seeded(dataset: Path) -> None:
    catalog = load_split(dataset, "train")
    has_label = _has_label(catalog)
    folds = make_folds(catalog, has_label, n_folds=5, seed=3, exclude_volumes=("case7_day0", "case99_day1"))
    assert set(folds["id"]) == set(catalog["id"])
    assert (folds.loc[folds["volume_id"] == "case7_day0", "fold"] == -1).all()
    used = folds[folds["fold"] >= 0]
    assert used.groupby("group")["fold"].nunique().max() == 1
    assert sorted(used["fold"].unique()) == [0, 1, 2, 3, 4]
    again = make_folds(catalog, has_label, n_folds=5, seed=3, exclude_volumes=("case7_day0",))
    pd.testing.assert_frame_equal(folds, again)
    other = make_folds(catalog, has_label, n_folds=5, seed=4, exclude_volumes=("case7_day0",))
    assert not other["fold"].equals(folds["fold"])
    train, val = fold_volumes(folds, 2)
    assert not set(train) & set(val) and "case7_day0" not in train + val
    assert set(fold_volumes(folds, "all")[0]) == set(used["volume_id"])


def test_too_few_cases(dataset: Path) -> None:
    catalog = load_split(dataset, "train")
    with pytest.raises(DataError, match="cannot make 20 group-disjoint folds"):
        make_folds(catalog, _has_label(catalog), n_folds=20, seed=0)


def test_folds_stage_writes_once(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", str(dataset))
    with pytest.raises(DataError, match="Run `make folds`"):
        read_folds(dataset)
    out = folds_stage.main([])
    first = out.read_bytes()
    written = read_folds(dataset)  # uwmgi's defaults exclude its faulty case7_day0
    assert (written.loc[written["volume_id"] == "case7_day0", "fold"] == -1).all()
    folds_stage.main(["--set", "seed=9"])  # exists: kept
    assert out.read_bytes() == first
    folds_stage.main(["--set", "seed=9", "--force"])
    assert out.read_bytes() != first
    assert set(read_folds(dataset).columns) >= {"id", "group", "volume_id", "fold", "has_label"}
    assert fold_numbers(read_folds(dataset)) == [0, 1, 2, 3, 4]
    again = out.read_bytes()
    with pytest.raises(SystemExit, match=r"holds 5 folds but configs/demo_folds\.yaml asks for 4"):
        folds_stage.main(["--config", "configs/demo_folds.yaml"])  # runs would mix two splits
    assert out.read_bytes() == again
    folds_stage.main(["--config", "configs/demo_folds.yaml", "--force"])
    assert fold_numbers(read_folds(dataset)) == [0, 1, 2, 3]


def test_neighbour_indices_clamp() -> None:
    idx = neighbour_indices(5, k=1, stride=2)
    np.testing.assert_array_equal(idx, [[0, 0, 2], [0, 1, 3], [0, 2, 4], [1, 3, 4], [2, 4, 4]])
    assert neighbour_indices(3, k=0, stride=1).tolist() == [[0], [1], [2]]
    with pytest.raises(ValueError):
        neighbour_indices(3, k=1, stride=0)


def test_stack_matches_brute_force() -> None:
    volume = np.random.default_rng(0).integers(0, 100, size=(7, 3, 4)).astype(np.uint16)
    full = volume[neighbour_indices(len(volume), k=2, stride=2)]
    assert full.shape == (7, 5, 3, 4)
    for i in range(7):
        expect = np.stack([volume[min(max(i + o, 0), 6)] for o in (-4, -2, 0, 2, 4)])
        np.testing.assert_array_equal(full[i], expect)
