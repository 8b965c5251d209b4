"""Body detector: crop geometry round trips, box algebra, the fallback chain, and a tiny
end-to-end `train_det` run that must never touch the network."""

from __future__ import annotations

import socket
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import ConfigError, DetParams, load_config
from pipeline.data.geometry import (
    Box,
    Geometry,
    box_iou,
    full_box,
    pad_box,
    threshold_box,
    union_boxes,
    volume_threshold_box,
)
from pipeline.datasets.uwmgi_files import CLASSES, make_id, slice_filename
from pipeline.errors import DataError
from pipeline.models.box_quality import mask_inside
from pipeline.models.detector import (
    arch_yaml,
    boxes_path,
    build_yolo,
    check_train_args,
    load_boxes,
    model_source,
    write_boxes,
)
from pipeline.models.detector_boxes import BodyDetector, choose_volume_box
from pipeline.models.yolo_data import split_cases, yolo_label
from pipeline.rle import rle_encode_numpy


def body_slice(
    shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float], rng
) -> np.ndarray:
    """A dark frame with a noisy bright ellipse ("the body") and sparse faint background noise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1
    image = (rng.integers(0, 40, size=shape) * (rng.random(shape) < 0.3)).astype(np.float32)
    image[inside] = 800 + rng.normal(0, 120, size=int(inside.sum()))
    return np.clip(image, 0, 65535).astype(np.uint16)


def write_body_dataset(
    root: Path, n_cases: int = 4, n_days: int = 1, n_slices: int = 8, shape=(64, 80)
) -> Path:
    """Kaggle layout with ellipse bodies; one organ blob inside the body on half the slices."""
    rng = np.random.default_rng(0)
    rows = []
    for case in range(1, n_cases + 1):
        for day in range(n_days):
            folder = root / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
            folder.mkdir(parents=True, exist_ok=True)
            centre = (shape[0] / 2 + rng.uniform(-6, 6), shape[1] / 2 + rng.uniform(-8, 8))
            radii = (shape[0] * rng.uniform(0.25, 0.35), shape[1] * rng.uniform(0.25, 0.35))
            for s in range(1, n_slices + 1):
                image = body_slice(shape, centre, radii, rng)
                cv2.imwrite(str(folder / slice_filename(s, shape[1], shape[0], 1.5, 1.5)), image)
                organ = np.zeros(shape, np.uint8)
                if s % 2:
                    cy, cx = int(centre[0]), int(centre[1] + radii[1] / 2)
                    organ[cy - 3 : cy + 3, cx - 3 : cx + 3] = 1
                for name in CLASSES:
                    seg = rle_encode_numpy(organ) if name == "stomach" else ""
                    rows.append({"id": make_id(case, day, s), "class": name, "segmentation": seg})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", ["resize", "pad"])
@pytest.mark.parametrize("box", [Box(5, 7, 45, 70), Box(0, 0, 60, 80), Box(10, 30, 30, 40)])
def test_crop_paste_back_inverts_exactly(mode: str, box: Box) -> None:
    """Network-sized planes pasted back and cropped again give the same planes; the original
    slice survives crop -> network size -> paste back when the network size equals the crop."""
    shape = (60, 80)
    rng = np.random.default_rng(1)
    same = Geometry(shape, box, (box.height, box.width), mode)
    image = rng.random((2, 3, *shape)).astype(np.float32)
    back = same.inverse(same.forward(image))
    np.testing.assert_array_equal(back[(..., *box.slices())], image[(..., *box.slices())])
    outside = np.ones(shape, bool)
    outside[box.slices()] = False
    assert not back[..., outside].any()
    # nearest-neighbour masks on an upscaled canvas: inverse(forward(m)) == m inside the box
    geo = Geometry(shape, box, (box.height * 2, box.width * 3), mode)
    mask = (rng.random(shape) > 0.5).astype(np.uint8)
    round_trip = geo.inverse(geo.forward(mask, cv2.INTER_NEAREST), cv2.INTER_NEAREST)
    np.testing.assert_array_equal(round_trip[box.slices()], mask[box.slices()])


def test_pad_mode_keeps_aspect_and_centres() -> None:
    geo = Geometry((60, 80), Box(10, 0, 30, 80), (32, 32), "pad")
    planes = geo.forward(np.ones((60, 80), np.float32))
    rows = np.flatnonzero(planes.any(axis=1))
    assert planes.shape == (32, 32) and rows.min() == 12 and rows.max() == 19  # 8 rows of 32, centred
    assert planes[12:20].all()  # the crop spans the full width


def test_box_union_pad_clip_iou() -> None:
    a, b = Box(2, 3, 10, 12), Box(5, 1, 20, 8)
    assert union_boxes([a, b]) == Box(2, 1, 20, 12)
    assert union_boxes([]) is None
    assert pad_box(Box(2, 3, 10, 12), 0.1, (20, 40)) == Box(0, 0, 12, 16)  # dy=2, dx=4, clipped at 0
    assert pad_box(Box(15, 30, 20, 40), 0.1, (20, 40)) == Box(13, 26, 20, 40)
    assert Box(-3, -2, 50, 60).clip((40, 45)) == Box(0, 0, 40, 45)
    assert box_iou(a, a) == 1.0
    assert box_iou(Box(0, 0, 10, 10), Box(0, 5, 10, 15)) == pytest.approx(50 / 150)
    assert box_iou(Box(0, 0, 5, 5), Box(5, 5, 9, 9)) == 0.0
    with pytest.raises(ValueError):
        Box(3, 3, 3, 9)


def test_threshold_box_finds_synthetic_body() -> None:
    rng = np.random.default_rng(2)
    image = body_slice((64, 80), (30, 44), (14, 20), rng)
    box = threshold_box(image)
    assert box is not None
    assert abs(box.y0 - 16) <= 2 and abs(box.y1 - 45) <= 2 and abs(box.x0 - 24) <= 2 and abs(box.x1 - 65) <= 2
    assert threshold_box(np.zeros((64, 80), np.uint16)) is None
    assert yolo_label(Box(16, 24, 44, 64), (64, 80)) == "0 0.550000 0.468750 0.500000 0.437500\n"
    assert yolo_label(None, (64, 80)) == ""


def test_mask_inside_counts() -> None:
    mask = np.zeros((2, 10, 10), bool)
    mask[0, 1:3, 1:3] = True
    mask[1, 8, 8] = True
    assert mask_inside(mask, Box(0, 0, 5, 5)) == (4, 5)
    assert mask_inside(mask, full_box((10, 10))) == (5, 5)


# --------------------------------------------------------------------------- fallback chain


class NoDetections(BodyDetector):
    """A detector that never finds anything (no network, no ultralytics)."""

    def __init__(self, params: DetParams):
        super().__init__(yolo=None, params=params)
        self.calls: list[int] = []

    def detect(self, slices, batch=32):
        self.calls.append(len(slices))
        return [[] for _ in slices]


class FixedDetections(NoDetections):
    def detect(self, slices, batch=32):
        self.calls.append(len(slices))
        return [[(Box(10 + i, 12, 30, 40 + i), 0.9)] if i % 2 else [] for i in range(len(slices))]


def test_fallback_chain_detector_threshold_full() -> None:
    params = DetParams(margin=0.1, predict_step=3)
    rng = np.random.default_rng(3)
    volume = np.stack([body_slice((64, 80), (30, 44), (14, 20), rng) for _ in range(8)])
    found = FixedDetections(params)
    box, source = found.volume_box(volume)
    assert source == "detector" and found.calls == [4]  # slices 0, 3, 6 and the last one, 7
    assert box == pad_box(Box(11, 12, 30, 43), 0.1, (64, 80))
    none = NoDetections(params)
    box, source = none.volume_box(volume)
    assert source == "threshold" and box == volume_threshold_box(volume, 0.1)
    box, source = none.volume_box(np.zeros((5, 64, 80), np.uint16))
    assert (box, source) == (full_box((64, 80)), "full")
    assert choose_volume_box(volume, [], params)[1] == "threshold"


# --------------------------------------------------------------------------- boxes file


def test_boxes_csv_round_trip_and_missing(isolated_dirs: Path) -> None:
    with pytest.raises(DataError, match="make train-det"):
        load_boxes("nope_det")
    boxes = {"case1_day0": (Box(1, 2, 30, 40), "detector"), "case2_day3": (Box(0, 0, 64, 80), "full")}
    write_boxes(boxes_path("some_det"), boxes)
    assert load_boxes("some_det") == {k: b for k, (b, _) in boxes.items()}
    assert load_boxes("configs/some_det.yaml") == load_boxes("some_det")


def test_split_cases_by_case() -> None:
    rng = np.random.default_rng(0)
    assert split_cases([1], 0.5, rng) == set()
    assert len(split_cases(list(range(10)), 0.2, rng)) == 2
    assert len(split_cases([1, 2], 0.9, rng)) == 1


def test_config_errors_before_any_work() -> None:
    with pytest.raises(ConfigError, match="did you mean 'lr0'"):
        check_train_args({"lr00": 0.01})
    for key in ("data", "amp"):
        with pytest.raises(ConfigError, match="set by the detector adapter"):
            check_train_args({key: "x"})
    check_train_args({"lr0": 0.01, "mosaic": 0.0})
    with pytest.raises(ConfigError, match=r"no \.pt weights are ever downloaded"):
        model_source("yolov8n.pt")
    assert model_source("yolov8n.yaml") == "yolov8n.yaml"


def test_model_yaml_rebuilds_any_scale(tmp_path: Path) -> None:
    """model.yaml has no scale in its file name: the s-scale net must still come back exactly."""
    from ultralytics.nn.tasks import DetectionModel

    net = DetectionModel("yolov8s.yaml", nc=1, verbose=False)
    (tmp_path / "model.yaml").write_text(arch_yaml(net))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    yolo = build_yolo(tmp_path / "model.yaml", state)  # strict: any shape mismatch raises
    assert yolo.model.yaml["nc"] == 1 and yolo.model.names == {0: "body"}
    torch.testing.assert_close(yolo.model.state_dict(), state)
    with pytest.raises(DataError, match="make train-det"):
        BodyDetector.load(tmp_path)


# --------------------------------------------------------------------------- end to end


def test_train_det_end_to_end_offline(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 epoch at imgsz 64 on 4 cases: weights.pt loads with weights_only=True, every day gets a
    box that keeps every organ pixel, and nothing tries to reach the network."""
    from stages import train_det

    data = write_body_dataset(isolated_dirs / "data")
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    sets = [f"data.data_dir={data}", "det.epochs=1", "det.imgsz=64", "det.batch=4", "det.slices_per_volume=4"]
    out = train_det.main(["--config", "demo_det", "--set", *sets])
    assert attempts == []

    ckpt = torch.load(out / "weights.pt", map_location="cpu", weights_only=True)
    assert ckpt["imgsz"] == 64 and all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    assert yaml.safe_load((out / "model.yaml").read_text())["nc"] == 1
    boxes = pd.read_csv(out / "boxes_train.csv")
    assert sorted(boxes["volume_id"]) == [f"case{c}_day0" for c in range(1, 5)]
    assert set(boxes["source"]) <= {"detector", "threshold", "full"}
    cfg = load_config(out / "config.yaml", stage="det")
    assert cfg.det.imgsz == 64 and cfg.name == "demo_det"
    metrics = pd.read_csv(out / "metrics.csv").iloc[0]
    assert metrics["mask_inside_fraction"] == 1.0 and metrics["volumes"] == 4
    assert metrics["train_images"] + metrics["val_images"] == 16
    assert len(list((out / "yolo" / "labels" / "val").glob("*.txt"))) == 4  # one val case of four
    assert (out / "boxes.png").stat().st_size > 0 and not list((out / "train").rglob("*.pt"))

    detector = BodyDetector.load(out, device="cpu")
    volume = np.stack(
        [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((data / "train" / "case1").rglob("*.png"))]
    )
    box, source = detector.volume_box(volume)
    row = boxes.set_index("volume_id").loc["case1_day0"]
    assert (box, source) == (Box(*row[["y0", "x0", "y1", "x1"]].astype(int)), row["source"])  # same weights
    assert load_boxes("demo_det")["case1_day0"] == box


def test_ultralytics_integrations_are_switched_off() -> None:
    """With MLflow installed (train.tracker), ultralytics' own MLflow callback would log every detector
    training into mlflow.db and mlruns/ of the working directory; no integration stays on."""
    from pipeline.models.detector import YOLO_INTEGRATIONS, _ultralytics

    _ultralytics()
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.callbacks.base import add_integration_callbacks, get_default_callbacks

    SETTINGS.update({"mlflow": True, "sync": True})  # a fresh settings file's values
    _ultralytics()
    assert all(SETTINGS.get(key) is not True for key in YOLO_INTEGRATIONS)

    class Trainer:  # the name ultralytics checks to add training integrations
        callbacks = get_default_callbacks()

    add_integration_callbacks(Trainer())
    modules = {fn.__module__ for fns in Trainer.callbacks.values() for fn in fns}
    assert not any(m.endswith((".mlflow", ".clearml", ".comet", ".dvc", ".raytune", ".wb")) for m in modules)
