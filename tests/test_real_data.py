"""Real Kaggle files (../shared/data, skipped when absent): the LGG and nerve readers, the nerve RLE,
the statistics of `make data-stats`, and the LGG stages on real patients.

- lgg-real-dev/kaggle_3m: 15 whole real patients (563 slices, uncompressed RGB TIFF, masks 0/255)
  with their 18-column data.csv rows;
- nerve-real-dev: 51 real LZW-compressed frames of subject 1 (25 with a nerve) and the complete
  train_masks.csv (5,635 rows, 47 subjects, column-major RLE).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from pipeline.data.stats import dataset_stats
from pipeline.datasets import get_dataset
from pipeline.rle import rle_decode, rle_encode_batch
from stages import cv, folds, train_seg, tune

LGG = get_dataset("lgg")
NERVE = get_dataset("nerve")
DATA_CSV_COLUMNS = [
    "Patient", "RNASeqCluster", "MethylationCluster", "miRNACluster", "CNCluster", "RPPACluster",
    "OncosignCluster", "COCCluster", "histological_type", "neoplasm_histologic_grade", "tumor_tissue_site",
    "laterality", "tumor_location", "gender", "age_at_initial_pathologic", "race", "ethnicity", "death01",
]  # fmt: skip
FRAME = (420, 580)


def real(shared_data: Path, name: str) -> Path:
    root = shared_data / name
    if not root.is_dir():
        pytest.skip(f"{root} is not here")
    return root


@pytest.fixture(scope="module")
def lgg_root(shared_data: Path) -> Path:
    return real(shared_data, "lgg-real-dev")


@pytest.fixture(scope="module")
def nerve_root(shared_data: Path) -> Path:
    return real(shared_data, "nerve-real-dev")


@pytest.fixture(scope="module")
def nerve_rows(nerve_root: Path) -> pd.DataFrame:
    return pd.read_csv(nerve_root / "train_masks.csv", dtype=str, keep_default_na=False)


def frames(nerve_root: Path) -> list[Path]:
    return sorted(p for p in (nerve_root / "train").glob("*.tif") if not p.stem.endswith("_mask"))


# --------------------------------------------------------------------------- LGG


def test_lgg_reader_on_the_real_patients(lgg_root: Path) -> None:
    catalog = LGG.load_split(lgg_root, "train")
    folders = sorted(p for p in (lgg_root / "kaggle_3m").iterdir() if p.is_dir())
    assert catalog["volume_id"].nunique() == len(folders) == 15 and len(catalog) == 563
    for folder in folders:
        rows = catalog[catalog["volume_id"] == folder.name]
        n = len(list(folder.glob("*_mask.tif")))
        assert rows["slice"].tolist() == list(range(1, n + 1))  # numeric order: _10 after _9
        assert rows["id"].tolist() == [f"{folder.name}_{k}" for k in range(1, n + 1)]
        volume = LGG.read_volume(rows, with_masks=True)
        assert volume.image.shape == (n, 3, 256, 256) and volume.image.dtype == np.uint8
        raw = [tifffile.imread(folder / f"{i}.tif") for i in volume.ids]
        assert all(r.shape == (256, 256, 3) and r.dtype == np.uint8 for r in raw)
        assert np.array_equal(volume.image, np.moveaxis(np.stack(raw), -1, 1))  # pre, FLAIR, post
        masks = np.stack([tifffile.imread(folder / f"{i}_mask.tif") for i in volume.ids])
        assert set(np.unique(masks)) == {0, 255} and masks.shape == (n, 256, 256)
        assert np.array_equal(volume.mask[:, 0], masks // 255)
        assert rows["tumour"].tolist() == masks.any(axis=(1, 2)).tolist()
    table = pd.read_csv(lgg_root / "kaggle_3m" / "data.csv")
    assert list(table.columns) == DATA_CSV_COLUMNS
    assert sorted(table["Patient"]) == sorted(catalog["group"].unique())


def test_lgg_statistics_of_the_real_patients(lgg_root: Path) -> None:
    stats = dataset_stats(LGG, lgg_root)
    assert stats.value("patients / slices / tumour slices") == (15, 563, 197)
    _, area, _ = stats.value("tumour area per tumour slice")
    assert 1_300 <= area <= 1_700  # 1,529 over every real patient
    assert 0.3 <= stats.value("share of slices with tumour")[1] <= 0.4  # 0.36 over every real patient
    assert stats.value("patients with a sequence copied from FLAIR") == (2 / 15,)  # HT_7877, HT_8105
    assert stats.value("patients with a grey background") == (2 / 15,)  # FG_5962, FG_7637 pre-contrast


# --------------------------------------------------------------------------- Ultrasound Nerve


def test_nerve_reader_on_the_real_lzw_frames(nerve_root: Path) -> None:
    paths = frames(nerve_root)
    assert len(paths) == 51
    for path in paths:
        for file in (path, path.with_name(f"{path.stem}_mask.tif")):
            with tifffile.TiffFile(file) as tif:
                assert tif.pages[0].compression == tifffile.COMPRESSION.LZW, file
        image = NERVE.read_image(path, *FRAME)
        assert image.shape == FRAME and image.dtype == np.uint8
        assert np.array_equal(image, np.asarray(Image.open(path)))  # Pillow's own LZW decoder


def test_every_real_csv_row_decodes_and_encodes_back(nerve_rows: pd.DataFrame) -> None:
    assert len(nerve_rows) == 5_635 and nerve_rows["subject"].nunique() == 47
    pixels = nerve_rows["pixels"].tolist()
    for start in range(0, len(pixels), 512):
        part = pixels[start : start + 512]
        masks = np.stack([rle_decode(p, FRAME, order="F") for p in part])
        assert rle_encode_batch(masks, order="F") == part, f"rows {start}-{start + len(part)}"


def test_each_real_mask_file_is_its_decoded_row(nerve_root: Path, nerve_rows: pd.DataFrame) -> None:
    by_id = dict(zip(nerve_rows["subject"] + "_" + nerve_rows["img"], nerve_rows["pixels"]))
    with_nerve = 0
    for path in frames(nerve_root):
        mask = tifffile.imread(path.with_name(f"{path.stem}_mask.tif"))
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(rle_decode(by_id[path.stem], FRAME, order="F"), mask // 255), path.name
        assert (
            not np.array_equal(rle_decode(by_id[path.stem], FRAME, order="C"), mask // 255) or not mask.any()
        )
        with_nerve += bool(mask.any())
    assert with_nerve == 25


def test_nerve_data_dir_of_the_real_frames(
    nerve_root: Path, nerve_rows: pd.DataFrame, tmp_path: Path
) -> None:
    """A DATA_DIR holding the 51 frames and their CSV rows: the catalog, the labels and a volume."""
    root = tmp_path / "nerve"
    (root / "train").mkdir(parents=True)
    for path in frames(nerve_root):
        for file in (path, path.with_name(f"{path.stem}_mask.tif")):
            (root / "train" / file.name).symlink_to(file)
    ids = {p.stem for p in frames(nerve_root)}
    nerve_rows[(nerve_rows["subject"] + "_" + nerve_rows["img"]).isin(ids)].to_csv(
        root / "train_masks.csv", index=False
    )
    catalog = NERVE.load_split(root, "train")
    assert len(catalog) == 51 and catalog["group"].unique().tolist() == [1]
    assert int(NERVE.presence(catalog)["nerve"].sum()) == 25
    volume = NERVE.read_volume(catalog, with_masks=True)
    assert volume.image.shape == (51, *FRAME) and volume.mask.shape == (51, 1, *FRAME)
    on_disk = np.stack([tifffile.imread(root / "train" / f"{i}_mask.tif") // 255 for i in volume.ids])
    assert np.array_equal(volume.mask[:, 0], on_disk)


def test_nerve_statistics_of_the_real_masks(nerve_root: Path) -> None:
    stats = dataset_stats(NERVE, nerve_root)  # masks of every subject from the CSV, frames of subject 1
    assert stats.value("subjects / frames / frames with a nerve") == (47, 5_635, 2_323)
    assert stats.value("empty frames overall")[0] == pytest.approx(0.588, abs=0.001)
    assert stats.value("nerve area") == pytest.approx((4_664, 6_976, 10_347), abs=1)
    assert stats.value("nerve box") == (117, 88)
    assert stats.value("nerve centre row")[1] == pytest.approx(138, abs=1)
    assert stats.value("nerve centre column")[1] == pytest.approx(333, abs=1)
    assert stats.value("frames with a nerve and an image") == (25,)
    assert 1.2 < stats.value("nerve / ring mean intensity")[1] < 1.7  # brighter than the tissue around it


# --------------------------------------------------------------------------- the LGG stages


def lgg_data_dir(lgg_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DATA_DIR in tmp (folds.csv is written there) holding a link to the real, read-only kaggle_3m."""
    root = tmp_path / "lgg"
    root.mkdir()
    (root / "kaggle_3m").symlink_to(lgg_root / "kaggle_3m", target_is_directory=True)
    monkeypatch.setenv("DATASET", "lgg")
    monkeypatch.setenv("DATA_DIR", str(root))
    return root


def test_folds_stage_on_the_real_patients(
    lgg_root: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = lgg_data_dir(lgg_root, isolated_dirs, monkeypatch)
    out = folds.main(["--config", "configs/folds.yaml", "--set", "dataset=lgg", "n_folds=3"])
    table = pd.read_csv(out)
    assert out == root / "folds.csv" and len(table) == 563
    assert table.groupby("group")["fold"].nunique().max() == 1 and set(table["fold"]) == {0, 1, 2}
    assert not (lgg_root / "kaggle_3m" / "folds.csv").exists() and not (lgg_root / "folds.csv").exists()


@pytest.mark.slow  # 90 s on a busy 2-core machine; the folds stage above is the fast check
def test_seg_tune_cv_stages_on_the_real_patients(
    lgg_root: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """folds -> train-seg (the 2D baseline network, 1 epoch of 2 steps at 64 px, 2 folds) -> tune -> cv."""
    root = lgg_data_dir(lgg_root, isolated_dirs, monkeypatch)
    folds.main(["--config", "configs/folds.yaml", "--set", "dataset=lgg", "n_folds=2"])
    fast = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.val_batch_size=32",
            "data.img_size=[64,64]"]  # fmt: skip
    runs = train_seg.main(["--config", "configs/lgg_demo_seg_baseline.yaml", "--jobs", "1", "--set", *fast])
    assert [p.name for p in runs] == ["fold_0", "fold_1"]
    oof = sorted(p.stem for run in runs for p in (run / "oof").glob("*.npz"))
    assert oof == sorted(p.name for p in (lgg_root / "kaggle_3m").iterdir() if p.is_dir())
    ensemble = isolated_dirs / "real_lgg_ensemble.yaml"
    ensemble.write_text(
        "stage: ensemble\ndataset: lgg\nbase: lgg_demo_baseline_ensemble.yaml\n"
        "members:\n  - {config: lgg_demo_seg_baseline}\n"
    )  # the baseline ensemble over both folds
    decisions = tune.main(["--config", str(ensemble)])
    assert decisions.is_file() and '"dataset": "lgg"' in decisions.read_text()
    report = cv.main(["--config", str(ensemble)])
    table = pd.read_csv(report / "cv_table.csv")
    assert len(table) > 0 and (report / "cv_steps.csv").is_file()
    assert not any(re.search(r"folds\.csv|\.npy$", p.name) for p in (lgg_root / "kaggle_3m").iterdir())
    assert (root / "folds.csv").is_file()
