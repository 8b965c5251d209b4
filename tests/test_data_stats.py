"""`make data-stats`: the figures of a dataset folder against brute-force counts, and the stage's table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from pipeline.data.images import read_tiff
from pipeline.data.stats import DataStats, dataset_stats, format_table, mask_geometry, pct, ring_contrast
from pipeline.datasets import dataset_names, get_dataset
from pipeline.datasets.lgg_figures import head_mask, solidity
from pipeline.errors import DataError
from pipeline.phantoms.lgg import generate_lgg
from pipeline.phantoms.nerve import generate_nerve
from pipeline.rle import rle_decode, rle_encode
from stages import data_stats
from stages._cli import run_cli


@pytest.fixture(scope="module")
def lgg_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "lgg"
    generate_lgg(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="module")
def nerve_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "nerve"
    generate_nerve(root, "tiny", seed=0)
    return root


# --------------------------------------------------------------------------- the pieces


def test_mask_geometry_is_the_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((5, 30, 40)) < 0.02
    masks[:, 3:9, 20:31] = True
    for mask, (area, height, width, row, col) in zip(masks, mask_geometry(masks)):
        rows, cols = np.nonzero(mask)
        assert area == len(rows) and height == rows.max() - rows.min() + 1
        assert width == cols.max() - cols.min() + 1
        assert row == pytest.approx(rows.mean()) and col == pytest.approx(cols.mean())


def test_solidity_of_known_shapes() -> None:
    square = np.zeros((40, 40), bool)
    square[10:30, 10:30] = True
    assert solidity(square) == 1.0
    corner = square.copy()
    corner[10:20, 20:30] = False  # an L: three 10x10 blocks, the hull cuts one triangle of ~50 px
    assert 300 / 360 < solidity(corner) < 300 / 330
    dots = np.zeros((40, 40), bool)
    dots[5, 5] = dots[34, 34] = True
    assert solidity(dots) < 0.1


def test_ring_contrast_and_head_mask() -> None:
    image = np.where(np.indices((60, 60)).sum(axis=0) % 2 == 0, 90.0, 110.0)  # mean 100, std 10
    mask = np.zeros((60, 60), bool)
    mask[25:35, 25:35] = True
    image[mask] = 150
    ratio, cnr = ring_contrast(image, mask)
    assert ratio == pytest.approx(1.5) and cnr == pytest.approx(5.0)

    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 < 26**2
    flair = np.where(disc, 60, 0).astype(np.uint8)
    flair[((yy - 32) ** 2 + (xx - 30) ** 2 > 22**2) & disc] = 2  # a dark skull inside the scalp
    flair[((yy - 32) ** 2 + (xx - 30) ** 2 > 24**2) & disc] = 200  # the bright scalp
    flair[1:3, 60:63] = 90  # a speck outside the head
    head = head_mask(flair)
    assert not head[1:3, 60:63].any() and head[32, 30]
    grown = (yy - 32) ** 2 + (xx - 30) ** 2 < 30**2  # the blur widens the outline a little
    assert (head >= disc).all() and (head <= grown).all()  # the dark skull filled in


def test_percentiles_and_table_of_empty_figures() -> None:
    assert all(np.isnan(pct([], (5, 50))))
    first, second = DataStats("nerve", Path("a")), DataStats("nerve", Path("b"))
    first.add("empty frames overall", [0.588], "share")
    first.add("nerve box height x width (px), p50", [117, 88], sep=" x ")
    second.add("empty frames overall", [np.nan], "share")
    lines = format_table([first, second], ["real", "phantom"]).splitlines()
    assert lines[0].split() == ["statistic", "real", "phantom"]
    assert lines[2].split()[-2:] == ["58.8%", "-"] and "117 x 88" in lines[3]
    assert first.value("nerve box") == (117.0, 88.0)
    with pytest.raises(KeyError, match="no row 'tumour'"):
        first.value("tumour")


# --------------------------------------------------------------------------- each dataset


def test_lgg_figures_are_the_mask_files_counted(lgg_tiny: Path) -> None:
    stats = dataset_stats(get_dataset("lgg"), lgg_tiny)
    volumes, shares, areas = [], [], []
    for folder in sorted(p for p in (lgg_tiny / "kaggle_3m").iterdir() if p.is_dir()):
        masks = np.stack([tifffile.imread(p) > 0 for p in sorted(folder.glob("*_mask.tif"))])
        per_slice = masks.sum(axis=(1, 2)) * (256 / 64) ** 2  # tiny slices are 64x64
        volumes.append(per_slice.sum())
        shares.append((per_slice > 0).mean())
        areas += per_slice[per_slice > 0].tolist()
    assert stats.value("patients / slices / tumour slices") == (
        4,
        sum(1 for _ in lgg_tiny.rglob("*_mask.tif")),
        len(areas),
    )
    assert stats.value("tumour volume per patient") == pytest.approx(pct(volumes, (5, 50, 95)))
    assert stats.value("share of slices with tumour") == pytest.approx(pct(shares, (10, 50, 90)))
    assert stats.value("tumour area per tumour slice") == pytest.approx(pct(areas, (5, 50, 95)))
    assert 0.5 < stats.value("tumour solidity")[1] <= 1 and stats.value("FLAIR tumour / rest of head")[1] > 1


def test_nerve_masks_come_from_the_csv_and_contrast_from_the_frames_there(
    nerve_tiny: Path, tmp_path: Path
) -> None:
    root = tmp_path / "nerve"
    shutil.copytree(nerve_tiny, root)
    for path in root.glob("train/[23]_*.tif"):
        path.unlink()  # subjects 2 and 3 keep their CSV rows, lose their frames
    table = pd.read_csv(root / "train_masks.csv", dtype=str, keep_default_na=False)
    shape = read_tiff(root / "train" / "1_1.tif").shape
    extra = np.zeros(shape, np.uint8)
    extra[20:40, 50:60] = 1
    rows = pd.DataFrame({"subject": ["9", "9"], "img": ["1", "2"], "pixels": [rle_encode(extra, "F"), ""]})
    pd.concat([table, rows]).to_csv(root / "train_masks.csv", index=False)
    stats = dataset_stats(get_dataset("nerve"), root)

    table = pd.concat([table, rows])
    filled = table[table["pixels"] != ""]
    assert stats.value("subjects / frames / frames with a nerve") == (4, len(table), len(filled))
    assert stats.value("empty frames overall")[0] == pytest.approx((table["pixels"] == "").mean())
    per_subject = (table["pixels"] == "").groupby(table["subject"]).mean()
    assert stats.value("empty frames per subject") == pytest.approx(pct(per_subject, (0, 50, 100)))
    scale = 420 * 580 / (shape[0] * shape[1])
    areas = [rle_decode(p, shape, "F").sum() * scale for p in filled["pixels"]]
    assert stats.value("nerve area") == pytest.approx(pct(areas, (5, 50, 95)))
    with_frames = filled[filled["subject"] == "1"]
    assert stats.value("frames with a nerve and an image") == (len(with_frames),)


def test_uwmgi_figures_from_train_csv_alone(tmp_path: Path) -> None:
    rows = [
        ("case1_day0_slice_0001", "large_bowel", "1 10"),
        ("case1_day0_slice_0001", "small_bowel", ""),
        ("case1_day0_slice_0001", "stomach", "5 2 20 4"),
        ("case1_day0_slice_0002", "large_bowel", ""),
        ("case1_day0_slice_0002", "small_bowel", ""),
        ("case1_day0_slice_0002", "stomach", ""),
    ]
    pd.DataFrame(rows, columns=["id", "class", "segmentation"]).to_csv(tmp_path / "train.csv", index=False)
    stats = dataset_stats(get_dataset("uwmgi"), tmp_path)
    assert stats.value("slices") == (2,) and stats.value("slices with any label") == (0.5,)
    assert stats.value("stomach: mask area")[1] == 6 and stats.value("small_bowel: share")[0] == 0


@pytest.mark.parametrize("name", dataset_names())
def test_every_dataset_describes_its_phantom(name: str, tmp_path: Path) -> None:
    """Each registered dataset gives figures for its phantom (its own, or the contract's default counts)."""
    get_dataset(name).phantom().generate(tmp_path / name, "tiny", seed=0)
    stats = dataset_stats(get_dataset(name), tmp_path / name)
    assert stats.rows and all(row.values for row in stats.rows)
    assert format_table([stats]).count("\n") == len(stats.rows) + 1  # header, rule, one line a row


# --------------------------------------------------------------------------- the stage


def test_stage_prints_two_columns_and_refuses_a_missing_folder(
    lgg_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tables = data_stats.main(["--dataset", "lgg", "--data-dir", str(lgg_tiny), "--compare", str(lgg_tiny)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[1:] == [str(lgg_tiny)] * 2 and len(tables) == 2
    assert any(line.startswith("tumour volume per patient") for line in out)
    status = run_cli(
        "data_stats", data_stats.main, ["--dataset", "nerve", "--data-dir", str(tmp_path / "none")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "data folder not found" in err[0]
    with pytest.raises(DataError, match=r"train_masks\.csv not found"):
        dataset_stats(get_dataset("nerve"), tmp_path)


def test_reader_names_the_missing_codec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "1_1.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), compression="lzw")

    def no_codec(*args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile, "imread", no_codec)
    with pytest.raises(DataError, match=r"1_1\.tif: a compressed TIFF .*pip install imagecodecs"):
        read_tiff(path)
