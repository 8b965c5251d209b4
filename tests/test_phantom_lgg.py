"""The LGG phantom: the real Kaggle layout, numeric slice order, labels, determinism, and the real
scans' statistics (tumour size, shape and contrast, head size, intensities) within tolerances."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from pipeline.data.stats import DataStats, dataset_stats
from pipeline.datasets import get_dataset
from pipeline.phantoms.common import SyntheticDataError
from pipeline.phantoms.lgg import (
    PRESETS,
    Preset,
    format_stats,
    generate_lgg,
    patient_setup,
    plan_patients,
    render_patient,
)
from pipeline.rle import rle_decode

TINY = PRESETS["tiny"]
NAME = re.compile(r"^(TCGA_[A-Z]{2}_[0-9A-Z]{4})_(\d{8})_(\d+)(_mask)?\.tif$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("lgg") / "lgg"
    return root, generate_lgg(root, "tiny", seed=0)


def slice_number(path: Path) -> int:
    return int(NAME.match(path.name).group(3))


def test_layout(tiny: tuple[Path, dict]) -> None:
    root, stats = tiny
    patients = []
    for split, folder in (("train", root / "kaggle_3m"), ("test", root / "test")):
        volumes = sorted(p for p in folder.iterdir() if p.is_dir())
        assert len(volumes) == getattr(TINY, f"{split}_patients")
        for volume in volumes:
            files = sorted(volume.iterdir())
            images = [f for f in files if not f.name.endswith("_mask.tif")]
            for f in files:
                match = NAME.match(f.name)
                assert match, f.name
                assert f.name.startswith(volume.name + "_")
            assert sorted(map(slice_number, images)) == list(range(1, len(images) + 1))
            assert TINY.slices[0] <= len(images) <= TINY.slices[1]
            for image_path in images:
                image = tifffile.imread(image_path)
                assert image.dtype == np.uint8 and image.shape == (TINY.size, TINY.size, 3)
                mask_path = image_path.with_name(image_path.stem + "_mask.tif")
                assert mask_path.exists() == (split == "train")
                if split == "train":
                    mask = tifffile.imread(mask_path)
                    assert mask.dtype == np.uint8 and mask.shape == (TINY.size, TINY.size)
                    assert set(np.unique(mask)) <= {0, 255}
            patients.append(volume.name.rsplit("_", 1)[0])
    table = pd.read_csv(root / "kaggle_3m" / "data.csv")
    assert sorted(table["Patient"]) == sorted(patients)
    assert {
        "RNASeqCluster",
        "MethylationCluster",
        "histological_type",
        "age_at_initial_pathologic",
        "death01",
    } <= set(table.columns)
    assert stats["train"]["patients"] == 4 and stats["test"]["patients"] == 2
    assert "train: 4 patients" in format_stats(stats)
    assert (root / "preview.png").stat().st_size > 0 and (root / "dataset.json").is_file()


def test_slices_sort_as_numbers_not_text(tmp_path: Path) -> None:
    preset = Preset("numeric", 1, 1, (11, 12), size=32)
    generate_lgg(tmp_path / "lgg", preset, seed=3)
    volume = next((tmp_path / "lgg" / "test").iterdir())
    as_text = sorted(p.name for p in volume.iterdir())
    assert as_text.index(f"{volume.name}_10.tif") < as_text.index(f"{volume.name}_2.tif")
    labels = pd.read_csv(tmp_path / "lgg" / "test_labels.csv", keep_default_na=False)
    ks = [int(i.rsplit("_", 1)[1]) for i in labels["id"]]
    assert ks == list(range(1, len(ks) + 1)) and len(ks) >= 11


def test_test_labels_decode_to_the_rendered_masks(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    labels = pd.read_csv(root / "test_labels.csv", keep_default_na=False).set_index("id")["segmentation"]
    jobs = [j for j in plan_patients(TINY, 0) if j.split == "test"]
    expected_ids = [f"{j.volume}_{k}" for j in jobs for k in range(1, j.n_slices + 1)]
    assert list(labels.index) == expected_ids
    for job in jobs:
        images, masks = render_patient(job)
        assert np.array_equal(images[0], tifffile.imread(root / "test" / job.volume / f"{job.volume}_1.tif"))
        for k, mask in enumerate(masks, start=1):
            decoded = rle_decode(labels[f"{job.volume}_{k}"], (TINY.size, TINY.size), order="C")
            assert np.array_equal(decoded, mask > 0)


def test_train_masks_on_disk_are_the_rendered_ones(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    job = next(j for j in plan_patients(TINY, 0) if j.split == "train")
    _, masks = render_patient(job)
    on_disk = [
        tifffile.imread(root / "kaggle_3m" / job.volume / f"{job.volume}_{k}_mask.tif") for k in (1, 2)
    ]
    assert np.array_equal(np.stack(on_disk), masks[:2])


def test_tumour_is_contiguous_and_brighter_in_flair() -> None:
    demo_like = dataclasses.replace(PRESETS["demo"], size=64, train_patients=10, test_patients=0)
    with_tumour, slices, ratios = 0, 0, []
    for job in plan_patients(demo_like, seed=5):
        images, masks = render_patient(job)
        on = np.flatnonzero(masks.any(axis=(1, 2)))
        slices += len(masks)
        with_tumour += len(on)
        if not len(on):
            continue
        assert np.array_equal(on, np.arange(on[0], on[-1] + 1)), job.volume  # one run of slices
        tumour = masks > 0
        ring = ndimage.binary_dilation(tumour, np.ones((1, 5, 5), bool)) & ~tumour
        flair = images[..., 1].astype(float)
        ratios.append(np.median(flair[tumour]) / np.median(flair[ring]))
        pre = images[..., 0].astype(float)
        if not np.array_equal(pre, flair) and not patient_setup(job)["grey"]:
            assert np.median(pre[tumour]) < np.median(pre[ring]), job.volume  # dark before contrast
    assert min(ratios) > 1.0  # always brighter than the brain around it in FLAIR ...
    assert np.median(ratios) < 2.0 and min(ratios) < 1.4  # ... but often faintly, as in the real scans
    assert 0.2 <= with_tumour / slices <= 0.5


def test_head_shrinks_towards_the_ends_of_the_stack() -> None:
    job = dataclasses.replace(plan_patients(TINY, 0)[0], n_slices=20)
    images, _ = render_patient(job)
    head = (images[..., 1] > 40).sum(axis=(1, 2))
    assert head[0] < head[10] and head[-1] < head[10]


def test_same_seed_same_bytes_other_seed_differs(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tiny
    again, other = tmp_path / "again", tmp_path / "other"
    generate_lgg(again, "tiny", seed=0, workers=2)
    generate_lgg(other, "tiny", seed=1)
    files = ["kaggle_3m/data.csv", "test_labels.csv"]
    volume = sorted((root / "kaggle_3m").iterdir())[0]
    files += [str(p.relative_to(root)) for p in sorted(volume.iterdir())[:3]]
    for name in files:
        assert (again / name).read_bytes() == (root / name).read_bytes(), name
    assert (other / "kaggle_3m" / "data.csv").read_bytes() != (root / "kaggle_3m" / "data.csv").read_bytes()
    assert sorted(p.name for p in (other / "kaggle_3m").iterdir()) != sorted(
        p.name for p in (root / "kaggle_3m").iterdir()
    )


def test_refuses_real_data_and_other_specs(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "kaggle_3m").mkdir()
    with pytest.raises(SyntheticDataError, match=r"no dataset\.json"):
        generate_lgg(real, "tiny")
    root, stats = tiny
    assert generate_lgg(root, "tiny", seed=0) == stats  # same spec: kept as is
    with pytest.raises(SyntheticDataError, match="--force"):
        generate_lgg(root, "tiny", seed=7)
    with pytest.raises(SyntheticDataError, match="unknown preset"):
        generate_lgg(tmp_path / "x", "huge")


# --------------------------------------------------------------------------- calibrated to the real scans


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> DataStats:
    """The statistics of 20 demo-like patients at 128 px (areas are given at 256x256)."""
    root = tmp_path_factory.mktemp("calibrated") / "lgg"
    preset = dataclasses.replace(
        PRESETS["demo"], name="calibrated", size=128, train_patients=20, test_patients=0
    )
    generate_lgg(root, preset, seed=0)
    return dataset_stats(get_dataset("lgg"), root)


def test_tumours_are_as_large_and_irregular_as_the_real_ones(calibrated: DataStats) -> None:
    # real dev set (15 patients): 170 / 1,494 / 5,459 px a tumour slice; the old phantom 165 / 1,031 / 2,131
    _, area_p50, area_p95 = calibrated.value("tumour area per tumour slice")
    assert 1_200 <= area_p50 <= 2_400 and 3_500 <= area_p95 <= 12_000
    _, share_p50, _ = calibrated.value("share of slices with tumour")
    assert 0.25 <= share_p50 <= 0.45  # real 0.35
    assert 0.72 <= calibrated.value("tumour solidity")[1] <= 0.92  # real 0.84, the old ellipsoids 0.96


def test_tumours_are_often_faint_and_the_head_fills_the_frame(calibrated: DataStats) -> None:
    contrast_p10, contrast_p50, _ = calibrated.value("FLAIR tumour / rest of head")
    assert contrast_p10 < 1.6 and 1.4 <= contrast_p50 <= 2.1  # real 1.28 / 1.75, the old phantom 1.82 / 1.97
    assert 0.5 <= calibrated.value("head box share")[1] <= 0.65  # real 0.54, the old phantom 0.47
    assert 35 <= calibrated.value("median FLAIR of the head")[1] <= 70  # real 48 of 255, the old phantom 102
