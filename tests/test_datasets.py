"""The dataset plug-ins: the contract on every registered dataset (the toy one of the tests too), readers
on each phantom and on real fixtures, metrics against brute-force twins, numeric slice order, submission
writers and their refusals, per-dataset defaults."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from pipeline.config import ConfigError
from pipeline.data.volumes import Volume, VolumeStore
from pipeline.datasets import dataset_names, get_dataset, load_config
from pipeline.datasets.base import DatasetSpec
from pipeline.datasets.lgg import scan_lgg
from pipeline.datasets.lgg_submission import lgg_aggregate, lgg_stats
from pipeline.datasets.nerve_submission import check_masks_sane, nerve_aggregate, nerve_stats
from pipeline.errors import DataError, SubmissionError
from pipeline.rle import rle_decode, rle_encode_numpy


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny phantom of a dataset, written once per module."""
    made: dict[str, Path] = {}

    def root(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name) / name
            get_dataset(name).phantom().generate(made[name], "tiny", seed=0)
        return made[name]

    return root


@pytest.fixture(scope="module")
def lgg_root(phantom_root: Callable[[str], Path]) -> Path:
    return phantom_root("lgg")


@pytest.fixture(scope="module")
def nerve_root(phantom_root: Callable[[str], Path]) -> Path:
    return phantom_root("nerve")


# --------------------------------------------------------------------------- registry and defaults


@pytest.mark.parametrize("name", dataset_names())
def test_every_registered_dataset_loads_its_configs(name: str, tmp_path: Path) -> None:
    spec = get_dataset(name)
    assert isinstance(spec, DatasetSpec) and spec.name == name and "tiny" in spec.phantom().PRESETS
    for stage in ("folds", "det", "cls", "seg", "ensemble"):  # its config_defaults are valid config deltas
        path = tmp_path / f"{stage}.yaml"
        path.write_text(f"stage: {stage}\ndataset: {name}\n")
        assert load_config(path).dataset == name


def test_unknown_dataset_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=rf"unknown dataset .brats.*{', '.join(dataset_names())}"):
        get_dataset("brats")


@pytest.mark.parametrize("name", dataset_names())
def test_reader_keeps_the_catalog_contract(name: str, phantom_root: Callable[[str], Path]) -> None:
    """On its phantom: ids unique, a group per volume, slices 1..N, images and masks of the declared
    shapes, presence agreeing with the masks, a test split without labels."""
    spec, root = get_dataset(name), phantom_root(name)
    catalog = spec.load_split(root, "train")
    assert len(catalog) and catalog["id"].is_unique and spec.has_labels(catalog)
    assert (catalog.groupby("volume_id")["group"].nunique() == 1).all()
    presence = spec.presence(catalog)
    assert list(presence.columns) == list(spec.classes)
    for volume_id, rows in list(catalog.groupby("volume_id", sort=False))[:2]:
        volume = spec.read_volume(rows)
        n, (h, w) = len(rows), (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
        channels = (spec.channels,) if spec.channels > 1 else ()
        assert volume.volume_id == volume_id and volume.image.shape == (n, *channels, h, w)
        assert volume.mask.shape == (n, len(spec.classes), h, w) and volume.mask.dtype == np.uint8
        assert set(np.unique(volume.mask)) <= {0, 1}
        np.testing.assert_array_equal(presence.loc[volume.ids].to_numpy(), volume.mask.any(axis=(2, 3)))
        if spec.volumetric:
            assert sorted(rows["slice"]) == list(range(1, n + 1))
    test = spec.prediction_catalog(root)
    assert len(test) and not set(test["id"]) & set(catalog["id"]) and (root / spec.truth_file).is_file()


def test_dataset_defaults_go_under_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATASET", raising=False)
    seg = tmp_path / "seg.yaml"
    seg.write_text("stage: seg\ndataset: nerve\n")
    assert (load_config(seg).data.k, load_config(seg).data.crop) == (0, False)  # nerve: 2D, no crop
    seg.write_text("stage: seg\ndataset: nerve\ndata: {k: 2}\n")
    assert load_config(seg).data.k == 2  # the file wins over the dataset's default
    seg.write_text("stage: seg\ndataset: lgg\n")
    assert (load_config(seg).data.k, load_config(seg).data.stride, load_config(seg).data.crop) == (1, 1, True)
    folds = tmp_path / "folds.yaml"
    folds.write_text("stage: folds\n")
    assert load_config(folds).exclude_volumes == ("case7_day0", "case81_day30")  # UW-Madison's faulty days
    assert load_config(folds, ["dataset=lgg"]).exclude_volumes == ()


def test_config_of_another_dataset_than_DATASET_fails_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATASET", "lgg")
    with pytest.raises(ConfigError, match="is for dataset 'uwmgi' but DATASET=lgg"):
        load_config("configs/demo_seg.yaml")
    assert load_config("configs/lgg_demo_seg.yaml").dataset == "lgg"


# --------------------------------------------------------------------------- LGG


def test_lgg_reader_on_its_phantom(lgg_root: Path) -> None:
    spec = get_dataset("lgg")
    catalog = spec.load_split(lgg_root, "train")
    assert len(catalog) and catalog["id"].is_unique
    for volume_id, rows in catalog.groupby("volume_id", sort=False):
        assert rows["group"].nunique() == 1 and volume_id.startswith(rows["group"].iloc[0])
        assert list(rows["slice"]) == list(range(1, len(rows) + 1))  # numeric order, k from 1
    rows = catalog[catalog["volume_id"] == catalog["volume_id"].iloc[0]]
    volume = spec.read_volume(rows)
    n, (h, w) = len(rows), (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
    assert volume.image.shape == (n, 3, h, w) and volume.image.dtype == np.uint8
    assert volume.mask.shape == (n, 1, h, w) and set(np.unique(volume.mask)) <= {0, 1}
    first = tifffile.imread(rows["path"].iloc[0])
    np.testing.assert_array_equal(volume.image[0], np.moveaxis(first, -1, 0))  # channels first
    presence = spec.presence(catalog)
    assert list(presence.columns) == ["tumour"]
    assert presence.loc[rows["id"], "tumour"].tolist() == volume.mask.reshape(n, -1).any(axis=1).tolist()
    test = spec.scan(lgg_root, "test")
    assert len(test) and not spec.has_labels(test)


def test_lgg_slices_are_ordered_numerically(tmp_path: Path) -> None:
    folder = tmp_path / "kaggle_3m" / "TCGA_CS_4941_19960909"
    folder.mkdir(parents=True)
    for k in range(1, 13):
        tifffile.imwrite(folder / f"TCGA_CS_4941_19960909_{k}.tif", np.full((8, 8, 3), k, np.uint8))
        tifffile.imwrite(folder / f"TCGA_CS_4941_19960909_{k}_mask.tif", np.zeros((8, 8), np.uint8))
    names = sorted(p.name for p in folder.glob("*.tif") if "mask" not in p.name)
    assert names.index("TCGA_CS_4941_19960909_10.tif") < names.index(
        "TCGA_CS_4941_19960909_2.tif"
    )  # the trap
    catalog = scan_lgg(tmp_path, "train")
    assert catalog["slice"].tolist() == list(range(1, 13))
    volume = get_dataset("lgg").read_volume(catalog)
    assert volume.image[:, 0, 0, 0].tolist() == list(range(1, 13))  # stacked in k order


def test_lgg_reader_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "kaggle_3m" / "TCGA_CS_4941_19960909"
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "TCGA_CS_4941_19960909_1.tif", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"TCGA_CS_4941_19960909_1.tif has no mask: expected .*_1_mask.tif"):
        scan_lgg(tmp_path, "train")
    (folder / "TCGA_CS_4941_19960909_1_mask.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match=r"_1_mask.tif: not a readable TIFF"):
        get_dataset("lgg").load_split(tmp_path, "train")
    bad = tmp_path / "kaggle_3m" / "patient_7"
    bad.mkdir()
    with pytest.raises(DataError, match=r"patient_7: folder name is not TCGA_<inst>_<pid>_<date>"):
        scan_lgg(tmp_path, "train")


def _brute_dice(p: np.ndarray, t: np.ndarray) -> float:
    inter = sum(int(a and b) for a, b in zip(p.ravel(), t.ravel()))
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2 * inter / total


def _brute_iou(p: np.ndarray, t: np.ndarray) -> float:
    inter = sum(int(a and b) for a, b in zip(p.ravel(), t.ravel()))
    union = sum(int(a or b) for a, b in zip(p.ravel(), t.ravel()))
    return 1.0 if union == 0 else inter / union


def _random_volumes(
    rng: np.random.Generator, n: int, empty_share: float = 0.4
) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n):
        s = int(rng.integers(1, 6))
        t = rng.random((s, 1, 6, 7)) < 0.3
        p = rng.random((s, 1, 6, 7)) < 0.3
        t[rng.random(s) < empty_share] = False
        p[rng.random(s) < empty_share] = False
        out.append((p, t))
    return out


def test_lgg_metric_equals_its_brute_force_twin() -> None:
    rng = np.random.default_rng(0)
    volumes = _random_volumes(rng, 12)
    volumes.append((np.zeros((3, 1, 6, 7), bool), np.zeros((3, 1, 6, 7), bool)))  # a patient without tumour
    result = lgg_aggregate([lgg_stats(p, t) for p, t in volumes])
    patient = [_brute_dice(p, t) for p, t in volumes]  # volumetric: every voxel of the patient at once
    slices = [(_brute_dice(p[s], t[s]), _brute_iou(p[s], t[s])) for p, t in volumes for s in range(len(p))]
    assert result["score"] == pytest.approx(np.mean(patient))
    assert result["slice_dice"] == pytest.approx(np.mean([d for d, _ in slices]))
    assert result["iou"] == pytest.approx(np.mean([i for _, i in slices]))
    perfect = lgg_aggregate([lgg_stats(t, t) for _, t in volumes])
    assert perfect["score"] == perfect["slice_dice"] == perfect["iou"] == 1.0


# --------------------------------------------------------------------------- Ultrasound Nerve


def test_nerve_reader_on_its_phantom(nerve_root: Path) -> None:
    spec = get_dataset("nerve")
    catalog = spec.load_split(nerve_root, "train")
    assert (catalog["volume_id"] == "subject" + catalog["group"].astype(str)).all()  # a subject's frames
    masks_csv = pd.read_csv(nerve_root / "train_masks.csv", dtype=str, keep_default_na=False)
    assert len(catalog) == len(masks_csv)
    store = VolumeStore(nerve_root, catalog, "train", spec, cache_root=nerve_root.parent / "cache")
    volume = store[store.volume_ids[0]]
    assert volume.image.ndim == 3 and volume.mask.shape[1] == 1
    for s, slice_id in enumerate(volume.ids):  # the CSV (column-major) agrees with the mask files
        on_disk = tifffile.imread(nerve_root / "train" / f"{slice_id}_mask.tif") > 0
        np.testing.assert_array_equal(volume.mask[s, 0].astype(bool), on_disk)
    test = spec.prediction_catalog(nerve_root)
    assert test["slice"].tolist() == sorted(test["slice"]) and test["volume_id"].str.startswith("test").all()


def test_nerve_reader_on_the_real_fixture(shared_data: Path, tmp_path: Path) -> None:
    """The real 1_1 image and its train_masks.csv row through the reader: column-major, 4,616 pixels."""
    real = shared_data / "nerve-real-mini"
    (tmp_path / "train").mkdir()
    image = cv2.imread(str(real / "1_1.png"), cv2.IMREAD_GRAYSCALE)
    tifffile.imwrite(tmp_path / "train" / "1_1.tif", image)
    tifffile.imwrite(
        tmp_path / "train" / "1_1_mask.tif", cv2.imread(str(real / "1_1_mask.png"), cv2.IMREAD_GRAYSCALE)
    )
    rows = pd.read_csv(real / "train_masks_subject1.csv", dtype=str, keep_default_na=False)
    rows[rows["img"] == "1"].to_csv(tmp_path / "train_masks.csv", index=False)
    spec = get_dataset("nerve")
    catalog = spec.load_split(tmp_path, "train")
    assert catalog[["id", "group", "height", "width"]].values.tolist() == [["1_1", 1, 420, 580]]
    volume = spec.read_volume(catalog)
    truth = cv2.imread(str(real / "1_1_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(volume.image[0], image)
    np.testing.assert_array_equal(volume.mask[0, 0].astype(bool), truth)
    assert int(volume.mask.sum()) == 4616
    assert spec.presence(catalog)["nerve"].tolist() == [True]
    row_major = rle_decode(rows["pixels"].iloc[0], (420, 580), "C").astype(bool)
    assert (row_major & truth).sum() < 0.1 * truth.sum()  # the other order does not fit the anatomy


def test_nerve_metric_equals_its_brute_force_twin() -> None:
    rng = np.random.default_rng(1)
    volumes = _random_volumes(rng, 10, empty_share=0.6)
    result = nerve_aggregate([nerve_stats(p, t) for p, t in volumes])
    images = [(p[s, 0], t[s, 0]) for p, t in volumes for s in range(len(p))]
    assert result["score"] == pytest.approx(np.mean([_brute_dice(p, t) for p, t in images]))
    nonempty = [_brute_dice(p, t) for p, t in images if t.any()]
    assert result["dice_nonempty"] == pytest.approx(np.mean(nonempty))
    empties = [not p.any() for p, t in images if not t.any()]
    assert result["empty_accuracy"] == pytest.approx(np.mean(empties))
    empty = np.zeros((4, 1, 5, 5), bool)
    assert nerve_aggregate([nerve_stats(empty, empty)])["score"] == 1.0  # empty vs empty = 1
    one = empty.copy()
    one[0, 0, 2, 2] = True
    assert nerve_aggregate([nerve_stats(one, empty)])["score"] == 0.75  # a false positive costs a whole image


def test_nerve_writer_refuses_all_full_or_identical(tmp_path: Path) -> None:
    with pytest.raises(SubmissionError, match=r"every predicted mask is the whole image \('1 243600'\)"):
        check_masks_sane(["1 243600"] * 3, 243600, "sub.csv")
    with pytest.raises(SubmissionError, match="all 3 predicted masks are identical"):
        check_masks_sane(["5 10"] * 3, 243600, "sub.csv")
    check_masks_sane(["5 10", "", "7 2"], 243600, "sub.csv")


def test_nerve_submission_round_trip(nerve_root: Path, tmp_path: Path) -> None:
    """Writing the true test masks column-major and scoring them gives 1.0; a refused file is not written."""
    spec = get_dataset("nerve")
    catalog = spec.prediction_catalog(nerve_root)
    truth = pd.read_csv(nerve_root / "test_labels.csv", dtype=str, keep_default_na=False).set_index("img")
    out = tmp_path / "sub.csv"

    def encode(masks: np.ndarray, order: str) -> list[str]:
        return [rle_encode_numpy(m, order) for m in masks]

    writer = spec.submission_writer(nerve_root, out, catalog, encode)
    for volume_id, rows in catalog.groupby("volume_id", sort=False):
        h, w = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
        masks = np.stack([rle_decode(truth.at[i, "pixels"], (h, w), "F") for i in rows["id"]])[:, None]
        writer.add(Volume(volume_id, list(rows["id"]), np.zeros((len(rows), h, w)), None, (1, 1)), masks)
    writer.finish()
    assert spec.score_files(out, nerve_root / "test_labels.csv", nerve_root)["score"] == 1.0
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["img", "pixels"]
    sample = pd.read_csv(nerve_root / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert written["img"].tolist() == sample["img"].tolist()
    full = spec.submission_writer(nerve_root, tmp_path / "full.csv", catalog, encode)
    for volume_id, rows in catalog.groupby("volume_id", sort=False):
        h, w = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
        full.add(
            Volume(volume_id, list(rows["id"]), np.zeros((len(rows), h, w)), None, (1, 1)),
            np.ones((len(rows), 1, h, w), bool),
        )
    with pytest.raises(SubmissionError, match="whole image"):
        full.finish()
    assert not (tmp_path / "full.csv").exists()


def test_lgg_submission_writes_masks_and_scores_truth_as_one(lgg_root: Path, tmp_path: Path) -> None:
    spec = get_dataset("lgg")
    catalog = spec.prediction_catalog(lgg_root)
    truth = pd.read_csv(lgg_root / "test_labels.csv", dtype=str, keep_default_na=False).set_index("id")
    out = tmp_path / "pred.csv"
    writer = spec.submission_writer(
        lgg_root, out, catalog, lambda m, order: [rle_encode_numpy(x, order) for x in m]
    )
    for volume_id, rows in catalog.groupby("volume_id", sort=False):
        h, w = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
        masks = np.stack([rle_decode(truth.at[i, "segmentation"], (h, w)) for i in rows["id"]])[:, None]
        writer.add(Volume(volume_id, list(rows["id"]), np.zeros((len(rows), 3, h, w)), None, (1, 1)), masks)
    writer.finish()
    result = spec.score_files(out, lgg_root / "test_labels.csv", lgg_root)
    assert result["score"] == result["slice_dice"] == result["iou"] == 1.0
    first = catalog.iloc[0]
    written = tifffile.imread(tmp_path / "pred_masks" / first["volume_id"] / f"{first['id']}_mask.tif")
    assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}  # the layout's own mask format
    np.testing.assert_array_equal(
        written > 0, rle_decode(truth.at[first["id"], "segmentation"], written.shape) > 0
    )
    broken = pd.read_csv(out, dtype=str, keep_default_na=False).iloc[1:]
    broken.to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SubmissionError, match="truth ids have no row"):
        spec.score_files(tmp_path / "short.csv", lgg_root / "test_labels.csv", lgg_root)


@pytest.mark.parametrize("name", dataset_names())
def test_phantoms_are_deterministic(name: str, tmp_path: Path) -> None:
    phantom = get_dataset(name).phantom()
    a, b = tmp_path / f"{name}_a", tmp_path / f"{name}_b"
    phantom.generate(a, "tiny", seed=3)
    phantom.generate(b, "tiny", seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix != ".png")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix != ".png")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), name
    shutil.rmtree(a)
    shutil.rmtree(b)


@pytest.mark.parametrize("name", dataset_names())
def test_debug_catalog_is_train_volumes_and_writers_use_its_ids(
    name: str, phantom_root: Callable[[str], Path], tmp_path: Path
) -> None:
    spec, root = get_dataset(name), phantom_root(name)
    catalog = spec.prediction_catalog(root, debug_volumes=1)
    assert catalog["debug"].all() and catalog["volume_id"].nunique() == 1
    assert set(catalog["id"]) <= set(spec.scan(root, "train")["id"])
    writer = spec.submission_writer(
        root, tmp_path / "debug.csv", catalog, lambda m, o: [""] * len(m), force=True
    )
    h, w = int(catalog["height"].iloc[0]), int(catalog["width"].iloc[0])
    image = np.zeros((len(catalog), *((spec.channels,) if spec.channels > 1 else ()), h, w))
    writer.add(
        Volume(catalog["volume_id"].iloc[0], list(catalog["id"]), image, None, (1, 1)),
        np.zeros((len(catalog), len(spec.classes), h, w), bool),
    )
    written = pd.read_csv(writer.finish(), dtype=str, keep_default_na=False)
    first = list(dict.fromkeys(written.iloc[:, 0]))
    assert first == list(catalog["id"])  # the train ids, not sample_submission's
