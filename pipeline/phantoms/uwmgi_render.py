"""Pixels of the phantom: a day-volume's tissue maps, labels and its 16-bit MR-like image.

Each slice is painted onto a tissue map (body walls, organs in order, tubes cut as discs),
turned into intensities by the day's contrast table with a smooth 3-D texture, then blurred
(partial volume), multiplied by a coil bias field and given Rician noise.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from pipeline.phantoms.uwmgi_anatomy import LUMENS, N_POINTS, SHIFT, Blob, T, Tube
from pipeline.phantoms.uwmgi_pose import Day


def _px(day: Day, xy: np.ndarray) -> np.ndarray:
    """mm -> fixed-point pixel coordinates for cv2 drawing (shift=SHIFT)."""
    p = xy @ day.affine[:, :2].T + day.affine[:, 2]
    return np.round(p * (1 << SHIFT)).astype(np.int32)


def _fill(canvas: np.ndarray, day: Day, outline: np.ndarray, value: float) -> None:
    cv2.fillPoly(canvas, [_px(day, outline)], value, cv2.LINE_8, SHIFT)


def _discs(day: Day, tube: Tube, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Centres and fixed-point radii (outer, inner) of the tube's spheres that depth z cuts, and which."""
    dz = tube.points[:, 2] - z
    sel = np.abs(dz) < tube.radius
    centres = _px(day, tube.points[sel, :2])
    unit = day.px_per_mm * (1 << SHIFT)
    outer = np.round(np.sqrt(tube.radius[sel] ** 2 - dz[sel] ** 2) * unit).astype(np.int64)
    inner = None
    if tube.inner is not None:
        inner = np.round(np.sqrt(np.maximum(tube.inner[sel] ** 2 - dz[sel] ** 2, 0)) * unit).astype(np.int64)
    return centres, outer, inner, sel


def _lumen_discs(day: Day, tube: Tube, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_discs` of an organ, whose tube always has a lumen: its inner radii and lumen content."""
    centres, outer, inner, sel = _discs(day, tube, z)
    if inner is None or tube.content is None:
        raise ValueError(f"organ tube of label {tube.label} has no lumen")
    return centres, outer, inner, tube.content[sel]


def _circles(canvas: np.ndarray, centres: np.ndarray, radii: np.ndarray, values) -> None:
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), radii.shape)
    for (x, y), r, v in zip(centres.tolist(), radii.tolist(), values.tolist()):
        if r > 0:
            cv2.circle(canvas, (x, y), r, v, -1, cv2.LINE_8, SHIFT)


def paint_slice(day: Day, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue map (H, W) uint8, lumen content (H, W) float32 and labels (3, H, W) uint8 at depth z."""
    tissue = np.zeros(day.shape, np.uint8)
    content = np.zeros(day.shape, np.float32)
    labels = np.zeros((3, *day.shape), np.uint8)
    anatomy, k = day.anatomy, day.anatomy.k
    for outline, name in zip(anatomy.body.outlines(z), ("fat", "muscle", "visceral")):
        _fill(tissue, day, outline, T[name])
    for item in anatomy.layers:
        if isinstance(item, Blob):
            section = item.section(z)
            if section is not None:
                _fill(tissue, day, section, item.tissue)
        else:
            centres, outer, _, _ = _discs(day, item, z)
            _circles(tissue, centres, outer, item.wall)
    vx, vy, vr, period = anatomy.spine
    angles = np.linspace(0, 2 * np.pi, N_POINTS, endpoint=False)

    def ring(y: float, r: float) -> np.ndarray:
        return np.stack([vx + r * np.cos(angles), y + r * np.sin(angles)], axis=1)

    if (z % period) < 0.25 * period:  # an intervertebral disc
        _fill(tissue, day, ring(vy, vr), T["disc"])
    else:  # a vertebral body: bright cortical ring, dark marrow
        _fill(tissue, day, ring(vy, vr), T["cortex"])
        _fill(tissue, day, ring(vy, 0.72 * vr), T["marrow"])
    _fill(tissue, day, ring(vy + vr + 10 * k, 9 * k), T["cortex"])  # neural arch and canal
    _fill(tissue, day, ring(vy + vr + 10 * k, 5 * k), T["csf"])
    for tube in anatomy.organs:
        centres, outer, inner, lumen = _lumen_discs(day, tube, z)
        _circles(tissue, centres, outer, tube.wall)
        _circles(labels[tube.label], centres, outer, 1)
        _circles(tissue, centres, inner, tube.lumen)
        _circles(content, centres, inner, lumen)
    vessels = np.zeros(day.shape, np.uint8)  # vessel tissue ids, kept only over their host tissue
    for _, tube in anatomy.vessels:
        centres, outer, _, _ = _discs(day, tube, z)
        _circles(vessels, centres, outer, tube.wall)
    for host, wall in sorted({(h, t.wall) for h, t in anatomy.vessels}):
        tissue[(vessels == wall) & (tissue == host)] = wall
    air_row = (day.affine @ [0.0, day.air_level, 1.0])[1]
    rows = np.arange(day.shape[0])[:, None] < air_row
    content[(tissue == T["st_lumen"]) & rows] = 0.04
    return tissue, content, labels


def render_day(day: Day, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image (S, H, W) uint16 and labels (S, 3, H, W) uint8 of one day-volume."""
    h, w = day.shape
    n = len(day.z)
    dz = float(day.z[1] - day.z[0]) if n > 1 else 4.0
    low = rng.standard_normal((n, h // 5 + 2, w // 5 + 2))
    low = ndimage.gaussian_filter(low, (max(0.3, 4 * day.anatomy.k / dz), 1.0, 1.0), mode="nearest")
    low = (low / low.std()).astype(np.float32)
    bias_lo = rng.standard_normal((2, 4, 4))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radial = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
    mean_lut, tex_lut = day.contrast[:, 0].astype(np.float32), day.contrast[:, 1].astype(np.float32)
    is_lumen = np.zeros(len(mean_lut), bool)
    is_lumen[list(LUMENS)] = True
    images = np.empty((n, h, w), np.uint16)
    labels = np.empty((n, 3, h, w), np.uint8)
    for i, z in enumerate(day.z):
        tissue, content, labels[i] = paint_slice(day, float(z))
        mean = np.where(is_lumen[tissue], content * mean_lut[tissue], mean_lut[tissue])
        medium = cv2.resize(low[i], (w, h), interpolation=cv2.INTER_CUBIC)
        fine = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 0.8) * 2.2
        signal = mean * (1 + tex_lut[tissue] * (medium + 0.7 * fine))
        signal = cv2.GaussianBlur(np.maximum(signal, 0), (0, 0), day.blur)
        t = i / max(n - 1, 1)
        bias = cv2.resize(((1 - t) * bias_lo[0] + t * bias_lo[1]).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC)  # fmt: skip
        signal *= np.exp(0.12 * np.clip(bias, -2, 2) + 0.4 * radial)  # coil sensitivity: brighter rim
        noise = rng.standard_normal((2, h, w)).astype(np.float32) * day.noise
        signal = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
        images[i] = np.clip(np.round(signal * day.peak), 0, 65535).astype(np.uint16)
    return images, labels
