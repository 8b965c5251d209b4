"""Preprocessing: 2.5D stacks clamped at the ends, one path for training items and whole volumes,
crop + resize/pad geometry with an exact paste-back, crop boxes from the detector's CSV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, DataCfg, load_config
from pipeline.data.geometry import Box, Geometry, full_box
from pipeline.data.prepare import (
    boxes_for,
    geometry_for,
    prepare_masks,
    prepare_slice,
    prepare_volume,
    volume_scale_of,
)
from pipeline.data.torch_sets import SliceDataset
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import load_split
from pipeline.errors import DataError
from pipeline.phantoms.uwmgi import generate_dataset

SPEC = get_dataset("uwmgi")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tiny preset (3 train cases x 2 days x ~12 slices), written once per session."""
    root = tmp_path_factory.getbasetemp() / "tiny_data"
    generate_dataset(root, "tiny", seed=0)
    return root


def ramp_volume(n: int = 7, shape: tuple[int, int] = (20, 30)) -> np.ndarray:
    """Slice i is the constant 100 * (i + 1), so a prepared channel tells which slice it came from."""
    return (100 * (np.arange(n) + 1))[:, None, None].repeat(shape[0], 1).repeat(shape[1], 2).astype(np.uint16)


def test_stack_channels_are_clamped_neighbours() -> None:
    volume = ramp_volume()
    cfg = DataCfg(k=2, stride=2, img_size=(20, 30), normalize="volume", crop=False)
    x, geometry = prepare_volume(volume, full_box((20, 30)), cfg)
    assert x.shape == (7, 5, 20, 30) and x.dtype == np.float32
    scale = np.percentile(volume.astype(np.float32), 99.5)
    for i in range(7):
        for c, offset in enumerate((-4, -2, 0, 2, 4)):
            source = min(max(i + offset, 0), 6)
            np.testing.assert_allclose(x[i, c], min(100 * (source + 1) / scale, 1.5), rtol=1e-6)
    assert geometry == Geometry((20, 30), full_box((20, 30)), (20, 30), "resize")


def test_k0_is_a_single_channel_and_image_mode_scales_each_stack() -> None:
    volume = ramp_volume()
    x, _ = prepare_volume(volume, full_box((20, 30)), DataCfg(k=0, img_size=(16, 16), normalize="image"))
    assert x.shape == (7, 1, 16, 16)
    np.testing.assert_allclose(x, 1.0, rtol=1e-6)  # each constant slice is its own 99.5th percentile


@pytest.mark.parametrize("normalize", ["image", "volume", "channel"])
@pytest.mark.parametrize("resize", ["resize", "pad"])
def test_training_item_equals_row_of_prepared_day(tiny_data: Path, normalize: str, resize: str) -> None:
    store = VolumeStore(
        tiny_data, load_split(tiny_data, "train"), "train", SPEC, cache_root=tiny_data.parent / "cache_prep"
    )
    volume = store[store.volume_ids[0]]
    h, w = volume.shape
    box = Box(h // 8, w // 6, h - h // 10, w - w // 5)
    cfg = DataCfg(k=1, stride=2, img_size=(48, 64), resize=resize, normalize=normalize)
    x, geometry = prepare_volume(volume.image, box, cfg)
    assert x.shape == (len(volume), 3, 48, 64)
    assert geometry == geometry_for(volume.shape, box, cfg)
    vscale = volume_scale_of(volume.image, geometry, normalize)
    for i in (0, 1, len(volume) // 2, len(volume) - 1):
        np.testing.assert_array_equal(prepare_slice(volume.image, i, geometry, cfg, vscale), x[i])
    assert x.min() >= 0.0 and x.max() <= 1.5


def test_channel_normalisation_scales_each_channel_by_its_own_volume_percentile() -> None:
    """Brute-force twin: LGG-like (S, 3, H, W) volume whose channels have unrelated ranges; every
    channel of every slice of the 2.5D stack is divided by that channel's 99.5th percentile over the
    whole (cropped, resized) volume, and a training item equals its row of the prepared volume."""
    rng = np.random.default_rng(3)
    image = (
        rng.gamma(2.0, 1.0, (6, 3, 20, 24)).astype(np.float32) * np.array([5, 60, 900])[None, :, None, None]
    )
    cfg = DataCfg(k=1, stride=1, img_size=(20, 24), normalize="channel")
    x, geometry = prepare_volume(image, full_box((20, 24)), cfg)
    assert x.shape == (6, 9, 20, 24)
    planes = geometry.forward(image)
    scales = [np.percentile(planes[:, c], 99.5) for c in range(3)]
    for i in range(6):
        for j, src in enumerate((max(i - 1, 0), i, min(i + 1, 5))):
            for c in range(3):
                want = np.clip(planes[src, c] / scales[c], 0.0, x.max())
                np.testing.assert_allclose(x[i, 3 * j + c], want, rtol=1e-5, atol=1e-6)
    vscale = volume_scale_of(image, geometry, "channel")
    for i in range(6):
        np.testing.assert_array_equal(prepare_slice(image, i, geometry, cfg, vscale), x[i])


def test_unknown_normalize_mode_fails_at_config_load() -> None:
    with pytest.raises(ConfigError, match=r"'data\.normalize' = 'zscore' must be one of image, volume"):
        load_config("configs/demo_seg.yaml", ["data.normalize=zscore"])


def blobs(shape: tuple[int, int], n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 3, *shape), np.uint8)
    for s in range(n):
        for c in range(3):
            cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
            cv2.circle(masks[s, c], (int(cx), int(cy)), int(rng.integers(3, 7)), 1, -1)
    return masks


@pytest.mark.parametrize(
    ("box", "size", "mode"),
    [
        (Box(10, 20, 26, 52), (32, 64), "resize"),  # x2 in both directions
        (Box(10, 20, 26, 52), (64, 64), "pad"),  # scaled x2 to 32x64, centred with 16 rows above
        (Box(0, 0, 60, 80), (60, 80), "resize"),  # identity
    ],
)
def test_masks_paste_back_exactly_inside_the_box(box: Box, size: tuple[int, int], mode: str) -> None:
    shape = (60, 80)
    masks = blobs(shape)
    geometry = Geometry(shape, box, size, mode)
    net = prepare_masks(masks, geometry)
    assert net.shape == (4, 3, *size) and net.dtype == np.uint8
    back = geometry.inverse(net, interpolation=cv2.INTER_NEAREST)
    ys, xs = box.slices()
    np.testing.assert_array_equal(back[..., ys, xs], masks[..., ys, xs])
    outside = np.ones(shape, bool)
    outside[ys, xs] = False
    assert not back[..., outside].any()


def test_pad_mode_keeps_aspect_and_leaves_a_zero_border() -> None:
    geometry = Geometry((60, 80), Box(10, 20, 26, 52), (64, 64), "pad")
    image = np.ones((1, 60, 80), np.float32)
    net = geometry.forward(image)
    rows = np.flatnonzero(net[0].any(axis=1))
    assert (rows.min(), rows.max()) == (16, 47) and net[0, 16:48].all()


def test_paste_back_of_a_resampled_crop_is_close(tiny_data: Path) -> None:
    store = VolumeStore(
        tiny_data, load_split(tiny_data, "train"), "train", SPEC, cache_root=tiny_data.parent / "cache_prep"
    )
    volume = store[store.volume_ids[1]]
    h, w = volume.shape
    box = Box(h // 7, w // 9, h - h // 11, w - w // 8)
    for mode in ("resize", "pad"):
        geometry = Geometry(volume.shape, box, (96, 80), mode)
        probs = prepare_masks(volume.mask, geometry).astype(np.float32)
        back = geometry.inverse(probs) > 0.5
        truth = np.asarray(volume.mask, bool)
        inter, total = (back & truth).sum(), back.sum() + truth.sum()
        assert 2 * inter / total > 0.9


def test_boxes_full_frame_without_crop(tiny_data: Path) -> None:
    catalog = load_split(tiny_data, "train")
    boxes = boxes_for(DataCfg(crop=False), catalog, "train")
    assert set(boxes) == set(catalog["volume_id"])
    for row in catalog.drop_duplicates("volume_id").itertuples():
        assert boxes[row.volume_id] == full_box((row.height, row.width))


def test_boxes_from_the_detector_csv(tiny_data: Path, isolated_dirs: Path) -> None:
    catalog = load_split(tiny_data, "train")
    cfg = DataCfg(crop=True, det_config="testdet")
    with pytest.raises(DataError, match="make train-det"):
        boxes_for(cfg, catalog, "train")
    days = list(dict.fromkeys(catalog["volume_id"]))
    rows = [
        {"volume_id": d, "y0": 5 + i, "x0": 6, "y1": 90, "x1": 10_000, "source": "detector"}
        for i, d in enumerate(days)
    ]
    path = isolated_dirs / "runs" / "det" / "testdet" / "boxes_train.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    store = VolumeStore(tiny_data, catalog, "train", SPEC, cache_root=isolated_dirs / "cache")
    boxes = boxes_for(cfg, store, "train")
    width = int(catalog.loc[catalog["volume_id"] == days[1], "width"].iloc[0])
    assert boxes[days[1]] == Box(6, 6, 90, width)  # clipped to the slice
    pd.DataFrame(rows[1:]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=days[0]):
        boxes_for(cfg, catalog, "train")


def test_multichannel_volume_keeps_each_slices_channels_together() -> None:
    """(S, C, H, W) input (LGG's three contrasts): the stack is [slice i-s (all C), i, i+s], as brute force."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, size=(6, 3, 32, 32)).astype(np.uint8)
    cfg = DataCfg(k=1, stride=2, img_size=(32, 32), crop=False, normalize="volume")
    x, _ = prepare_volume(image, full_box((32, 32)), cfg)
    assert x.shape == (6, 9, 32, 32)
    scale = np.percentile(image.astype(np.float32), 99.5)
    for i in range(6):
        rows = [min(max(i + o, 0), 5) for o in (-2, 0, 2)]
        expect = np.clip(np.concatenate([image[r] for r in rows]).astype(np.float32) / scale, 0, 1.5)
        np.testing.assert_allclose(x[i], expect, rtol=1e-5, atol=1e-5)
    geometry = geometry_for((32, 32), full_box((32, 32)), cfg)
    vscale = volume_scale_of(image, geometry, "volume")
    for i in (0, 3, 5):  # the training item is the same computation for one slice
        np.testing.assert_array_equal(prepare_slice(image, i, geometry, cfg, vscale), x[i])


def _dropout_set(p: float, channels: int = 3, fill: int | None = 1) -> SliceDataset:
    """A SliceDataset holding only what channel dropout reads (no volumes needed)."""
    data = SliceDataset.__new__(SliceDataset)
    data.seed, data.channels, data.fill_channel, data.channel_dropout = 5, channels, fill, p
    return data


def test_channel_dropout_copies_the_fill_channel_consistently_over_the_stack() -> None:
    """Each non-fill channel is either untouched or the fill channel's copy, the same way in all 2k+1
    slices of the stack; about p of them are dropped; the draw is reproducible per (epoch, item)."""
    data = _dropout_set(0.3)
    rng = np.random.default_rng(0)
    dropped, seen = 0, 0
    for index in range(400):
        image = rng.random((9, 4, 5)).astype(np.float32)  # k=1: 3 slices x 3 channels
        out = data._drop_channels(image.copy(), epoch=2, index=index)
        np.testing.assert_array_equal(out[1::3], image[1::3])  # FLAIR itself never changes
        for c in (0, 2):
            same = np.array_equal(out[c::3], image[c::3])
            copied = np.array_equal(out[c::3], image[1::3])
            assert same != copied  # all three slices of channel c: untouched, or all copied
            dropped, seen = dropped + copied, seen + 1
        again = data._drop_channels(image.copy(), epoch=2, index=index)
        np.testing.assert_array_equal(again, out)
    assert 0.25 < dropped / seen < 0.35


def test_channel_dropout_on_a_dataset_without_fill_channel_is_a_config_error() -> None:
    from types import SimpleNamespace

    store = SimpleNamespace(spec=get_dataset("uwmgi"))
    with pytest.raises(
        ConfigError, match=r"data\.channel_dropout = 0\.2: the uwmgi dataset declares no fill"
    ):
        SliceDataset(store, [], {}, DataCfg(), channel_dropout=0.2)  # type: ignore[arg-type]
    assert get_dataset("lgg").fill_channel == 1
