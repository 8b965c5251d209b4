"""The dataset contract: a plug-in with a gap fails when its class is defined; one defined outside
``pipeline/datasets`` joins the registry (``register``, or ``$DATASET_MODULES`` for a stage run from
the command line); the toy dataset of the tests scores its own answers as 1.0. Every stage on the toy
dataset runs in test_dataset_stages (parametrized over the registry)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import toy_dataset

from pipeline import datasets
from pipeline.config import ConfigError
from pipeline.data.volumes import Volume
from pipeline.datasets import dataset_names, get_dataset, register
from pipeline.datasets.base import ContractError, DatasetSpec
from pipeline.paths import PROJECT_ROOT
from pipeline.rle import rle_decode, rle_encode_numpy


class _Half(toy_dataset.Toy, abstract=True):
    """A base of other plug-ins may leave methods out (``abstract=True``)."""

    scan = DatasetSpec.scan  # the abstract one again


def test_a_missing_method_fails_when_the_class_is_defined() -> None:
    with pytest.raises(ContractError, match=r"Broken does not write scan \(the abstract methods"):

        class Broken(_Half):
            name: ClassVar[str] = "broken"

    class Whole(_Half):
        name: ClassVar[str] = "whole"

        def scan(self, root: Path, split: str = "train") -> pd.DataFrame:
            return toy_dataset.scan_toy(root, split)

    assert Whole().name == "whole"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rle_order", "K", r"rle_order = 'K' must be 'C' \(row-major\) or 'F'"),
        ("classes", ("a", "a"), "classes = .* must be a tuple of distinct class names"),
        ("channels", 0, "channels = 0 must be an int >= 1"),
        ("name", "Toy Two", "name = 'Toy Two' must be a lower-case identifier"),
        ("metric_keys", ("dice",), "metric_keys = .* 'score' first"),
        ("config_defaults", {"train": {}}, "config_defaults = .* stages among"),
        ("kaggle_source", ("kernel", "x"), "kaggle_source = .* kind one of"),
    ],
)
def test_a_wrong_declaration_fails_naming_it(key: str, value: Any, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        type("Wrong", (toy_dataset.Toy,), {key: value, "name": "wrong"} if key != "name" else {key: value})


def test_register_refuses_a_taken_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_registered", dict(datasets._registered))  # leave the registry as it was
    assert register(toy_dataset.DATASET) is toy_dataset.DATASET  # the same spec again: fine
    with pytest.raises(ContractError, match="dataset name 'toy' is taken"):
        register(toy_dataset.Toy())
    with pytest.raises(ContractError, match="dataset name 'uwmgi' is taken"):
        register(type("Uw", (toy_dataset.Toy,), {"name": "uwmgi"})())


def test_a_module_named_in_DATASET_MODULES_joins_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shapes_plugin.py").write_text(
        "from toy_dataset import Toy\n\n\nclass Shapes(Toy):\n    name = 'shapes'\n\n\nDATASET = Shapes()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(datasets, "_registered", dict(datasets._registered))
    monkeypatch.setenv("DATASET_MODULES", "shapes_plugin")
    assert get_dataset("shapes").name == "shapes" and "shapes" in dataset_names()
    monkeypatch.setenv("DATASET_MODULES", "no_such_plugin")
    with pytest.raises(ConfigError, match="DATASET_MODULES names 'no_such_plugin'"):
        get_dataset("brats")


def test_a_stage_on_the_command_line_finds_the_toy_dataset(tmp_path: Path) -> None:
    """``python -m stages.folds`` in a fresh process: the toy module named in $DATASET_MODULES."""
    toy_dataset.generate(tmp_path / "toy", "tiny", seed=0)
    env = {
        **os.environ,
        "DATASET_MODULES": "toy_dataset",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(PROJECT_ROOT)]),
        "DATASET": "toy",
        "DATA_DIR": str(tmp_path / "toy"),
    }
    argv = [sys.executable, "-m", "stages.folds", "--set", "dataset=toy", "n_folds=2"]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    folds = pd.read_csv(tmp_path / "toy" / "folds.csv")
    assert sorted(set(folds["fold"])) == [0, 1] and len(folds) == 36


def test_the_toy_answers_score_one_and_an_empty_submission_less(tmp_path: Path) -> None:
    spec = get_dataset("toy")
    root = tmp_path / "toy"
    spec.phantom().generate(root, "tiny", seed=1)
    catalog = spec.prediction_catalog(root)
    answers = pd.read_csv(root / spec.truth_file, dtype=str, keep_default_na=False).set_index("id")
    scores = []
    for name, truth in (("perfect", True), ("empty", False)):
        writer = spec.submission_writer(root, tmp_path / f"{name}.csv", catalog, _encode)
        for volume_id, rows in catalog.groupby("volume_id", sort=False):
            shape = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
            masks = np.stack(
                [[rle_decode(answers.at[i, c], shape, "F") for c in spec.classes] for i in rows["id"]]
            )
            image = np.zeros((len(rows), *shape), np.uint8)
            writer.add(Volume(volume_id, list(rows["id"]), image, None, (1, 1)), masks * truth)
        result = spec.score_files(writer.finish(), root / spec.truth_file, root)
        scores.append(result["score"])
        assert set(result["per_class"]) == set(spec.classes)
    assert scores[0] == 1.0 and scores[1] < 1.0


def _encode(masks: np.ndarray, order: str) -> list[str]:
    return [rle_encode_numpy(m, order) for m in masks]
