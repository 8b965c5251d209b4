"""Every stage's command line on every registered dataset's phantom, tiny and fast, end to end:
make_data -> folds -> train-det -> train-cls -> train-seg -> tune -> cv -> submit -> score -> kernel.

The datasets come from the registry: the built-in ones and the toy one written only in the tests
(``tests/toy_dataset.py``), which proves a fourth dataset is one module, its phantom and its configs.
A dataset's demo configs are ``<prefix>demo_<stage>.yaml`` under ``configs/`` (the toy's under
``tests/configs/``); a network stage without such a config is left out (the toy has no detector
and no classifier).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_kernel import fake_wheels

from pipeline.datasets import config_prefix, dataset_names, get_dataset
from pipeline.kaggle.bundle import ENTRY_TEMPLATE
from pipeline.paths import PROJECT_ROOT
from stages import cv, folds, kernel, make_data, score, submit, train_cls, train_det, train_seg, tune
from stages._cli import run_cli

CONFIG_DIRS = (PROJECT_ROOT / "configs", Path(__file__).parent / "configs")
FAST = [
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.batch_size=4",
    "train.val_batch_size=16",
    "data.img_size=[32,32]",
]
DET_FAST = ["det.epochs=1", "det.imgsz=32", "det.slices_per_volume=2", "det.predict_step=4"]


def demo_config(dataset: str, stage: str) -> str | None:
    """The dataset's demo config of ``stage``, or None when it has none."""
    name = f"{config_prefix(dataset)}demo_{stage}.yaml"
    return next((str(d / name) for d in CONFIG_DIRS if (d / name).is_file()), None)


@pytest.mark.parametrize("dataset", dataset_names())
def test_every_stage_cli_on_the_dataset(
    dataset: str, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    spec = get_dataset(dataset)
    root = isolated_dirs / dataset
    monkeypatch.setenv("DATASET", dataset)
    monkeypatch.setenv("DATA_DIR", str(root))
    make_data.main(["--dataset", dataset, "--preset", "tiny"])
    folds.main(["--config", "configs/folds.yaml", "--set", f"dataset={dataset}", "n_folds=2"])
    table = pd.read_csv(root / "folds.csv")
    assert table.groupby("group")["fold"].nunique().max() == 1  # no patient/subject in two folds

    det, cls, seg = (demo_config(dataset, stage) for stage in ("det", "cls", "seg"))
    assert seg is not None, f"{dataset} has no demo segmenter config"
    if det:
        assert (train_det.main(["--config", det, "--set", *DET_FAST]) / "boxes_train.csv").is_file()
    if cls:
        assert len(train_cls.main(["--config", cls, "--jobs", "1", "--set", *FAST])) == 2
    seg_runs = train_seg.main(["--config", seg, "--jobs", "1", "--set", *FAST])
    assert [p.name for p in seg_runs] == ["fold_0", "fold_1"]
    oof = sorted(p.stem for run in seg_runs for p in (run / "oof").glob("*.npz"))
    assert oof == sorted(set(table["volume_id"]))  # every volume out-of-fold exactly once

    ensemble = ["--config", demo_config(dataset, "ensemble") or "", "--set"]
    ensemble.append(f"members=[{{config: {Path(seg).stem}, weight: 1.0}}]")  # the one member trained here
    decisions = json.loads(tune.main(ensemble).read_text())
    assert decisions["dataset"] == dataset and list(decisions["classes"]) == list(spec.classes)
    report = cv.main(ensemble)
    assert (report / "cv_steps.csv").is_file() and (report / "overlays.png").is_file()

    out = isolated_dirs / "submission.csv"
    submit.main([*ensemble, "--out", str(out), "--force"])  # --force: a 1-step model may predict all-empty
    capsys.readouterr()
    result = score.main(["--submission", str(out), "--truth", str(root / spec.truth_file)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["dataset"] == dataset and last["score"] == pytest.approx(result["score"])
    assert 0.0 <= result["score"] <= 1.0

    fake_wheels(isolated_dirs / "wheels")
    bundle = kernel.main(["build", *ensemble, "--wheels-from", str(isolated_dirs / "wheels"),
                          "--out", str(isolated_dirs / "kaggle"), "--user", "someone"])  # fmt: skip
    meta = json.loads((bundle / "kernel" / "kernel-metadata.json").read_text())
    assert f"'dataset': '{dataset}'" in (bundle / "kernel" / ENTRY_TEMPLATE.name).read_text()
    kind, slug = spec.kaggle_source  # the real data: a competition, or a Kaggle dataset
    assert slug in meta["competition_sources" if kind == "competition" else "dataset_sources"]


def test_score_cli_refuses_a_bad_submission_in_one_line(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = isolated_dirs / "nerve"
    make_data.main(["--dataset", "nerve", "--out", str(root), "--preset", "tiny"])
    sub = isolated_dirs / "sub.csv"
    truth = pd.read_csv(root / "test_labels.csv", dtype=str, keep_default_na=False)
    truth[["img", "pixels"]].iloc[1:].to_csv(sub, index=False)
    capsys.readouterr()
    argv = ["--dataset", "nerve", "--submission", str(sub), "--truth", str(root / "test_labels.csv")]
    status = run_cli("score", score.main, [*argv, "--data-dir", str(root)])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("score: error: ") and "truth images have no row" in err[0]
