"""`make train-det`: the body detector trained through the ultralytics adapter, then one crop box per
train volume, with the box-quality metrics and figure (the adapter itself is :mod:`pipeline.models.detector`)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import DetConfig, dump_config
from pipeline.data.boxes import SOURCES, boxes_path, write_boxes
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.io import run_lock, write_csv, write_json, write_text
from pipeline.models.box_quality import evaluate_boxes, plot_volume_boxes
from pipeline.models.detector import (
    ARCH_FILE,
    WEIGHTS_FILE,
    check_pretrained,
    check_train_args,
    model_source,
    save_weights,
    train_yolo,
)
from pipeline.models.detector_boxes import BodyDetector
from pipeline.models.yolo_data import write_yolo_dataset
from pipeline.paths import data_dir, run_dir
from pipeline.runtime import record_machine

log = logging.getLogger(__name__)


def train_detector(cfg: DetConfig) -> Path:
    """Train the body detector, export ``weights.pt``, and box every train volume.

    Writes ``runs/det/<cfg>/{config.yaml, yolo/, train/, weights.pt, model.yaml, boxes_train.csv,
    metrics.json, metrics.csv, boxes.png}``.
    """
    params = cfg.det
    model_source(params.model)
    check_train_args(params.train_args)
    check_pretrained(params, cfg.name)
    out = run_dir("det", cfg.name).resolve()
    with run_lock(out):  # make train-det started twice must not write one folder twice
        return _train_detector(cfg, out)


def _train_detector(cfg: DetConfig, out: Path) -> Path:
    params = cfg.det
    for name in (WEIGHTS_FILE, ARCH_FILE, "boxes_train.csv", "metrics.json", "metrics.csv", "boxes.png"):
        (out / name).unlink(missing_ok=True)  # a failed rerun must not look finished
    shutil.rmtree(out / "train", ignore_errors=True)  # ultralytics appends to an old results.csv
    write_text(out / "config.yaml", record_machine(dump_config(cfg)))
    spec = get_dataset(cfg.dataset)
    root = data_dir(cfg.data.data_dir, cfg.dataset)
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    store.build()

    clock = time.perf_counter()
    data_yaml, counts = write_yolo_dataset(store, params, out / "yolo")
    seconds = {"seconds_dataset": time.perf_counter() - clock}
    clock = time.perf_counter()
    net, val_metrics = train_yolo(data_yaml, params, out)
    save_weights(out, net, params)
    for stale in (out / "train" / "weights").glob("*.pt"):
        stale.unlink()  # ultralytics' pickled checkpoints: weights.pt is the one to load
    seconds["seconds_train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    detector = BodyDetector.load(out)
    boxes = {
        volume_id: detector.volume_box(store[volume_id].image)
        for volume_id in tqdm(store.volume_ids, desc="volume boxes", unit="vol")
    }
    write_boxes(boxes_path(cfg.name, "train"), boxes)
    seconds["seconds_boxes"] = time.perf_counter() - clock

    quality, panels = evaluate_boxes(store, boxes, params)
    metrics = {
        "mAP50": val_metrics.get("metrics/mAP50(B)", float("nan")),
        "mAP50-95": val_metrics.get("metrics/mAP50-95(B)", float("nan")),
        "precision": val_metrics.get("metrics/precision(B)", float("nan")),
        "recall": val_metrics.get("metrics/recall(B)", float("nan")),
        "pretrained_tensors": int(val_metrics.get("pretrained_tensors", 0)),
        **counts,
        **quality,
        **{k: round(v, 2) for k, v in seconds.items()},
    }
    write_json(out / "metrics.json", metrics)
    write_csv(out / "metrics.csv", pd.DataFrame([metrics]))
    plot_volume_boxes(out / "boxes.png", panels)
    log.info(
        "detector %s: mAP50 %.3f, mAP50-95 %.3f, volume-box IoU vs threshold %.3f, mask pixels inside boxes %.5f, "
        "sources %s",
        cfg.name,
        metrics["mAP50"],
        metrics["mAP50-95"],
        metrics["iou_vs_threshold_mean"],
        metrics["mask_inside_fraction"],
        {s: metrics[f"source_{s}"] for s in SOURCES},
    )
    if metrics["mask_inside_fraction"] < 0.999:
        log.warning(
            "%.3f%% of mask pixels fall outside the volume boxes: raise det.margin",
            100 * (1 - metrics["mask_inside_fraction"]),
        )
    return out
