"""`make status` on run folders built by hand in tmp (no training): an empty checkout, a fold killed
mid-epoch, a stale tune, a complete run; exit status 0, and neither torch nor an image reader loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import dump_config
from pipeline.datasets import load_config
from pipeline.paths import PROJECT_ROOT, run_dir
from pipeline.report.records import oof_files
from stages import status
from stages._cli import run_cli

ENSEMBLE = "configs/demo_ensemble_2d.yaml"  # demo_seg, gated by demo_cls, cropped by demo_det
FOLDS = {0: ["case1_day0", "case2_day0"], 1: ["case3_day0"]}


def write_data(root: Path) -> Path:
    (root / "train").mkdir(parents=True)
    rows = [
        {
            "id": f"{v}_slice_0001",
            "group": v.split("_")[0][4:],
            "volume_id": v,
            "slice": 1,
            "fold": k,
            "has_label": True,
        }
        for k, volumes in FOLDS.items()
        for v in volumes
    ]
    pd.DataFrame(rows).to_csv(root / "folds.csv", index=False)
    return root


def write_fold(
    stage: str, name: str, fold: int, epochs: int | None = None, *, best: bool = True, oof: bool = True
) -> Path:
    """A fold's files as training leaves them; ``epochs`` finished (default: all planned). The .pt files
    are junk: status must never load them."""
    cfg = load_config(name, stage=stage)
    done = cfg.train.epochs if epochs is None else epochs
    out = run_dir(stage, name, fold)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    metrics = pd.DataFrame({"epoch": range(1, done + 1), "train_loss": 0.5, "lr": 1e-3, "seconds": 2.0})
    metrics["score"] = [0.5 + 0.01 * e for e in metrics["epoch"]]
    metrics.to_csv(out / "metrics.csv", index=False)
    (out / "last.pt").write_bytes(b"not a checkpoint")
    if best:
        (out / "best.pt").write_bytes(b"not a checkpoint")
    if oof:
        for path in oof_files(stage, out, FOLDS[fold]):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    return out


def write_detector() -> None:
    det = run_dir("det", "demo_det")
    det.mkdir(parents=True)
    (det / "weights.pt").write_bytes(b"x")
    (det / "metrics.json").write_text(json.dumps({"mAP50": 0.9, "mAP50-95": 0.7}))


def trained_run(root: Path) -> None:
    write_data(root)
    write_detector()
    for fold in FOLDS:
        write_fold("cls", "demo_cls", fold)
        write_fold("seg", "demo_seg", fold)


def tuned(at: float, overrides: list[str] | None = None) -> Path:
    """postprocess.json and the resolved config make tune writes beside it (``overrides``: tuned with)."""
    path = run_dir("ensemble", "demo_ensemble_2d") / "postprocess.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "config.yaml").write_text(dump_config(load_config(ENSEMBLE, overrides, stage="ensemble")))
    path.write_text(
        json.dumps({"members": [{"config": "demo_seg"}], "oof": {"score": 0.81, "held_out": 0.79}})
    )
    os.utime(path, (at, at))
    return path


def ages(paths: list[Path], at: float) -> None:
    for p in paths:
        os.utime(p, (at, at))


def run(
    root: Path, capsys: pytest.CaptureFixture, submission: Path | None = None
) -> tuple[status.Status, str]:
    argv = [
        "--config",
        ENSEMBLE,
        "--data-dir",
        str(root),
        "--submission",
        str(submission or root / "sub.csv"),
    ]
    assert run_cli("status", status.main, argv, timed=False) == 0
    out = capsys.readouterr().out
    return status.main(argv), out


def rows(st: status.Status) -> dict[str, tuple[str, str]]:
    return {what: (state, detail) for what, state, detail in st.rows}


def test_empty_checkout_says_make_data(isolated_dirs: Path, capsys: pytest.CaptureFixture) -> None:
    st, out = run(isolated_dirs / "nothing", capsys)
    assert rows(st)["data"][0] == "missing" and st.next_command == "make data"
    assert (
        rows(st)["seg demo_seg"][0] == "not started" and rows(st)["tune (postprocess.json)"][0] == "missing"
    )
    assert "next: make data" in out


def test_fold_killed_mid_epoch_resumes_that_fold(isolated_dirs: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_data(isolated_dirs / "data")
    write_detector()
    for fold in FOLDS:
        write_fold("cls", "demo_cls", fold)
    write_fold("seg", "demo_seg", 0)
    write_fold(
        "seg", "demo_seg", 1, epochs=2, best=False, oof=False
    )  # killed during epoch 3: last.pt, no best/OOF
    st, out = run(root, capsys)
    assert rows(st)["folds.csv"] == ("present", "2 folds over 3 groups (3 volumes, 0 excluded)")
    assert rows(st)["cls demo_cls"][0] == "trained" and rows(st)["seg demo_seg"][0] == "incomplete"
    planned = load_config("demo_seg", stage="seg").train.epochs
    assert f"1/2 folds, {planned + 2}/{2 * planned} epochs" in rows(st)["seg demo_seg"][1]
    fold1 = next(r for r in st.folds if r[:2] == ("seg demo_seg", "1"))
    assert fold1[2:] == ("stopped", f"2/{planned}", "0.5200 (2)", "0/1")
    assert st.next_command == "make train-seg CONFIG=configs/demo_seg.yaml FOLDS=1"
    assert "resumes from last.pt" in st.why and "FOLDS=1" in out


def test_tune_older_than_an_oof_is_stale(isolated_dirs: Path, capsys: pytest.CaptureFixture) -> None:
    root = isolated_dirs / "data"
    trained_run(root)
    ages([p for p in isolated_dirs.rglob("*") if p.is_file()], 1_000)
    tuned(at=2_000)
    oof = list(run_dir("seg", "demo_seg").rglob("*.npz"))
    st, _ = run(root, capsys)
    assert rows(st)["tune (postprocess.json)"] == ("fresh", "OOF score 0.8100 (held apart 0.7900)")
    ages(oof[:1], 3_000)  # a fold's OOF written again after the tuning
    st, _ = run(root, capsys)
    state, detail = rows(st)["tune (postprocess.json)"]
    assert state == "stale" and "older than the OOF of demo_seg" in detail
    assert st.next_command == f"make tune ENSEMBLE={ENSEMBLE}"
    ages(oof[:1], 1_000)
    tuned(at=2_000, overrides=["tune.holdout=0.5"])  # tuned with other settings than the config's now
    state, detail = rows(run(root, capsys)[0])["tune (postprocess.json)"]
    assert state == "stale" and "the config's tune changed since make tune" in detail


def test_complete_run_has_nothing_to_run(isolated_dirs: Path, capsys: pytest.CaptureFixture) -> None:
    root = isolated_dirs / "data"
    trained_run(root)
    ages([p for p in isolated_dirs.rglob("*") if p.is_file()], 1_000)
    tuned(at=2_000)
    (root / "test").mkdir()
    (root / "test" / "placeholder").write_text("")  # the test folder holds something: a submission is due
    report = run_dir("ensemble", "demo_ensemble_2d") / "report"
    report.mkdir()
    st, _ = run(root, capsys, isolated_dirs / "sub.csv")
    assert st.next_command == f"make submit ENSEMBLE={ENSEMBLE} SUBMISSION={isolated_dirs / 'sub.csv'}"
    (isolated_dirs / "sub.csv").write_text("id,class,predicted\n")
    (report / "cv_table.csv").write_text("class\n")
    (report / "index.html").write_text("<html></html>")
    ages([isolated_dirs / "sub.csv", report / "cv_table.csv"], 3_000)
    ages([report / "index.html"], 4_000)
    st, out = run(root, capsys, isolated_dirs / "sub.csv")
    assert st.next_command is None and "nothing to run" in out
    assert {k: v[0] for k, v in rows(st).items()} == {
        "data": "present",
        "folds.csv": "present",
        "det demo_det": "trained",
        "cls demo_cls": "trained",
        "seg demo_seg": "trained",
        "tune (postprocess.json)": "fresh",
        "submission": "fresh",
        "report": "fresh",
    }
    ages([run_dir("seg", "demo_seg", 0) / "best.pt"], 5_000)  # a member retrained after the submission
    st, _ = run(root, capsys, isolated_dirs / "sub.csv")
    assert rows(st)["submission"][0] == "stale"


def test_oof_layout_matches_the_task_records(tmp_path: Path) -> None:
    from pipeline.train.tasks import CLS, SEG

    volumes = ["a", "b"]
    assert oof_files("seg", tmp_path, volumes) == SEG.oof_files(tmp_path, volumes)
    assert oof_files("cls", tmp_path, volumes) == CLS.oof_files(tmp_path, volumes)


def test_status_loads_no_model_and_decodes_no_image(isolated_dirs: Path) -> None:
    """torch is never imported (so no model can load), and a decoder called would fail the run."""
    root = isolated_dirs / "data"
    trained_run(root)
    (root / "test" / "case9" / "case9_day0" / "scans").mkdir(parents=True)
    image = root / "test" / "case9" / "case9_day0" / "scans" / "slice_0001_24_32_1.50_1.50.png"
    image.write_bytes(b"not a png")
    code = (
        "import sys, cv2\n"
        "def refuse(*a, **k): raise AssertionError('an image was decoded')\n"
        "cv2.imread = cv2.imdecode = refuse\n"
        "from stages import status\n"
        f"st = status.main(['--config', {ENSEMBLE!r}, '--data-dir', {str(root)!r}])\n"
        "print('torch' in sys.modules, [r[2] for r in st.rows if r[0] == 'data'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=os.environ, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("False [") and "test: 1 images" in out.stdout
