"""Every stage's command line on the LGG and Ultrasound Nerve phantoms, tiny and fast, end to end:
make_data -> folds -> train-det -> train-cls -> train-seg -> tune -> cv -> submit -> score -> kernel.

UW-Madison runs the same stages in test_train_stages, test_tune, test_submit and test_kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_kernel import fake_wheels

from stages import cv, folds, kernel, make_data, score, submit, train_cls, train_det, train_seg, tune
from stages._cli import run_cli

FAST = [
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.batch_size=4",
    "train.val_batch_size=16",
    "data.img_size=[32,32]",
]
DET_FAST = ["det.epochs=1", "det.imgsz=32", "det.slices_per_day=2", "det.predict_step=4"]


@pytest.mark.parametrize("dataset", ["lgg", "nerve"])
def test_every_stage_cli_on_the_dataset(
    dataset: str, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = isolated_dirs / dataset
    monkeypatch.setenv("DATASET", dataset)
    monkeypatch.setenv("DATA_DIR", str(root))
    make_data.main(["--dataset", dataset, "--preset", "tiny"])
    folds.main(["--config", "configs/folds.yaml", "--set", f"dataset={dataset}", "n_folds=2"])
    table = pd.read_csv(root / "folds.csv")
    assert table.groupby("group")["fold"].nunique().max() == 1  # no patient/subject in two folds

    det = train_det.main(["--config", f"configs/{dataset}_demo_det.yaml", "--set", *DET_FAST])
    assert (det / "boxes_train.csv").is_file()
    crop = [] if dataset == "lgg" else ["data.crop=false"]  # the nerve frames are used whole
    cls_runs = train_cls.main(
        ["--config", f"configs/{dataset}_demo_cls.yaml", "--jobs", "1", "--set", *FAST, *crop]
    )
    seg_runs = train_seg.main(
        ["--config", f"configs/{dataset}_demo_seg.yaml", "--jobs", "1", "--set", *FAST, *crop]
    )
    assert [p.name for p in seg_runs] == ["fold_0", "fold_1"] and len(cls_runs) == 2
    oof = sorted(p.stem for run in seg_runs for p in (run / "oof").glob("*.npz"))
    assert oof == sorted(set(table["volume_id"]))  # every volume out-of-fold exactly once

    ensemble = f"configs/{dataset}_demo_ensemble.yaml"
    decisions = json.loads(tune.main(["--config", ensemble]).read_text())
    assert decisions["dataset"] == dataset and list(decisions["classes"]) == (
        ["tumour"] if dataset == "lgg" else ["nerve"]
    )
    report = cv.main(["--config", ensemble])
    assert (report / "cv_steps.csv").is_file() and (report / "overlays.png").is_file()

    out = isolated_dirs / "submission.csv"
    submit.main(
        ["--config", ensemble, "--out", str(out), "--force"]
    )  # --force: a 1-step model may predict all-empty
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    if dataset == "lgg":
        assert list(written.columns) == ["id", "predicted"]
        assert len(list((isolated_dirs / "submission_masks").rglob("*_mask.tif"))) == len(written)
    else:
        assert list(written.columns) == ["img", "pixels"]
        sample = pd.read_csv(root / "sample_submission.csv", dtype=str, keep_default_na=False)
        assert written["img"].tolist() == sample["img"].tolist()
    capsys.readouterr()
    result = score.main(["--submission", str(out), "--truth", str(root / "test_labels.csv")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["dataset"] == dataset and last["score"] == pytest.approx(result["score"])
    assert 0.0 <= result["score"] <= 1.0

    fake_wheels(isolated_dirs / "wheels")
    bundle = kernel.main(["build", "--config", ensemble, "--wheels-from", str(isolated_dirs / "wheels"),
                          "--out", str(isolated_dirs / "kaggle"), "--user", "someone"])  # fmt: skip
    meta = json.loads((bundle / "kernel" / "kernel-metadata.json").read_text())
    entry = (bundle / "kernel" / "gi_tract_submit.py").read_text()
    assert f"'dataset': '{dataset}'" in entry
    if dataset == "lgg":  # a Kaggle dataset, not a competition
        assert (
            meta["competition_sources"] == []
            and "mateuszbuda/lgg-mri-segmentation" in meta["dataset_sources"]
        )
    else:
        assert meta["competition_sources"] == ["ultrasound-nerve-segmentation"]


def test_score_cli_refuses_a_bad_submission_in_one_line(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = isolated_dirs / "nerve"
    make_data.main(["--dataset", "nerve", "--out", str(root), "--preset", "tiny"])
    sub = isolated_dirs / "sub.csv"
    truth = pd.read_csv(root / "test_labels.csv", dtype=str, keep_default_na=False)
    truth[["img", "pixels"]].iloc[1:].to_csv(sub, index=False)
    capsys.readouterr()
    status = run_cli(
        "score",
        score.main,
        [
            "--dataset",
            "nerve",
            "--submission",
            str(sub),
            "--truth",
            str(root / "test_labels.csv"),
            "--data-dir",
            str(root),
        ],
    )
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("score: error: ") and "truth images have no row" in err[0]
