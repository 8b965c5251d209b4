"""The 3D member: MONAI networks by name, patches, sliding-window TTA, and `make train-seg` end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, ModelCfg, TTACfg, config_from_text, load_config
from pipeline.config.networks3d import dynunet_plan, total_stride
from pipeline.data.folds import make_folds
from pipeline.data.geometry import full_box
from pipeline.data.labels import IGNORE
from pipeline.data.prepare import boxes_for
from pipeline.data.volume3d import PatchDataset, build_augment3d
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.infer.predict import load_member
from pipeline.io import write_csv
from pipeline.models.predict import build_model, predict_sliding_window, predict_volume
from pipeline.models.segmenter3d import build_segmenter3d
from pipeline.phantoms.uwmgi import generate_dataset
from pipeline.train import checkpoint, engine
from stages import train_seg

SPEC = get_dataset("uwmgi")
FAST3D = [
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.batch_size=2",
    "data.img_size=[32,32]",
    "data.crop=false",
    "seg3d.patch_size=[8,32,32]",
    "seg3d.roi_size=[8,32,32]",
    "seg3d.samples_per_volume=2",
    "model.kwargs={init_filters: 8, blocks_down: [1, 1, 1, 1], blocks_up: [1, 1, 1]}",
]


def cfg3d(*overrides: str):
    return load_config("demo_seg3d", [*FAST3D, *overrides])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tiny preset with 3 case-disjoint folds."""
    root = tmp_path_factory.mktemp("tiny3d")
    generate_dataset(root, "tiny", seed=0)
    catalog = SPEC.load_split(root, "train")
    has_label = SPEC.presence(catalog).loc[catalog["id"]].to_numpy().any(axis=1)
    write_csv(root / "folds.csv", make_folds(catalog, has_label, n_folds=3, seed=0))
    return root


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


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("SegResNet", {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}),
        ("UNet", {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}),
        ("DynUNet", {}),
    ],
)
def test_each_network_builds_and_keeps_the_shape(arch: str, kwargs: dict) -> None:
    patch = (16, 32, 32)
    model = build_segmenter3d(ModelCfg(arch=arch, spatial_dims=3, kwargs=kwargs), 2, 3, patch).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 2, *patch))
    assert out.shape == (1, 3, *patch)


def test_swin_unetr_builds_offline() -> None:
    cfg = ModelCfg(arch="swinunetr", spatial_dims=3, kwargs={"feature_size": 12, "depths": (1, 1, 1, 1)})
    model = build_segmenter3d(cfg, 1, 3, (64, 64, 64))
    assert type(model).__name__ == "SwinUNETR"
    with pytest.raises(ConfigError, match=r"multiple of \[32, 32, 32\]"):
        build_segmenter3d(cfg, 1, 3, (48, 64, 64))


@pytest.mark.slow
def test_swin_unetr_forward() -> None:
    cfg = ModelCfg(arch="SwinUNETR", spatial_dims=3, kwargs={"feature_size": 12, "depths": (1, 1, 1, 1)})
    model = build_segmenter3d(cfg, 1, 3, (64, 64, 64)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)


def test_unknown_network_and_bad_sizes_are_refused_by_key() -> None:
    with pytest.raises(ConfigError, match=r"model.arch 'VNetX' is not a 3D network.*SegResNet"):
        build_segmenter3d(ModelCfg(arch="VNetX", spatial_dims=3), 1, 3, (16, 32, 32))
    with pytest.raises(
        ConfigError, match=r"'seg3d.roi_size' = \[12, 32, 32\] must be a multiple of \[8, 8, 8\]"
    ):  # at load, before any volume is decoded
        load_config("demo_seg3d", ["seg3d.roi_size=[12,32,32]"])
    with pytest.raises(ConfigError, match=r"'model.arch' = 'VNetX' is not one of the 3D networks"):
        load_config("demo_seg3d", ["model.arch=VNetX"])
    with pytest.raises(ConfigError, match=r"data.k.*must be 0 for a 3D member"):
        load_config("demo_seg3d", ["data.k=1"])
    with pytest.raises(ConfigError, match=r"train.channels_last.*must be false"):
        load_config("demo_seg3d", ["train.channels_last=true"])


def test_dynunet_plan_by_hand() -> None:
    kernels, strides = dynunet_plan((32, 64, 64))
    assert strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 3]] * 5
    assert total_stride("DynUNet", {"strides": strides}) == (8, 16, 16)


# --------------------------------------------------------------------------- inference


class Pointwise(nn.Module):
    """logits = a 1x1x1 convolution: a window's output does not depend on the window."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Asymmetric(nn.Module):
    """A 3x3x3 convolution with random weights plus a left-right ramp: not flip-equivariant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[-1], device=x.device)
        return self.conv(x) + ramp


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=(12, 20, 24)).astype(np.uint16)


def test_sliding_window_stitches_windows_exactly() -> None:
    """Overlapping Gaussian-weighted windows of a pointwise model = the model on the whole volume."""
    cfg = cfg3d("seg3d.roi_size=[8,16,16]", "seg3d.overlap=0.5")
    image, model = _volume(), Pointwise()
    probs = predict_volume(model, cfg, image, full_box(image.shape[1:]), tta=None)
    assert probs.shape == (12, 3, 20, 24) and probs.dtype == np.float32
    whole = predict_volume(
        model, replace(cfg, seg3d=replace(cfg.seg3d, roi_size=(16, 32, 32))), image, full_box((20, 24))
    )
    np.testing.assert_allclose(probs, whole, atol=1e-5)


def test_flip_tta_is_inverted_exactly() -> None:
    """hflip TTA = mean of the plain view and the un-flipped prediction of the flipped volume."""
    cfg = cfg3d("seg3d.roi_size=[16,32,32]")  # one window: the views differ by the flip alone
    image, model, box = _volume(1), Asymmetric(), full_box((20, 24))
    plain = predict_volume(model, cfg, image, box, tta=None)
    mirrored = predict_volume(model, cfg, np.ascontiguousarray(image[..., ::-1]), box, tta=None)[..., ::-1]
    tta = predict_volume(model, cfg, image, box, tta=TTACfg(hflip=True, vflip=False))
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert np.abs(plain - mirrored).max() > 1e-3  # the model is not flip-equivariant: the test can fail
    both = predict_volume(model, cfg, image, box, tta=TTACfg(hflip=True, vflip=True))
    upside = predict_volume(model, cfg, np.ascontiguousarray(image[:, ::-1]), box, tta=None)[:, :, ::-1]
    rotated = predict_volume(model, cfg, np.ascontiguousarray(image[:, ::-1, ::-1]), box, tta=None)[
        :, :, ::-1, ::-1
    ]
    np.testing.assert_allclose(both, (plain + mirrored + upside + rotated) / 4, atol=1e-5)


def test_predict_volume_runs_a_3d_member_by_sliding_window() -> None:
    cfg = cfg3d()
    model = build_model(cfg, get_dataset(cfg.dataset))
    assert isinstance(model, nn.Module) and type(model).__name__ == "SegResNet"
    image = _volume(2)
    probs = predict_volume(model, cfg, image, full_box((20, 24)), batch_size=4)
    np.testing.assert_array_equal(
        probs, predict_sliding_window(model, cfg.data, cfg.seg3d, image, full_box((20, 24)))
    )


# --------------------------------------------------------------------------- patches


def test_patch_items_are_seeded_and_centred_on_labels(store: VolumeStore) -> None:
    cfg = cfg3d("seg3d.pos=1.0", "seg3d.neg=0.0", "seg3d.samples_per_volume=3")
    data = PatchDataset(store, store.volume_ids, boxes_for(cfg.data, store), cfg, seed=3)
    assert len(data) == len(store.volume_ids)
    item = data[(1, 0)]
    assert item["image"].shape == (3, 1, 8, 32, 32) and item["target"].shape == (3, 3, 8, 32, 32)
    again, other = data[(1, 0)], data[(2, 0)]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["target"], again["target"])
    assert not torch.equal(item["image"], other["image"])
    for index in range(len(data)):
        if (data.prepared(index)[1] > 0).any():  # pos only: every patch holds a labelled voxel
            assert all((t > 0).any() for t in data[(0, index)]["target"])
    batch = PatchDataset.collate_fn([item, other])
    assert batch["image"].shape == (6, 1, 8, 32, 32) and batch["id"] == [item["id"]] * 2


def test_patch_targets_carry_the_ignore_label_on_missing_planes(store: VolumeStore) -> None:
    cfg = cfg3d("data.missing_labels=ignore", "data.missing_classes=[large_bowel]")
    data = PatchDataset(store, store.volume_ids, boxes_for(cfg.data, store), cfg)
    checked = 0
    for index, item in enumerate(data.volumes):
        present = SPEC.presence(store.catalog).loc[store[item.volume_id].ids].to_numpy(bool)
        labelled = np.flatnonzero(present.any(axis=1))
        _, target = data.prepared(index)  # (classes, S, H, W)
        tail = slice(labelled[-1] + 1, None)
        assert (target[0, tail] == IGNORE).all()  # large_bowel ignored after the last labelled slice
        assert (target[1:, tail] == 0).all() and (target[:, : labelled[-1] + 1] >= 0).all()
        checked += target[0, tail].size > 0
    assert checked  # at least one volume has a tail


def test_augment3d_names_monai_dictionary_transforms() -> None:
    from pipeline.config import AugSpec
    from pipeline.data.augment import AugmentError

    compose = build_augment3d([AugSpec("RandFlipd", {"spatial_axis": [2], "prob": 1.0})])
    sample = {"image": torch.arange(8.0).reshape(1, 1, 2, 4), "label": torch.arange(8.0).reshape(1, 1, 2, 4)}
    out = compose(sample)
    assert torch.equal(torch.as_tensor(out["image"]), torch.flip(sample["image"], (-1,)))
    assert torch.equal(
        torch.as_tensor(out["label"]), torch.flip(sample["label"], (-1,))
    )  # spatial: both keys
    with pytest.raises(AugmentError, match=r"'HorizontalFlip' is not a MONAI dictionary transform"):
        build_augment3d([AugSpec("HorizontalFlip", {})])
    with pytest.raises(AugmentError, match=r"RandFlipd.*unknown or reserved arguments \['probability'\]"):
        build_augment3d([AugSpec("RandFlipd", {"probability": 0.5})])


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def env(tiny_data: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA_DIR", str(tiny_data))
    return isolated_dirs


def test_train_3d_member_resumes_and_writes_oof_in_the_2d_format(
    env: Path, store: VolumeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (out,) = train_seg.main(["--config", "demo_seg3d", "--folds", "1", "--set", *FAST3D, "train.epochs=2"])
    for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml"):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    cfg = config_from_text((out / "config.yaml").read_text())
    val_volumes = sorted(p.stem for p in (out / "oof").glob("*.npz"))
    assert val_volumes == sorted(set(pd.read_csv(store.root / "folds.csv").query("fold == 1")["volume_id"]))
    model, loaded = load_member(out, "cpu")
    assert loaded == cfg
    for volume_id in val_volumes:
        oof = np.load(out / "oof" / f"{volume_id}.npz")
        volume = store[volume_id]
        assert oof["probs"].dtype == np.uint8 and oof["probs"].shape == (len(volume), 3, *volume.shape)
        assert oof["ids"].tolist() == volume.ids
        probs = predict_volume(model, cfg, volume.image, full_box(volume.shape))
        np.testing.assert_array_equal(np.rint(probs * 255).astype(np.uint8), oof["probs"])  # OOF = best.pt

    # killed after epoch 1 of 2, then resumed: the same weights as the straight two-epoch run
    real_epoch = engine._train_epoch

    def killed_in_epoch_2(run, loader, loss_fn, epoch, progress):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(run, loader, loss_fn, epoch, progress)

    monkeypatch.setenv("RUNS_DIR", str(env / "runs_killed"))
    monkeypatch.setattr(engine, "_train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_seg.main(["--config", "demo_seg3d", "--folds", "1", "--set", *FAST3D, "train.epochs=2"])
    monkeypatch.setattr(engine, "_train_epoch", real_epoch)
    (resumed,) = train_seg.main(
        ["--config", "demo_seg3d", "--folds", "1", "--set", *FAST3D, "train.epochs=2"]
    )
    assert resumed.parents[2].name == "runs_killed"
    assert len(pd.read_csv(resumed / "metrics.csv")) == 2
    a, b = checkpoint.read(out / "last.pt")["model"], checkpoint.read(resumed / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_fold_wise_fine_tuning_fills_the_fold_into_the_weights_path(isolated_dirs: Path) -> None:
    from pipeline.train.fold_data import fold_weights

    cfg = load_config("full_seg3d_segresnet_ft", stage="seg")
    filled = fold_weights(cfg, 3).model.pretrained_path
    assert filled == str(isolated_dirs / "runs" / "seg" / "full_seg3d_segresnet" / "fold_3" / "best.pt")
    assert fold_weights(cfg3d(), 1) == cfg3d()  # nothing to fill: the config is returned as is
    bad = load_config("demo_seg3d", ["model.pretrained_path=/w/{model}.pt"])
    with pytest.raises(
        ConfigError, match=r"'model.pretrained_path' = '/w/\{model\}.pt': only \{fold\} and \{runs\}"
    ):
        fold_weights(bad, 0)
