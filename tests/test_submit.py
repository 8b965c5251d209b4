"""`make submit` on toy members: row order, valid RLE, atomic writes, Kaggle behaviours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from layout import write_dataset, write_day

from pipeline.config import (
    CLASSES,
    DataCfg,
    EnsembleConfig,
    MemberCfg,
    ModelCfg,
    SegConfig,
    TTACfg,
    dump_config,
)
from pipeline.infer.postprocess import ClassParams, Decisions, DecisionsError, decisions_path, write_decisions
from pipeline.infer.submit import run_submit
from pipeline.io import write_text
from pipeline.metric import SubmissionError
from pipeline.models.segmenter import build_segmenter
from pipeline.paths import run_dir
from pipeline.rle import rle_decode

SEG = SegConfig(
    name="toy_seg",
    data=DataCfg(k=0, img_size=(32, 32), crop=False),
    model=ModelCfg(arch="Unet", encoder="tu-resnet10t", kwargs={"decoder_channels": [16, 16, 8, 8, 8]}),
)


@pytest.fixture
def toy(isolated_dirs: Path) -> tuple[EnsembleConfig, Path]:
    root = write_dataset(isolated_dirs / "data", {1: [0], 2: [0]}, n_slices=3)
    rows = []
    for case in (7, 8):
        rows += write_day(root, case, 0, n_slices=4, split="test")
    test = pd.DataFrame(rows)
    test.to_csv(root / "test_labels.csv", index=False)
    sample = test[["id", "class"]].assign(predicted="").sample(frac=1.0, random_state=0)  # any order
    sample.to_csv(root / "sample_submission.csv", index=False)
    torch.manual_seed(0)
    model = build_segmenter(SEG.model, in_channels=1)
    folder = run_dir("seg", SEG.name, 0)
    write_text(folder / "config.yaml", dump_config(SEG))
    torch.save({"model": model.state_dict(), "epoch": 1, "score": 0.0}, folder / "best.pt")
    cfg = EnsembleConfig(name="toy_ens", members=(MemberCfg(config="toy_seg"),), tta=TTACfg(hflip=True))
    decisions = Decisions(
        classes=dict.fromkeys(CLASSES, ClassParams(0.5, 0.0, 0)),
        weights={"toy_seg": 1.0},
        members=[{"config": "toy_seg", "folds": [0]}],
        ensemble="toy_ens",
    )
    write_decisions(decisions_path("toy_ens"), decisions)
    return cfg, root


def test_submission_has_sample_rows_in_order(toy, tmp_path: Path) -> None:
    cfg, root = toy
    out = run_submit(cfg, root, tmp_path / "submission.csv", device="cpu")
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "class", "predicted"]
    assert sub[["id", "class"]].equals(sample[["id", "class"]])
    assert (sub["predicted"] != "").any()  # an untrained net at threshold 0.5 predicts something
    for rle in sub["predicted"]:
        rle_decode(rle, (24, 32))


def test_failed_write_keeps_previous_file(toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, root = toy
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    out.write_text("previous\n")

    def broken(frame, rows, where, shapes=None):
        raise SubmissionError("simulated validation failure")

    monkeypatch.setattr("pipeline.infer.submit.validate_rows", broken)
    with pytest.raises(SubmissionError, match="simulated"):
        run_submit(cfg, root, out, device="cpu")
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv"]  # no temporary left


def test_empty_test_folder_and_debug_train_days(toy, tmp_path: Path) -> None:
    cfg, root = toy
    import shutil

    shutil.rmtree(root / "test")
    out = run_submit(cfg, root, tmp_path / "empty.csv", device="cpu")
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(sub) == 8 * 3 and (sub["predicted"] == "").all()
    (root / "sample_submission.csv").write_text("id,class,predicted\n")  # the public Kaggle page
    assert pd.read_csv(run_submit(cfg, root, tmp_path / "header.csv", device="cpu")).empty
    debug = pd.read_csv(run_submit(cfg, root, tmp_path / "debug.csv", debug_train_days=1, device="cpu"))
    assert set(debug["id"].str.slice(0, 10)) == {"case1_day0"} and len(debug) == 3 * 3


def test_missing_decisions_say_run_make_tune(toy, tmp_path: Path) -> None:
    cfg, root = toy
    decisions_path("toy_ens").unlink()
    with pytest.raises(DecisionsError, match="make tune"):
        run_submit(cfg, root, tmp_path / "s.csv", device="cpu")
    assert not (tmp_path / "s.csv").exists()


def test_bench_infer_reports_rates_and_projection(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages import bench_infer

    monkeypatch.setenv("DATA_DIR", str(isolated_dirs / "nodata"))
    result = bench_infer.main(["--slices", "2", "--repeats", "1", "--device", "cpu"])
    assert set(result["per_model_fold"]) == {"seg:demo_seg", "cls:demo_cls"}
    assert all(r["no_tta"] > 0 and r["tta"] > 0 for r in result["per_model_fold"].values())
    assert min(result["projection_s_per_slice"].values()) > 0
    assert result["end_to_end"] == {}  # nothing tuned in this folder
