"""A trained body detector on a volume: one crop box per volume, and where it came from.

:meth:`BodyDetector.load` rebuilds a ``runs/det/<cfg>`` net through the ultralytics adapter
(:func:`pipeline.models.detector.build_yolo`). A volume gets one box, the union of its per-slice
detections padded by ``det.margin``, so the 2.5D neighbours of every slice stay aligned; when nothing
is detected the volume's threshold box is used, and when that fails too, the full frame
(:func:`choose_volume_box`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DetParams, load_config
from pipeline.data.geometry import Box, full_box, pad_box, union_boxes, volume_threshold_box
from pipeline.data.volumes import gray
from pipeline.errors import DataError
from pipeline.models.detector import ARCH_FILE, WEIGHTS_FILE, build_yolo, torch_device, yolo_device
from pipeline.models.yolo_data import slice_to_uint8


def choose_volume_box(image: np.ndarray, detections: list[Box], params: DetParams) -> tuple[Box, str]:
    """The fallback chain: padded union of detections, else the volume's threshold box, else the frame."""
    shape = (int(image.shape[1]), int(image.shape[2]))
    union = union_boxes(detections)
    if union is not None:
        return pad_box(union, params.margin, shape), "detector"
    box = volume_threshold_box(
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
                device=yolo_device(self.device),
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

    def volume_box(self, image: np.ndarray, batch: int = 32) -> tuple[Box, str]:
        """One crop box for a volume (S, H, W) or (S, C, H, W) and where it came from
        (``detector|threshold|full``).

        Every ``det.predict_step``-th slice (and the last) is detected; the union of their boxes
        is padded by ``det.margin``. Multi-channel slices are seen as the mean of their channels.
        """
        image = gray(image)
        if image.ndim != 3 or not len(image):
            raise ValueError(f"volume_box expects a (S, H, W) volume with S >= 1, got shape {image.shape}")
        picked = np.unique(np.r_[np.arange(0, len(image), max(1, self.params.predict_step)), len(image) - 1])
        detections = [box for found in self.detect(image[picked], batch) for box, _ in found]
        return choose_volume_box(image, detections, self.params)
