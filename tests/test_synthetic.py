"""The synthetic dataset: exact Kaggle layout, determinism, labels, and the realism it promises."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import CLASSES, load_split, read_labels, read_slice, scan_split
from pipeline.phantoms.common import SyntheticDataError
from pipeline.phantoms.uwmgi import (
    PRESETS,
    SIZES,
    Preset,
    VolumeJob,
    dataset_stats,
    generate_dataset,
    render_volume,
)
from pipeline.rle import rle_decode, rle_encode
from stages import make_data

SPEC = get_dataset("uwmgi")

MEDIUM = Preset("medium", train_cases=3, test_cases=1, days=(2,), test_days=(1,), slices=(44, 40))


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_dataset(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "medium"
    return root, generate_dataset(root, MEDIUM, seed=3)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_bytes_with_any_number_of_workers(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(again, "tiny", seed=0, workers=2)
    first, second = tree_hashes(tiny), tree_hashes(again)
    assert len(first) > 50
    assert first == second


def test_another_seed_replaces_the_set_only_with_force(tiny: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    with pytest.raises(SyntheticDataError, match="--force"):
        generate_dataset(copy, "tiny", seed=1)
    generate_dataset(copy, "tiny", seed=1, force=True)
    assert json.loads((copy / "dataset.json").read_text())["spec"]["seed"] == 1
    old, new = tree_hashes(tiny), tree_hashes(copy)
    old_png = {h for name, h in old.items() if name.endswith(".png") and "preview" not in name}
    new_png = {h for name, h in new.items() if name.endswith(".png") and "preview" not in name}
    assert old_png.isdisjoint(new_png)
    assert old["train.csv"] != new["train.csv"]


def test_a_matching_set_is_kept_and_a_foreign_folder_is_never_replaced(tiny: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    stats = generate_dataset(tiny, "tiny", seed=0)
    assert stats == json.loads((tiny / "dataset.json").read_text())["stats"]
    assert make_data.main(["--dataset", "uwmgi", "--out", str(tiny), "--preset", "tiny"]) == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before
    foreign = tmp_path / "real_data"
    foreign.mkdir()
    (foreign / "train.csv").write_text("id,class,segmentation\n")
    with pytest.raises(SyntheticDataError, match="not a synthetic dataset"):
        generate_dataset(foreign, "tiny", force=True)
    assert (foreign / "train.csv").is_file()
    with pytest.raises(SyntheticDataError, match="unknown preset 'huge'"):
        generate_dataset(tmp_path / "x", "huge")


# --------------------------------------------------------------------------- layout


def test_layout_reads_back_through_the_catalog(tiny: Path) -> None:
    train = load_split(tiny, "train")
    test = scan_split(tiny, "test")
    assert len(train) == sum(1 for _ in (tiny / "train").rglob("*.png"))
    assert set(train["group"]).isdisjoint(test["group"])
    for frame in (train, test):
        assert {tuple(s) for s in frame[["width", "height", "px"]].to_numpy()} <= set(SIZES)
        assert (frame.groupby("group")[["width", "height"]].nunique() == 1).all().all()
        for _, day in frame.groupby("volume_id"):
            assert day["slice"].tolist() == list(range(1, len(day) + 1))
    raw = pd.read_csv(tiny / "train.csv", keep_default_na=False)
    assert list(raw.columns) == ["id", "class", "segmentation"]
    assert raw["class"].tolist() == list(CLASSES) * len(train)
    assert raw["id"].iloc[::3].tolist() == train["id"].tolist()


def test_submission_template_and_hidden_answers_cover_the_test_images(tiny: Path) -> None:
    test = scan_split(tiny, "test")
    sample = pd.read_csv(tiny / "sample_submission.csv", keep_default_na=False)
    assert list(sample.columns) == ["id", "class", "predicted"]
    expected = pd.MultiIndex.from_product([test["id"], CLASSES])
    assert len(sample) == len(expected)
    assert set(zip(sample["id"], sample["class"])) == set(expected)
    assert (sample["predicted"] == "").all()
    answers = load_split(tiny, "test", labels_csv="test_labels.csv")
    assert len(answers) == len(test)
    assert (answers[list(CLASSES)] != "").any(axis=None)


def test_every_rle_decodes_within_bounds_and_round_trips(tiny: Path) -> None:
    for split, csv in (("train", "train.csv"), ("test", "test_labels.csv")):
        catalog = scan_split(tiny, split).set_index("id")
        labels = read_labels(tiny / csv)
        filled = labels[labels["segmentation"] != ""]
        assert len(filled) > 0
        for row in filled.itertuples(index=False):
            shape = (int(catalog.at[row.id, "height"]), int(catalog.at[row.id, "width"]))
            mask = rle_decode(row.segmentation, shape, where=row.id)
            assert mask.any()
            assert rle_encode(mask) == row.segmentation


def test_images_are_16_bit_with_a_dark_border_around_the_body(tiny: Path) -> None:
    catalog = scan_split(tiny, "train")
    for _, day in catalog.groupby("volume_id"):
        row = day.iloc[len(day) // 2]
        image = read_slice(row["path"], row["width"], row["height"])
        assert image.dtype == np.uint16
        top = np.percentile(image, 99)
        border = np.concatenate(
            [image[:3].ravel(), image[-3:].ravel(), image[:, :3].ravel(), image[:, -3:].ravel()]
        )
        assert border.mean() < 0.1 * top
        cols = np.flatnonzero((image > 0.3 * top).mean(axis=0) > 0.05)
        assert 0.4 * image.shape[1] < cols[-1] - cols[0] < 0.95 * image.shape[1]


def test_dataset_json_and_stats_agree_with_the_files(tiny: Path) -> None:
    meta = json.loads((tiny / "dataset.json").read_text())
    assert meta["spec"]["name"] == "tiny" and meta["spec"]["seed"] == 0
    tiny_preset = PRESETS["tiny"]
    assert meta["counts"]["train"]["cases"] == tiny_preset.train_cases
    assert meta["counts"]["test"]["days"] == tiny_preset.test_cases
    assert dataset_stats(tiny) == meta["stats"]
    assert (tiny / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- realism


def test_label_statistics_sit_in_the_real_data_bands(medium: tuple[Path, dict]) -> None:
    _, stats = medium
    train = stats["train"]
    assert train["slices"] > 200
    assert 0.3 < train["empty_share"] < 0.55  # real data: 42% of slices carry no label
    for name, c in train["classes"].items():
        assert 0.15 < c["nonempty_share"] < 0.6, name
        assert 0.5 < c["area_pct_mean"] < 5.0, name  # real: about 0.6-7.5% of a 276x276 slice
        assert c["area_pct_max"] < 10.0, name


def test_organs_are_continuous_across_slices_and_overlap_only_now_and_then(medium: tuple[Path, dict]) -> None:
    root, _ = medium
    catalog = load_split(root, "train")
    dice: dict[int, list[float]] = {c: [] for c in range(len(CLASSES))}
    overlapping = 0
    for _, rows in catalog.groupby("volume_id"):
        masks = SPEC.read_volume(rows).mask.astype(bool)
        for c in dice:
            for a, b in zip(masks[:-1, c], masks[1:, c]):
                if a.any() and b.any():
                    dice[c].append(2 * (a & b).sum() / (a.sum() + b.sum()))
        overlapping += int(((masks.sum(axis=1) > 1).any(axis=(1, 2))).sum())
    for c, values in dice.items():
        assert np.mean(values) > 0.55, CLASSES[c]
    assert overlapping / len(catalog) < 0.25


def test_no_single_threshold_separates_organs_from_tissue(medium: tuple[Path, dict]) -> None:
    root, _ = medium
    catalog = load_split(root, "train")
    best = {c: [] for c in range(len(CLASSES))}
    peaks = []
    for _, rows in catalog.groupby("volume_id"):
        volume = SPEC.read_volume(rows)
        peaks.append(np.percentile(volume.image, 99.9))
        for image, masks in zip(volume.image, volume.mask.astype(bool)):
            image = image / max(np.percentile(image, 99), 1.0)
            rest = image[(image > 0.15) & ~masks.any(axis=0)]
            for c in best:
                if masks[c].sum() >= 50:
                    organ = image[masks[c]]
                    ths = np.linspace(0, 1.2, 49)
                    tpr = (organ[:, None] > ths).mean(axis=0)
                    tnr = (rest[:, None] <= ths).mean(axis=0)
                    balanced = (tpr + tnr) / 2
                    best[c].append(np.maximum(balanced, 1 - balanced).max())
    for c, values in best.items():
        assert np.mean(values) < 0.9, CLASSES[c]
    assert max(peaks) > 1.5 * min(peaks)  # the intensity scale changes from volume to volume


def test_truncated_tail_blanks_only_the_last_bowel_labels() -> None:
    job = VolumeJob("", "train", case=5, day=0, size=0, n_slices=48, seed=0, truncate_share=0.0)
    image, full, cut = render_volume(job)
    image_t, short, cut_t = render_volume(dataclasses.replace(job, truncate_share=1.0))
    assert not cut and cut_t
    assert np.array_equal(image, image_t)
    assert np.array_equal(full[:, 2], short[:, 2])  # the stomach keeps its labels
    last = lambda m: int(np.flatnonzero(m[:, :2].any(axis=(1, 2, 3)))[-1])  # noqa: E731
    assert 1 <= last(full) - last(short) <= 4
    end = last(short) + 1
    assert np.array_equal(full[:end], short[:end])
    assert not short[end:, :2].any() and full[end:, :2].any()
