"""Datasets, the predictor (TTA inversion) and `make train-seg` / `make train-cls` end to end on
the tiny synthetic preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, DataCfg, MemberCfg, SegConfig, TTACfg, config_from_text
from pipeline.data.augment import build_augment
from pipeline.data.folds import make_folds
from pipeline.data.geometry import Box, full_box
from pipeline.data.labels import IGNORE
from pipeline.data.prepare import boxes_for, prepare_volume
from pipeline.data.torch_sets import EpochSampler, SliceDataset
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset, load_config  # with the dataset's defaults, as the stages load
from pipeline.datasets.uwmgi_files import CLASSES
from pipeline.errors import DataError
from pipeline.infer.ensemble import find_member_oof, warn_views
from pipeline.infer.predict import MemberError, load_member
from pipeline.io import write_csv
from pipeline.models.predict import forward_views, predict_volume, tta_views
from pipeline.phantoms.uwmgi import generate_dataset
from pipeline.train.fold_data import parse_folds
from pipeline.train.validation import cls_metrics
from stages import train_cls, train_seg

SPEC = get_dataset("uwmgi")
FAST = [
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.batch_size=4",
    "train.val_batch_size=16",
    "data.img_size=[64,64]",
    "data.crop=false",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tiny preset with 3 case-disjoint folds, written once per session."""
    root = tmp_path_factory.getbasetemp() / "tiny_data"
    generate_dataset(root, "tiny", seed=0)
    if not (root / "folds.csv").is_file():
        catalog = SPEC.load_split(root, "train")
        has_label = SPEC.presence(catalog).loc[catalog["id"]].to_numpy().any(axis=1)
        write_csv(root / "folds.csv", make_folds(catalog, has_label, n_folds=3, seed=0))
    return root


@pytest.fixture
def env(tiny_data: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA_DIR", str(tiny_data))
    return isolated_dirs


@pytest.fixture(scope="module")
def store(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> VolumeStore:
    store = VolumeStore(
        tiny_data,
        SPEC.load_split(tiny_data, "train"),
        "train",
        SPEC,
        cache_root=tmp_path_factory.mktemp("cache"),
    )
    store.build(progress=False)
    return store


# --------------------------------------------------------------------------- datasets


def test_train_on_is_checked_at_load() -> None:
    with pytest.raises(ConfigError, match=r"'data.train_on' = 'some' must be one of labelled, all"):
        load_config("demo_seg", ["data.train_on=some"])  # refused when the config is loaded
    with pytest.raises(
        ConfigError, match=r"'data.missing_labels' = 'skip' must be one of empty, drop, ignore"
    ):
        load_config("demo_seg", ["data.missing_labels=skip"])


def test_slice_dataset_items(store: VolumeStore) -> None:
    cfg = DataCfg(k=1, stride=2, img_size=(48, 40), crop=False)
    boxes = boxes_for(cfg, store)
    volume_ids = store.volume_ids
    seg = SliceDataset(store, volume_ids, boxes, cfg, with_masks=True)
    every = SliceDataset(store, volume_ids, boxes, cfg, with_masks=False, train_on="all")
    assert len(every) == len(store.catalog) > len(seg) > 0
    assert seg.presence.any(axis=1).all()
    item = seg[3]
    assert item["image"].shape == (3, 48, 40) and item["image"].dtype == torch.float32
    assert item["target"].shape == (3, 48, 40) and set(item["target"].unique().tolist()) <= {0.0, 1.0}
    volume = store[item["id"].rsplit("_slice", 1)[0]]
    pos = volume.ids.index(item["id"])
    x, _ = prepare_volume(volume.image, boxes[volume.volume_id], cfg)
    np.testing.assert_array_equal(item["image"].numpy(), x[pos])  # the inference preprocessing
    cls_item = every[5]
    expect = SPEC.presence_of(store.catalog, [cls_item["id"]])[0]
    np.testing.assert_array_equal(cls_item["target"].numpy(), expect.astype(np.float32))
    capped = SliceDataset(
        store, volume_ids, boxes, DataCfg(img_size=(48, 40), crop=False, max_volumes=2), with_masks=True
    )
    assert len(capped.volumes) == 2


def test_truncated_tail_is_dropped(store: VolumeStore) -> None:
    cfg = DataCfg(img_size=(32, 32), crop=False, train_on="all", missing_labels="drop")
    data = SliceDataset(store, store.volume_ids, boxes_for(cfg, store), cfg, with_masks=False)
    for volume_id in store.volume_ids:
        volume = store[volume_id]
        labelled = SPEC.presence_of(store.catalog, volume.ids).any(axis=1)
        kept = [i for i in data.ids if i in set(volume.ids)]
        assert kept == volume.ids[: np.flatnonzero(labelled)[-1] + 1]
    assert not data.ignore.any()


def _planned_ignores(store: VolumeStore, tail: int) -> set[tuple[str, int]]:
    """(slice id, class) of the bowel labels in the ``tail`` slices after each volume's last labelled one."""
    out = set()
    for volume_id in store.volume_ids:
        volume = store[volume_id]
        last = int(np.flatnonzero(SPEC.presence_of(store.catalog, volume.ids).any(axis=1))[-1])
        out |= {
            (volume.ids[s], c) for s in range(last + 1, min(last + 1 + tail, len(volume))) for c in (0, 1)
        }
    return out


def test_slice_dataset_carries_ignore_exactly_where_planned(store: VolumeStore) -> None:
    """data.missing_labels=ignore: every slice kept; the bowel maps / presences of the 2 slices after the
    last labelled one are IGNORE throughout, after augmentation; every other target is a plain 0/1 label."""
    cfg = load_config(
        "demo_seg",
        [
            "data.crop=false",
            "data.img_size=[32,32]",
            "data.train_on=all",
            "data.missing_labels=ignore",
            "data.missing_tail=2",
            "data.missing_classes=[large_bowel,small_bowel]",
        ],
    )
    boxes = boxes_for(cfg.data, store)
    seg = SliceDataset(store, store.volume_ids, boxes, cfg.data, augment=build_augment(cfg.augment), seed=1)
    cls = SliceDataset(store, store.volume_ids, boxes, cfg.data, with_masks=False)
    assert seg.ids == cls.ids == [i for d in store.volume_ids for i in store[d].ids]  # nothing dropped
    planned = _planned_ignores(store, tail=2)
    assert planned and {(seg.ids[i], c) for i, c in zip(*np.nonzero(seg.ignore))} == planned
    trusted = dataclasses.replace(cfg.data, missing_labels="empty")
    unplanned = SliceDataset(
        store, store.volume_ids, boxes, trusted, augment=build_augment(cfg.augment), seed=1
    )
    for index, slice_id in enumerate(seg.ids):
        mask, presence = seg[(2, index)]["target"], cls[index]["target"]
        truth = SPEC.presence_of(store.catalog, [slice_id])[0]
        plain = unplanned[(2, index)]["target"]
        for c in range(len(CLASSES)):
            if (slice_id, c) in planned:
                assert (mask[c] == IGNORE).all() and presence[c] == IGNORE, (slice_id, c)
            else:
                assert torch.equal(mask[c], plain[c]), (slice_id, c)  # the same augmented label
                assert set(mask[c].unique().tolist()) <= {0.0, 1.0} and presence[c] == float(truth[c])


def test_order_and_augmentation_reproducible_from_seed_and_epoch(store: VolumeStore) -> None:
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b) and sorted(i for _, i in a) == list(range(50))
    b.set_epoch(3)
    assert [i for _, i in a] != [i for _, i in b] and {e for e, _ in b} == {3}
    cfg = load_config("demo_seg", ["data.crop=false", "data.img_size=[64,64]"])
    data = SliceDataset(
        store, store.volume_ids, boxes_for(cfg.data, store), cfg.data, augment=build_augment(cfg.augment)
    )
    first, again, other = data[(1, 4)], data[(1, 4)], data[(2, 4)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["target"], again["target"])
    assert not torch.equal(first["image"], other["image"])


# --------------------------------------------------------------------------- predictor


class PixelModel(nn.Module):
    """Logits = first three input channels + ``ramp`` * column position (not flip-equivariant when ramp != 0)."""

    def __init__(self, ramp: float = 0.0) -> None:
        super().__init__()
        self.ramp = ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.linspace(-1, 1, x.shape[-1], device=x.device)
        return x[:, :3] + self.ramp * cols


def test_tta_views() -> None:
    assert tta_views(None) == [((), 1.0)]
    assert tta_views(TTACfg(hflip=True, vflip=True, scales=(1.0, 1.25))) == [
        ((), 1.0),
        ((-2,), 1.0),
        ((-1,), 1.0),
        ((-2, -1), 1.0),
        ((), 1.25),
        ((-2,), 1.25),
        ((-1,), 1.25),
        ((-2, -1), 1.25),
    ]


def test_tta_of_an_equivariant_model_equals_no_tta() -> None:
    x = torch.rand(2, 3, 32, 48)
    plain = forward_views(PixelModel(), x, tta_views(None))
    flipped = forward_views(PixelModel(), x, tta_views(TTACfg(hflip=True, vflip=True)))
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-7)
    scaled = forward_views(
        PixelModel(), torch.full((1, 3, 32, 32), 0.3), tta_views(TTACfg(scales=(1.0, 2.0)))
    )
    torch.testing.assert_close(scaled, torch.full((1, 3, 32, 32), 0.3).sigmoid())


def test_flip_views_are_inverted_exactly() -> None:
    x = torch.rand(2, 3, 16, 24)
    model = PixelModel(ramp=2.0)
    out = forward_views(model, x, [((), 1.0), ((-1,), 1.0)])
    cols = torch.linspace(-1, 1, 24)
    expect = ((x + 2.0 * cols).sigmoid() + (x + 2.0 * cols.flip(0)).sigmoid()) / 2
    torch.testing.assert_close(out, expect)


def test_predict_volume_returns_original_geometry() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 3000, size=(5, 40, 50)).astype(np.uint16)
    cfg = load_config("demo_seg", ["data.img_size=[32,32]", "data.k=1"])
    box = Box(4, 6, 36, 44)
    probs = predict_volume(PixelModel(), cfg, image, box, batch_size=2, tta=TTACfg(hflip=True))
    assert probs.shape == (5, 3, 40, 50) and probs.dtype == np.float32
    assert probs[:, :, :4].max() == 0 and probs[:, :, 4:36, 6:44].min() >= 0.5  # sigmoid(x >= 0) inside
    cls_cfg = load_config("demo_cls", ["data.img_size=[32,32]"])
    pooled = nn.Sequential(PixelModel(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert predict_volume(pooled, cls_cfg, image, full_box((40, 50)), tta=TTACfg(vflip=True)).shape == (5, 3)


def test_cls_metrics_handle_single_class_folds() -> None:
    truth = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 0, 1]])
    probs = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.1], [0.7, 0.2, 0.6], [0.4, 0.1, 0.3]])
    out = cls_metrics(truth, probs, CLASSES)
    assert out["auc_large_bowel"] == 1.0 and np.isnan(out["auc_small_bowel"]) and out["auc_stomach"] == 1.0
    assert out["score"] == 1.0 and out["acc_stomach"] == 0.75
    assert (
        cls_metrics(truth[:, [1, 1, 1]], probs, CLASSES)["score"] == (0.5 + 1.0 + 0.75) / 3
    )  # no AUC: mean accuracy


def test_parse_folds() -> None:
    assert parse_folds(["0", "2", "2"]) == [0, 2]
    assert parse_folds(["all"]) == ["all"]
    with pytest.raises(ValueError, match="fold"):
        parse_folds(["x"])


# --------------------------------------------------------------------------- stages


def test_train_seg_end_to_end(env: Path, store: VolumeStore) -> None:
    (out,) = train_seg.main(["--config", "demo_seg", "--folds", "1", "--set", *FAST])
    assert out == env / "runs" / "seg" / "demo_seg" / "fold_1"
    for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml"):
        assert (out / name).is_file(), name
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"score", "dice", "hausdorff", "train_loss"} <= set(metrics.columns) and len(metrics) == 1
    cfg = config_from_text((out / "config.yaml").read_text())
    assert cfg == load_config("demo_seg", FAST)
    val_volumes = sorted(p.stem for p in (out / "oof").glob("*.npz"))
    expect_volumes = sorted(set(_folds(store).query("fold == 1")["volume_id"]))
    assert val_volumes == expect_volumes
    for volume_id in val_volumes:
        oof = np.load(out / "oof" / f"{volume_id}.npz")
        volume = store[volume_id]
        assert oof["probs"].dtype == np.uint8 and oof["probs"].shape == (len(volume), 3, *volume.shape)
        assert oof["ids"].tolist() == volume.ids
    model, loaded = load_member(out, "cpu")
    assert loaded == cfg and not model.training
    volume = store[val_volumes[0]]
    probs = predict_volume(model, cfg, volume.image, full_box(volume.shape), batch_size=8)
    saved = np.load(out / "oof" / f"{val_volumes[0]}.npz")["probs"]
    np.testing.assert_array_equal(np.rint(probs * 255).astype(np.uint8), saved)  # OOF = best.pt, no TTA


def test_oof_tta_writes_the_views_submit_averages(
    env: Path, store: VolumeStore, caplog: pytest.LogCaptureFixture
) -> None:
    """``oof_tta`` set to the ensemble's views: the OOF equals the flip-averaged prediction of best.pt,
    and tune's check is silent; the plain-view OOF against a flip-averaging ensemble is named."""
    (out,) = train_seg.main(["--config", "demo_seg", "--folds", "1", "--set", *FAST, "oof_tta.hflip=true"])
    model, cfg = load_member(out, "cpu")
    assert isinstance(cfg, SegConfig) and cfg.oof_tta == TTACfg(hflip=True)
    volume_id = sorted(p.stem for p in (out / "oof").glob("*.npz"))[0]
    volume = store[volume_id]
    probs = predict_volume(model, cfg, volume.image, full_box(volume.shape), batch_size=8, tta=cfg.oof_tta)
    plain = predict_volume(model, cfg, volume.image, full_box(volume.shape), batch_size=8)
    saved = np.load(out / "oof" / f"{volume_id}.npz")["probs"]
    np.testing.assert_array_equal(np.rint(probs * 255).astype(np.uint8), saved)
    assert not np.array_equal(np.rint(plain * 255).astype(np.uint8), saved)
    member = find_member_oof(MemberCfg(config="demo_seg"))
    with caplog.at_level("WARNING"):
        warn_views(member, TTACfg(hflip=True))
        assert not caplog.records
        warn_views(member, TTACfg(hflip=False))
    assert "OOF predicted with views" in caplog.text and "demo_seg fold 1" in caplog.text


def test_train_seg_folds_side_by_side(env: Path, store: VolumeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--jobs 2` (one spawned process per fold) writes what `--jobs 1` writes, fold by fold."""
    side = train_seg.main(["--config", "demo_seg", "--folds", "2", "0", "--jobs", "2", "--set", *FAST])
    assert [p.name for p in side] == ["fold_2", "fold_0"]
    monkeypatch.setenv("RUNS_DIR", str(env / "runs_sequential"))
    seq = train_seg.main(["--config", "demo_seg", "--folds", "2", "0", "--jobs", "1", "--set", *FAST])
    for a, b in zip(side, seq):
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        names = sorted(p.name for p in (a / "oof").glob("*.npz"))
        assert names and names == sorted(p.name for p in (b / "oof").glob("*.npz"))
        for name in names:  # the same seeds: equal up to thread-count rounding
            pa, pb = (np.load(d / "oof" / name)["probs"].astype(int) for d in (a, b))
            assert np.abs(pa - pb).max() <= 2, name
        ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
        np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-4)


def _folds(store: VolumeStore) -> pd.DataFrame:
    return pd.read_csv(store.root / "folds.csv")


def test_train_seg_with_crop_boxes_and_all_folds(env: Path, store: VolumeStore) -> None:
    rows = []
    for volume_id in store.volume_ids:
        h, w = store[volume_id].shape
        rows.append(
            {"volume_id": volume_id, "y0": 8, "x0": 10, "y1": h - 8, "x1": w - 12, "source": "threshold"}
        )
    write_csv(env / "runs" / "det" / "testdet" / "boxes_train.csv", pd.DataFrame(rows))
    overrides = [*FAST[:-1], "data.crop=true", "data.det_config=testdet", "data.k=0"]
    (out,) = train_seg.main(["--config", "demo_seg_baseline", "--folds", "0", "--set", *overrides])
    for path in (out / "oof").glob("*.npz"):
        probs = np.load(path)["probs"]
        assert probs[:, :, :8].max() == 0 and probs[:, :, :, -12:].max() == 0  # nothing outside the box
    (out_all,) = train_seg.main(["--config", "demo_seg_baseline", "--folds", "all", "--set", *overrides])
    assert out_all.name == "fold_all" and (out_all / "best.pt").is_file() and not (out_all / "oof").exists()


def test_train_cls_end_to_end(env: Path, store: VolumeStore) -> None:
    # the classifier trains on every slice: the bowel presences of each volume's tail are IGNORE
    (out,) = train_cls.main(
        ["--config", "demo_cls", "--folds", "2", "--set", *FAST, "data.missing_labels=ignore"]
    )
    resolved = config_from_text((out / "config.yaml").read_text()).data
    assert resolved.missing_labels == "ignore" and resolved.missing_classes == ("large_bowel", "small_bowel")
    for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml", "oof.csv"):
        assert (out / name).is_file(), name
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"score", "acc", *(f"auc_{c}" for c in CLASSES)} <= set(metrics.columns)
    oof = pd.read_csv(out / "oof.csv")
    assert list(oof.columns) == ["id", "volume_id", *CLASSES]
    val = _folds(store).query("fold == 2")
    assert sorted(oof["id"]) == sorted(val["id"])
    assert oof[list(CLASSES)].to_numpy().min() >= 0 and oof[list(CLASSES)].to_numpy().max() <= 1
    model, cfg = load_member(out, "cpu")
    assert cfg.stage == "cls" and model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_missing_folds_file_says_run_make_folds(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = isolated_dirs / "nofolds"
    generate_dataset(root, "tiny", seed=0)
    monkeypatch.setenv("DATA_DIR", str(root))
    with pytest.raises(DataError, match="make folds"):
        train_seg.main(["--config", "demo_seg", "--folds", "0", "--set", *FAST])


def test_unknown_config_key_fails_before_training(env: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*did you mean 'epochs'"):
        train_seg.main(["--config", "demo_seg", "--folds", "0", "--set", "train.epoch=1"])
    with pytest.raises(ConfigError, match="'cls' stage"):
        train_cls.main(["--config", "demo_seg", "--folds", "0"])
    assert not (env / "runs").exists()


def test_load_member_names_the_missing_run(env: Path) -> None:
    with pytest.raises(MemberError, match=r"make train-seg CONFIG=configs/nothing\.yaml FOLDS=3"):
        load_member(env / "runs" / "seg" / "nothing" / "fold_3", "cpu")
