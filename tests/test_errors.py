"""Bad input through the stage command lines: one line ``<stage>: error: <message>``, exit status 2,
a traceback only with --debug / DEBUG=1; config values refused at load; checkpoints that do not load;
two runs writing one run folder. docs/ERRORS.md lists these cases with their messages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from layout import write_dataset

from pipeline.config import ConfigError, load_config
from pipeline.data.folds import make_folds
from pipeline.datasets import get_dataset
from pipeline.errors import CheckpointError, DataError, RunLockedError
from pipeline.io import run_lock, write_csv
from pipeline.train.checkpoint import load_weights, save
from stages import folds, score, submit, train_seg
from stages._cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "train.epochs=1",
    "train.max_steps_per_epoch=1",
    "train.batch_size=2",
    "data.img_size=[32,32]",
    "data.crop=false",
]


def one_line_error(capsys: pytest.CaptureFixture, stage: str, main, argv: list[str]) -> str:
    """Run a stage like ``python -m`` does; assert exit 2 and one stderr line; return the message."""
    capsys.readouterr()
    assert run_cli(stage, main, argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{stage}: error: ")]
    assert len(errors) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    return errors[0]


@pytest.fixture
def tiny_uw(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four tiny UW-Madison cases with folds, as DATA_DIR."""
    root = write_dataset(isolated_dirs / "uw", {1: [0], 2: [0], 3: [0], 4: [0]}, n_slices=4)
    spec = get_dataset("uwmgi")
    catalog = spec.load_split(root, "train")
    has_label = spec.presence(catalog).loc[catalog["id"]].to_numpy().any(axis=1)
    write_csv(root / "folds.csv", make_folds(catalog, has_label, n_folds=2, seed=0))
    monkeypatch.setenv("DATA_DIR", str(root))
    monkeypatch.delenv("DEBUG", raising=False)
    return root


# --------------------------------------------------------------------------- config values at load


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lr=-1", "'train.lr' = -1.0 must be > 0"),
        ("train.epochs=0", "'train.epochs' = 0 must be >= 1"),
        ("train.device=gpu", "'train.device' = 'gpu' must be auto, cpu, cuda or cuda:<index>"),
        (
            "data.img_size=[100,128]",
            r"'data.img_size' = \[100, 128\] must be multiples of 32, the stride of FPN/tu-resnet10t",
        ),
        ("data.resize=crop", "'data.resize' = 'crop' must be one of resize, pad"),
        ("data.k=-1", "'data.k' = -1 must be >= 0"),
        ("train.min_lr_ratio=2", r"'train.min_lr_ratio' = 2.0 must be in \[0, 1\]"),
        ("model.dropout=1", r"'model.dropout' = 1.0 must be in \[0, 1\)"),
        ("train.epochs=abc", "'train.epochs': expected an integer, got 'abc'"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_file_key_value(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"configs/demo_seg.yaml: config key " + needle):
        load_config("configs/demo_seg.yaml", [override])


def test_ensemble_and_detector_values_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'tune.pixel_thresholds' = .* item 1 \(1.5\) must be in \[0, 1\]"):
        load_config("demo_ensemble", ["tune.pixel_thresholds=[0.5,1.5]"])
    with pytest.raises(ConfigError, match=r"'tta.scales' = \[0.0\] item 0 \(0.0\) must be > 0"):
        load_config("demo_ensemble", ["tta.scales=[0.0]"])
    with pytest.raises(ConfigError, match=r"'members\[0\].weight' = -1.0 must be >= 0"):
        load_config("demo_ensemble", ["members=[{config: demo_seg, weight: -1}]"])
    with pytest.raises(ConfigError, match=r"'det.imgsz' = 100 must be a multiple of 32"):
        load_config("demo_det", ["det.imgsz=100"])
    with pytest.raises(ConfigError, match="'n_folds' = 1 must be >= 2"):
        load_config("folds", ["n_folds=1"])


def test_every_shipped_config_passes_its_checks() -> None:
    from pipeline.datasets import load_config as load_with_defaults

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_with_defaults(path)


# --------------------------------------------------------------------------- one line per stage


def test_bad_config_value_is_one_line_before_any_data(tiny_uw: Path, capsys: pytest.CaptureFixture) -> None:
    line = one_line_error(
        capsys, "train_seg", train_seg.main, ["--config", "demo_seg", "--set", "train.lr=-1"]
    )
    assert "configs/demo_seg.yaml: config key 'train.lr' = -1.0 must be > 0" in line
    assert not (tiny_uw.parent / "cache").exists()  # refused before the volumes were read


def test_missing_folds_and_dataset_are_one_line(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("DATA_DIR", str(isolated_dirs / "nothing"))
    line = one_line_error(capsys, "train_seg", train_seg.main, ["--config", "demo_seg", "--set", *FAST])
    assert "folds file not found" in line and "make folds" in line
    line = one_line_error(capsys, "folds", folds.main, ["--config", "folds"])
    assert "make data" in line


@pytest.mark.parametrize(
    "damage",
    ["corrupt_png", "missing_png", "wrong_size", "rle_out_of_bounds", "rle_overlapping", "unknown_class"],
)
def test_damaged_inputs_are_one_line_naming_the_file(
    tiny_uw: Path, damage: str, capsys: pytest.CaptureFixture
) -> None:
    pngs = sorted((tiny_uw / "train").rglob("*.png"))
    labels = pd.read_csv(tiny_uw / "train.csv", dtype=str, keep_default_na=False)
    if damage == "corrupt_png":
        pngs[0].write_bytes(b"\x89PNG broken")
        needle = re.escape(f"unreadable (not a PNG, or truncated): {pngs[0]}")
    elif damage == "missing_png":
        pngs[1].unlink()
        needle = "labelled ids have no image"
    elif damage == "wrong_size":
        cv2.imwrite(str(pngs[2]), np.zeros((10, 10), np.uint16))
        needle = re.escape(f"{pngs[2]}: image is 10x10 but its file name says 32x24")
    elif damage == "rle_out_of_bounds":
        labels.loc[0, "segmentation"] = "760 20"
        labels.to_csv(tiny_uw / "train.csv", index=False)
        needle = r"train.csv \(case1_day0_slice_0001, large_bowel\).*760"
    elif damage == "rle_overlapping":
        labels.loc[0, "segmentation"] = "10 5 12 3"
        labels.to_csv(tiny_uw / "train.csv", index=False)
        needle = r"train.csv \(case1_day0_slice_0001, large_bowel\).*(overlap|order)"
    else:
        labels.loc[3, "class"] = "liver"
        labels.to_csv(tiny_uw / "train.csv", index=False)
        needle = "row 5: unknown class 'liver'"
    line = one_line_error(
        capsys, "train_seg", train_seg.main, ["--config", "demo_seg", "--folds", "0", "--set", *FAST]
    )
    assert re.search(needle, line), line


def test_bad_submission_and_missing_decisions_are_one_line(
    tiny_uw: Path, capsys: pytest.CaptureFixture
) -> None:
    line = one_line_error(
        capsys, "submit", submit.main, ["--config", "demo_ensemble", "--out", str(tiny_uw / "s.csv")]
    )
    assert "postprocess.json" in line and "make tune" in line
    truth = pd.read_csv(tiny_uw / "train.csv", dtype=str, keep_default_na=False)
    truth.rename(columns={"segmentation": "predicted"}).iloc[3:].to_csv(tiny_uw / "sub.csv", index=False)
    argv = [
        "--dataset",
        "uwmgi",
        "--submission",
        str(tiny_uw / "sub.csv"),
        "--truth",
        str(tiny_uw / "train.csv"),
    ]
    line = one_line_error(capsys, "score", score.main, argv)
    assert "submission lacks 3 (id, class) rows" in line


def test_debug_shows_the_traceback(tiny_uw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError):
        run_cli("train_seg", train_seg.main, ["--config", "demo_seg", "--set", "train.lr=-1", "--debug"])
    monkeypatch.setenv("DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli("train_seg", train_seg.main, ["--config", "demo_seg", "--set", "train.lr=-1"])


def test_python_dash_m_prints_one_line_and_exits_2(isolated_dirs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DEBUG"}
    run = subprocess.run(
        [sys.executable, "-m", "stages.train_seg", "--config", "demo_seg", "--set", "train.lr=-1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train_seg: error: ")
    assert lines[0].endswith("configs/demo_seg.yaml: config key 'train.lr' = -1.0 must be > 0")


def test_unexpected_exceptions_keep_their_traceback() -> None:
    def broken(argv: list[str]) -> None:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_cli("tune", broken, [])


# --------------------------------------------------------------------------- checkpoints and run folders


def test_corrupt_checkpoint_names_path_run_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "seg" / "demo_seg" / "fold_2" / "best.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(CheckpointError) as info:
        load_weights(path, torch.nn.Linear(2, 2))
    message = str(info.value)
    assert str(path) in message and "does not load" in message
    assert "run " + str(path.parent) in message
    assert "make train-seg CONFIG=configs/demo_seg.yaml FOLDS=2" in message
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*fold_2/last.pt"):
        load_weights(path.with_name("last.pt"), torch.nn.Linear(2, 2))


def test_checkpoint_of_another_architecture_says_which_keys(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "cls" / "demo_cls" / "fold_0" / "best.pt"
    save(path, {"model": torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)).state_dict()})
    model = torch.nn.Sequential(torch.nn.Linear(2, 4))
    with pytest.raises(CheckpointError) as info:
        load_weights(path, model)
    message = str(info.value)
    assert "another architecture" in message
    assert "2 unexpected: 1.weight, 1.bias" in message
    assert "0.weight (3, 2) vs (4, 2)" in message
    assert "make train-cls CONFIG_CLS=configs/demo_cls.yaml FOLDS=0" in message


def test_second_writer_of_a_run_folder_stops_naming_folder_and_process(
    tiny_uw: Path, isolated_dirs: Path, capsys
) -> None:
    folder = isolated_dirs / "runs" / "seg" / "demo_seg" / "fold_0"
    with run_lock(folder):
        with (
            pytest.raises(
                RunLockedError, match=f"{folder} is being written by another process \\(pid {os.getpid()}"
            ),
            run_lock(folder),
        ):
            pass
        line = one_line_error(
            capsys, "train_seg", train_seg.main, ["--config", "demo_seg", "--folds", "0", "--set", *FAST]
        )
        assert f"{folder} is being written by another process (pid {os.getpid()}" in line
        assert not (folder / "last.pt").exists()  # nothing was written by the refused run
    with run_lock(folder):  # released with the first holder
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    code = f"from pipeline.io import run_lock; import os\nwith run_lock({str(folder)!r}):\n    os._exit(9)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert run.returncode == 9 and (folder / ".lock").is_file()
    with run_lock(folder):
        pass


def test_data_error_of_the_catalog_names_the_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a readable CSV|missing columns"):
        (tmp_path / "train_masks.csv").write_text("subject;img\n1;2\n")
        get_dataset("nerve").load_split(_nerve_one_image(tmp_path), "train")


def _nerve_one_image(root: Path) -> Path:
    import tifffile

    (root / "train").mkdir(exist_ok=True)
    tifffile.imwrite(root / "train" / "1_1.tif", np.zeros((8, 8), np.uint8))
    return root


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.arch=Unett", "model.arch 'Unett' is not a known architecture; valid: Unet, UnetPlusPlus"),
        (
            "model.encoder=tu-resnet10tt",
            "model.encoder 'tu-resnet10tt' is not a timm model; did you mean resnet10t",
        ),
        ("model.encoder=resnet35", "model.encoder 'resnet35' is not an smp encoder; did you mean"),
    ],
)
def test_unknown_architecture_or_encoder_is_one_line_before_data(
    tiny_uw: Path, override: str, needle: str, capsys: pytest.CaptureFixture
) -> None:
    line = one_line_error(capsys, "train_seg", train_seg.main, ["--config", "demo_seg", "--set", override])
    assert "demo_seg" in line and needle in line
    assert not (tiny_uw.parent / "cache").exists()
