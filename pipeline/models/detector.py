"""The body detector: the project's one adapter around ultralytics YOLO.

A single-class ("body") YOLO is trained from a model YAML (never a downloaded ``.pt``) with every
online feature off, on slices labelled by their own threshold boxes (:mod:`pipeline.models.yolo_data`).
The best weights are exported as a plain state dict (``weights.pt``, loaded with
``weights_only=True``) next to the architecture (``model.yaml``); :meth:`BodyDetector.load`
rebuilds the net with ``YOLO(model.yaml)`` and loads that state dict. At inference a volume
gets one box, the union of its per-slice detections padded by ``det.margin``, so the 2.5D
neighbours of every slice stay aligned; when nothing is detected the day's threshold box is
used, and when that fails too, the full frame.

ultralytics is imported inside functions only, after :func:`pipeline.runtime.set_offline_env`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from pipeline.config import CONFIG_DIR, ConfigError, DetConfig, DetParams, dump_config, load_config
from pipeline.data.boxes import SOURCES, boxes_path, load_boxes, write_boxes
from pipeline.data.geometry import Box, day_threshold_box, full_box, pad_box, union_boxes
from pipeline.data.volumes import VolumeStore, gray
from pipeline.datasets import get_dataset
from pipeline.errors import DataError
from pipeline.io import run_lock, write_csv, write_json, write_text, write_with
from pipeline.models.box_quality import evaluate_boxes, plot_day_boxes
from pipeline.models.yolo_data import CLASS_NAME, slice_to_uint8, write_yolo_dataset
from pipeline.paths import data_dir, run_dir
from pipeline.runtime import set_offline_env

log = logging.getLogger(__name__)

__all__ = [  # load_boxes and write_boxes live with the other box helpers; they are part of this API
    "BodyDetector",
    "boxes_path",
    "choose_day_box",
    "load_boxes",
    "train_detector",
    "write_boxes",
]

WEIGHTS_FILE = "weights.pt"
ARCH_FILE = "model.yaml"
# train() arguments the adapter sets from det.* or itself; det.train_args may not override them.
# (amp: fp16 AMP runs a check that downloads a model, so the adapter picks bf16 or fp32 itself.)
RESERVED_TRAIN_ARGS = frozenset(
    {"model", "data", "imgsz", "epochs", "batch", "workers", "device", "seed", "project", "name"}
    | {"exist_ok", "resume", "pretrained", "mode", "task", "single_cls", "amp"}
)


# --------------------------------------------------------------------------- ultralytics access


def _ultralytics() -> Any:
    """Import ultralytics with the offline switches and the local font in place (order matters:
    ultralytics reads YOLO_OFFLINE and YOLO_CONFIG_DIR once, at import)."""
    set_offline_env()
    import ultralytics

    return ultralytics


def torch_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is kept."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _yolo_device(device: str) -> str:
    """A torch device string as ultralytics spells it (``cuda:1`` -> ``1``)."""
    if device.startswith("cuda"):
        return device.partition(":")[2] or "0"
    return device


def model_source(name: str) -> str:
    """``det.model`` as ultralytics takes it: a YAML file (a path, or one shipped under configs/)
    or the name of one bundled with ultralytics (``yolov8n.yaml``)."""
    if not name.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"det.model '{name}' must be a model YAML such as yolov8n.yaml: the detector is trained "
            "from scratch and no .pt weights are ever downloaded"
        )
    for candidate in (Path(name), CONFIG_DIR / name):
        if candidate.is_file():
            return str(candidate.resolve())
    return name


def check_train_args(extra: dict[str, Any]) -> None:
    """Reject unknown or adapter-owned keys of ``det.train_args`` before any work starts."""
    _ultralytics()
    from ultralytics.utils import DEFAULT_CFG_DICT

    for key in extra:
        if key in RESERVED_TRAIN_ARGS:
            raise ConfigError(
                f"det.train_args.{key} is set by the detector adapter; use det.{key} if it exists"
            )
        if key not in DEFAULT_CFG_DICT:
            close = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"det.train_args.{key} is not an ultralytics train argument{hint}")


class _DropLogLines(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _without_log_lines(logger: logging.Logger, text: str) -> Iterator[None]:
    drop = _DropLogLines(text)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def arch_yaml(net: Any) -> str:
    """A trained net's architecture as a model YAML that ``YOLO(path)`` rebuilds under any file name.

    ultralytics reads the model scale (n/s/m/l/x) from the YAML's file name, which ``model.yaml``
    does not carry, so ``scales`` is cut down to the one row that was trained.
    """
    arch = copy.deepcopy(net.yaml)
    scale = arch.pop("scale", "")
    arch.pop("yaml_file", None)
    scales = arch.get("scales")
    if scales:
        scale = scale or next(iter(scales))  # the row parse_model takes when no scale is named
        arch["scales"] = {scale: scales[scale]}
    return yaml.safe_dump(arch, sort_keys=False)


def build_yolo(arch_path: Path, state: dict[str, Any]) -> Any:
    """``YOLO(model.yaml)`` with a plain state dict loaded into it (strict: the shapes must match)."""
    _ultralytics()
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    with _without_log_lines(LOGGER, "no model scale passed"):  # the one scale row of arch_yaml
        yolo = YOLO(str(arch_path), task="detect")
    yolo.model.load_state_dict(state, strict=True)
    yolo.model.names = {0: CLASS_NAME}
    yolo.model.eval()
    return yolo


def train_yolo(data_yaml: Path, params: DetParams, project: Path) -> tuple[Any, dict[str, float]]:
    """``YOLO(model yaml).train(...)`` into ``project/train``; returns (best net, its val metrics).

    The net is the one ultralytics holds after training (its best checkpoint, which it reloads
    itself); this code never unpickles an ultralytics ``.pt`` file.
    """
    _ultralytics()
    import torch
    from ultralytics import YOLO

    device = torch_device(params.device)
    # fp16 AMP runs a check that downloads a model; bf16 skips it, CPU trains in fp32.
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)  # not a T4
    amp: str | bool = "bf16" if bf16 else False
    args = {
        "data": str(data_yaml),
        "imgsz": params.imgsz,
        "epochs": params.epochs,
        "batch": params.batch,
        "workers": params.workers,
        "device": _yolo_device(device),
        "seed": params.seed,
        "project": str(project.resolve()),
        "name": "train",
        "exist_ok": True,
        "pretrained": False,
        "single_cls": True,
        "amp": amp,
        "plots": False,  # plots need only the local font, but cost time
        "verbose": False,
        **params.train_args,
    }
    yolo = YOLO(model_source(params.model), task="detect")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        yolo.train(**args)
    finally:  # ultralytics switches deterministic algorithms on process-wide
        torch.use_deterministic_algorithms(deterministic)
    metrics = yolo.metrics.results_dict if yolo.metrics is not None else {}
    return yolo.model, {k: float(v) for k, v in metrics.items()}


def save_weights(out: Path, net: Any, params: DetParams) -> Path:
    """Export a trained net as ``weights.pt`` (plain fp32 tensors, ``weights_only``-loadable) and
    ``model.yaml`` (its architecture)."""
    import torch

    _ultralytics()
    from ultralytics import __version__

    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in net.state_dict().items()
    }
    payload = {"model": state, "imgsz": params.imgsz, "ultralytics": __version__}
    write_text(out / ARCH_FILE, arch_yaml(net))
    return write_with(out / WEIGHTS_FILE, lambda p: torch.save(payload, p))


# --------------------------------------------------------------------------- inference


def choose_day_box(image: np.ndarray, detections: list[Box], params: DetParams) -> tuple[Box, str]:
    """The fallback chain: padded union of detections, else the day's threshold box, else the frame."""
    shape = (int(image.shape[1]), int(image.shape[2]))
    union = union_boxes(detections)
    if union is not None:
        return pad_box(union, params.margin, shape), "detector"
    box = day_threshold_box(
        image, params.margin, quantile=params.threshold_quantile, scale=params.threshold_scale
    )
    if box is not None:
        return box, "threshold"
    return full_box(shape), "full"


class BodyDetector:
    """A trained single-class YOLO that boxes the body on every slice of a volume."""

    def __init__(self, yolo: Any, params: DetParams, device: str = "cpu"):
        self.yolo = yolo  # an ultralytics YOLO (None in tests that override detect)
        self.params = params
        self.device = device

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None) -> BodyDetector:
        """``runs/det/<cfg>/{weights.pt, model.yaml, config.yaml}`` -> a detector on ``device``
        (default: det.device of the run's config)."""
        import torch

        run_dir = Path(run_dir)
        for name in (WEIGHTS_FILE, ARCH_FILE, "config.yaml"):
            if not (run_dir / name).is_file():
                raise DataError(
                    f"detector file not found: {run_dir / name}; run `make train-det` "
                    f"(CONFIG_DET=configs/{run_dir.name}.yaml)"
                )
        cfg = load_config(run_dir / "config.yaml", stage="det")
        ckpt = torch.load(run_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        yolo = build_yolo(run_dir / ARCH_FILE, ckpt["model"])
        return cls(yolo, cfg.det, torch_device(device or cfg.det.device))

    def detect(self, slices: np.ndarray, batch: int = 32) -> list[list[tuple[Box, float]]]:
        """Per-slice detections ``[(box, confidence), ...]`` (confidence >= det.conf) of (n, H, W) slices."""
        out: list[list[tuple[Box, float]]] = []
        for start in range(0, len(slices), batch):
            chunk = [
                np.repeat(slice_to_uint8(s)[..., None], 3, axis=2) for s in slices[start : start + batch]
            ]
            results = self.yolo.predict(
                source=chunk,
                conf=self.params.conf,
                imgsz=self.params.imgsz,
                device=_yolo_device(self.device),
                save=False,
                verbose=False,
            )
            for image, result in zip(chunk, results):
                height, width = image.shape[:2]
                found = []
                xyxy = result.boxes.xyxy.cpu().numpy()
                for (x0, y0, x1, y1), conf in zip(xyxy, result.boxes.conf.cpu().numpy()):
                    y0c, x0c = max(0, math.floor(y0)), max(0, math.floor(x0))
                    y1c, x1c = min(height, math.ceil(y1)), min(width, math.ceil(x1))
                    if y1c > y0c and x1c > x0c:
                        found.append((Box(y0c, x0c, y1c, x1c), float(conf)))
                out.append(found)
        return out

    def day_box(self, image: np.ndarray, batch: int = 32) -> tuple[Box, str]:
        """One crop box for a volume (S, H, W) or (S, C, H, W) and where it came from
        (``detector|threshold|full``).

        Every ``det.predict_step``-th slice (and the last) is detected; the union of their boxes
        is padded by ``det.margin``. Multi-channel slices are seen as the mean of their channels.
        """
        image = gray(image)
        if image.ndim != 3 or not len(image):
            raise ValueError(f"day_box expects a (S, H, W) volume with S >= 1, got shape {image.shape}")
        picked = np.unique(np.r_[np.arange(0, len(image), max(1, self.params.predict_step)), len(image) - 1])
        detections = [box for found in self.detect(image[picked], batch) for box, _ in found]
        return choose_day_box(image, detections, self.params)


# --------------------------------------------------------------------------- the stage


def train_detector(cfg: DetConfig) -> Path:
    """Train the body detector, export ``weights.pt``, and box every train volume.

    Writes ``runs/det/<cfg>/{config.yaml, yolo/, train/, weights.pt, model.yaml, boxes_train.csv,
    metrics.json, metrics.csv, boxes.png}``.
    """
    params = cfg.det
    model_source(params.model)
    check_train_args(params.train_args)
    out = run_dir("det", cfg.name).resolve()
    with run_lock(out):  # make train-det started twice must not write one folder twice
        return _train_detector(cfg, out)


def _train_detector(cfg: DetConfig, out: Path) -> Path:
    params = cfg.det
    for name in (WEIGHTS_FILE, ARCH_FILE, "boxes_train.csv", "metrics.json", "metrics.csv", "boxes.png"):
        (out / name).unlink(missing_ok=True)  # a failed rerun must not look finished
    shutil.rmtree(out / "train", ignore_errors=True)  # ultralytics appends to an old results.csv
    write_text(out / "config.yaml", dump_config(cfg))
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
        day: detector.day_box(store[day].image) for day in tqdm(store.days, desc="volume boxes", unit="vol")
    }
    write_boxes(boxes_path(cfg.name, "train"), boxes)
    seconds["seconds_boxes"] = time.perf_counter() - clock

    quality, panels = evaluate_boxes(store, boxes, params)
    metrics = {
        "mAP50": val_metrics.get("metrics/mAP50(B)", float("nan")),
        "mAP50-95": val_metrics.get("metrics/mAP50-95(B)", float("nan")),
        "precision": val_metrics.get("metrics/precision(B)", float("nan")),
        "recall": val_metrics.get("metrics/recall(B)", float("nan")),
        **counts,
        **quality,
        **{k: round(v, 2) for k, v in seconds.items()},
    }
    write_json(out / "metrics.json", metrics)
    write_csv(out / "metrics.csv", pd.DataFrame([metrics]))
    plot_day_boxes(out / "boxes.png", panels)
    log.info(
        "detector %s: mAP50 %.3f, mAP50-95 %.3f, day-box IoU vs threshold %.3f, mask pixels inside boxes %.5f, "
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
            "%.3f%% of mask pixels fall outside the day boxes: raise det.margin",
            100 * (1 - metrics["mask_inside_fraction"]),
        )
    return out
