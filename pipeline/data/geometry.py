"""Crop boxes, the network-input geometry and its exact inverse.

Training and inference share these functions, so a prediction is pasted back into the
original slice exactly where its input was taken from:

    image (S, H, W) --crop(box)--> (S, h, w) --resize|pad--> (S, Hn, Wn) --net--> ... --inverse--> (S, H, W)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Box:
    """Half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __post_init__(self) -> None:
        if not (self.y1 > self.y0 and self.x1 > self.x0):
            raise ValueError(f"empty box {self}")

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def as_dict(self) -> dict[str, int]:
        return {"y0": self.y0, "x0": self.x0, "y1": self.y1, "x1": self.x1}

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def clip(self, shape: tuple[int, int]) -> Box:
        h, w = shape
        return Box(max(0, self.y0), max(0, self.x0), min(h, self.y1), min(w, self.x1))


def full_box(shape: tuple[int, int]) -> Box:
    return Box(0, 0, int(shape[0]), int(shape[1]))


def union_boxes(boxes: list[Box]) -> Box | None:
    if not boxes:
        return None
    return Box(
        min(b.y0 for b in boxes), min(b.x0 for b in boxes), max(b.y1 for b in boxes), max(b.x1 for b in boxes)
    )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    inter = max(0, h) * max(0, w)
    return inter / (a.height * a.width + b.height * b.width - inter)


def pad_box(box: Box, margin: float, shape: tuple[int, int]) -> Box:
    """Grow ``box`` by ``margin`` x the image side on every edge, clipped to the image."""
    dy, dx = round(margin * shape[0]), round(margin * shape[1])
    return Box(box.y0 - dy, box.x0 - dx, box.y1 + dy, box.x1 + dx).clip(shape)


def threshold_box(
    image: np.ndarray, quantile: float = 0.9, scale: float = 0.25, min_area: float = 0.02
) -> Box | None:
    """The body on one slice: pixels above ``scale`` x the ``quantile`` of non-zero intensities,
    closed, largest connected component. None when nothing plausible (< ``min_area`` of the frame).
    """
    img = np.asarray(image, dtype=np.float32)
    positive = img[img > 0]
    if positive.size == 0:
        return None
    level = scale * float(np.quantile(positive, quantile))
    fg = ndimage.binary_opening(img > level, iterations=2)
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < min_area * img.size:
        return None
    ys, xs = np.nonzero(labels == biggest)
    return Box(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


def volume_threshold_box(volume: np.ndarray, margin: float = 0.05, **kwargs: float) -> Box | None:
    """Union of the per-slice threshold boxes of a volume (S, H, W), padded; None if none found."""
    boxes = [b for b in (threshold_box(s, **kwargs) for s in volume) if b is not None]
    box = union_boxes(boxes)
    return None if box is None else pad_box(box, margin, volume.shape[1:])


@dataclass(frozen=True)
class Geometry:
    """Maps a crop of a (H, W) slice to the network size and back.

    ``mode="resize"`` stretches the crop to (Hn, Wn); ``mode="pad"`` scales it to fit, keeping
    its aspect, and centres it on a zero canvas.
    """

    shape: tuple[int, int]  # original slice (H, W)
    box: Box
    size: tuple[int, int]  # network input (Hn, Wn)
    mode: str = "resize"

    def __post_init__(self) -> None:
        if self.mode not in ("resize", "pad"):
            raise ValueError(f"unknown resize mode '{self.mode}' (expected 'resize' or 'pad')")

    def _inner(self) -> tuple[int, int, int, int]:
        """(top, left, inner height, inner width) of the crop on the network canvas."""
        hn, wn = self.size
        if self.mode == "resize":
            return 0, 0, hn, wn
        scale = min(hn / self.box.height, wn / self.box.width)
        ih, iw = max(1, round(self.box.height * scale)), max(1, round(self.box.width * scale))
        return (hn - ih) // 2, (wn - iw) // 2, ih, iw

    def forward(self, planes: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """(..., H, W) -> (..., Hn, Wn); use INTER_NEAREST for masks."""
        planes = np.asarray(planes)
        lead = planes.shape[:-2]
        crop = planes[(..., *self.box.slices())].reshape(-1, self.box.height, self.box.width)
        top, left, ih, iw = self._inner()
        out = np.zeros(
            (crop.shape[0], *self.size), dtype=np.float32 if crop.dtype.kind == "f" else crop.dtype
        )
        for i, plane in enumerate(crop):
            work = plane.astype(np.float32) if plane.dtype not in (np.uint8, np.float32) else plane
            resized = cv2.resize(work, (iw, ih), interpolation=interpolation)
            out[i, top : top + ih, left : left + iw] = resized
        return out.reshape(*lead, *self.size)

    def inverse(self, planes: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """(..., Hn, Wn) network output -> (..., H, W) in the original slice, zero outside the box."""
        planes = np.asarray(planes, dtype=np.float32)
        lead = planes.shape[:-2]
        flat = planes.reshape(-1, *self.size)
        top, left, ih, iw = self._inner()
        out = np.zeros((flat.shape[0], *self.shape), dtype=np.float32)
        ys, xs = self.box.slices()
        for i, plane in enumerate(flat):
            inner = np.ascontiguousarray(plane[top : top + ih, left : left + iw])
            out[i, ys, xs] = cv2.resize(inner, (self.box.width, self.box.height), interpolation=interpolation)
        return out.reshape(*lead, *self.shape)


PERCENTILE = 99.5  # intensity mapped to 1.0
CLIP = 1.5  # upper clip after scaling


def robust_scale(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """The ``PERCENTILE`` of ``values`` as float32 (over the rows of ``axis``); 1.0 where not positive.

    The one intensity scale of the project: :func:`normalize` and the network inputs of
    :mod:`pipeline.data.prepare` both divide by it. An empty array scales by 1.0.
    """
    values = np.asarray(values, dtype=np.float32)
    if axis is None:
        scale = float(np.percentile(values, PERCENTILE)) if values.size else 0.0
        return scale if scale > 0 else 1.0
    scale = np.percentile(values, PERCENTILE, axis=axis)
    return np.where(scale > 0, scale, 1.0).astype(np.float32)


def normalize(stack: np.ndarray, scale: float | None = None) -> np.ndarray:
    """uint16 stack -> float32 in about [0, 1] (divided by ``scale``, or its own robust scale)."""
    stack = np.asarray(stack, dtype=np.float32)
    return np.clip(stack / (scale if scale else robust_scale(stack)), 0.0, CLIP)
