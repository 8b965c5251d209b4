"""The Kaggle-layout reader on real fixtures and on bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from layout import write_dataset

from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import CLASSES, load_split, parse_id, read_labels, read_slice, scan_split
from pipeline.errors import DataError
from pipeline.rle import rle_decode, rle_encode

SPEC = get_dataset("uwmgi")


def test_real_mini_layout_reads(shared_data: Path) -> None:
    root = shared_data / "uwmgi-real-mini"
    catalog = load_split(root, "train")
    assert len(catalog) == 5
    columns = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py", "day"]
    assert list(catalog.columns) == columns + list(CLASSES)
    with pytest.raises(DataError, match=r"case117_day15 .* lacks slice\(s\) 1, 2, 3"):
        SPEC.load_split(root, "train")  # excerpts of real days: the spec refuses their gaps
    assert set(catalog["volume_id"]) == {"case139_day0", "case117_day15", "case117_day16", "case117_day17"}
    row = catalog[catalog["id"] == "case139_day0_slice_0001"].iloc[0]
    assert (row.width, row.height, row.px, row.py) == (234, 234, 1.5, 1.5)
    image = read_slice(row.path, row.width, row.height)
    assert image.dtype == np.uint16 and image.shape == (234, 234)
    assert image.max() > 255  # an original 16-bit slice
    assert all(row[name] == "" for name in CLASSES)
    day16 = catalog[catalog["volume_id"] == "case117_day16"]
    assert list(day16["slice"]) == [25, 38]  # slice order, not file-system order
    volume = SPEC.read_volume(day16)
    assert volume.image.shape == (2, 276, 276) and volume.mask.shape == (2, 3, 276, 276)
    for s, slice_id in enumerate(volume.ids):
        for c, name in enumerate(CLASSES):
            rle = day16[day16["id"] == slice_id][name].iloc[0]
            assert rle_encode(volume.mask[s, c]) == rle


def test_parse_id_round_trip() -> None:
    assert parse_id("case12_day3_slice_0042") == (12, 3, 42)
    with pytest.raises(DataError, match="case12_slice_0042"):
        parse_id("case12_slice_0042")


def test_real_labels_validate(shared_data: Path) -> None:
    labels = read_labels(shared_data / "uwmgi-real-labels" / "train_partial.csv")
    assert len(labels) == 4032
    assert set(labels["class"]) == set(CLASSES)


def _copy_mini(shared_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "mini"
    shutil.copytree(shared_data / "uwmgi-real-mini", root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_bad_inputs_name_the_file_or_row(shared_data: Path, tmp_path: Path) -> None:
    root = _copy_mini(shared_data, tmp_path)
    csv = pd.read_csv(root / "train.csv", keep_default_na=False)

    bad = csv.copy()
    bad.loc[4, "class"] = "liver"
    bad.to_csv(root / "bad_class.csv", index=False)
    with pytest.raises(DataError, match=r"row 6: unknown class 'liver'"):
        read_labels(root / "bad_class.csv")

    dup = pd.concat([csv, csv.iloc[[0]]])
    dup.to_csv(root / "dup.csv", index=False)
    with pytest.raises(DataError, match="appears twice"):
        read_labels(root / "dup.csv")

    extra = pd.concat(
        [csv, pd.DataFrame([{"id": "case1_day0_slice_0001", "class": "stomach", "segmentation": ""}])]
    )
    extra.to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match="labelled ids have no image, first case1_day0_slice_0001"):
        load_split(root, "train")
    csv.to_csv(root / "train.csv", index=False)

    png = next((root / "train").rglob("slice_0028_*.png"))
    png.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"unreadable.*slice_0028"):
        read_slice(png)
    with pytest.raises(DataError, match="missing"):
        read_slice(png.with_name("slice_0099_276_276_1.63_1.63.png"))

    png.rename(png.with_name("slice_28.png"))
    with pytest.raises(DataError, match=re.escape("slice_28.png: file name is not slice_NNNN_W_H_PX_PY.png")):
        scan_split(root, "train")


def test_size_mismatch_and_rle_out_of_bounds(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", {1: [0]}, n_slices=2)
    catalog = load_split(root, "train")
    path = Path(catalog["path"].iloc[0])
    cv2.imwrite(str(path), np.zeros((10, 10), np.uint16))
    with pytest.raises(DataError, match="image is 10x10 but its file name says 32x24"):
        SPEC.read_volume(catalog)
    root = write_dataset(tmp_path / "e", {1: [0]}, n_slices=2)
    labels = pd.read_csv(root / "train.csv", keep_default_na=False)
    labels.loc[0, "segmentation"] = "760 10"  # 24*32 = 768 pixels
    labels.to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"case1_day0_slice_0001, large_bowel"):
        SPEC.read_volume(load_split(root, "train"))


def test_missing_dataset_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nowhere" / "train.csv")):
        load_split(tmp_path / "nowhere", "train")
    assert scan_split(tmp_path / "nowhere", "test").empty


def test_volume_cache_round_trip_and_invalidation(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", {1: [0, 1], 2: [0]}, n_slices=5)
    catalog = load_split(root, "train")
    store = VolumeStore(root, catalog, "train", SPEC, cache_root=tmp_path / "cache")
    store.build(progress=False)
    assert all(store.is_cached(d) for d in store.volume_ids)
    for volume_id in store.volume_ids:
        cached = store[volume_id]
        direct = SPEC.read_volume(catalog[catalog["volume_id"] == volume_id])
        assert isinstance(cached.image, np.memmap)
        np.testing.assert_array_equal(cached.image, direct.image)
        np.testing.assert_array_equal(cached.mask, direct.mask)
        assert cached.ids == direct.ids
    # a changed label file invalidates the cache
    labels = pd.read_csv(root / "train.csv", keep_default_na=False)
    labels.loc[0, "segmentation"] = "1 5"
    labels.to_csv(root / "train.csv", index=False)
    store = VolumeStore(root, load_split(root, "train"), "train", SPEC, cache_root=tmp_path / "cache")
    assert not store.is_cached("case1_day0")
    assert store["case1_day0"].mask[0, 0].sum() == 5
    np.testing.assert_array_equal(store["case1_day0"].mask[0, 0], rle_decode("1 5", (24, 32)))
