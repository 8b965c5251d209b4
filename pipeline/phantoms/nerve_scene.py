"""The ultrasound scene of the nerve phantom (:mod:`pipeline.phantoms.nerve`), on a canvas a
little larger than the frame (the probe moves over it): tissue layers with speckle-free echo, the
brachial plexus and often an artery. Frames crop it, add speckle and gain, and paint the nerve.

Calibrated on the real data (``make data-stats``): the nerve's centre, size and shape from the 5,635
real masks; its contrast from the 51 real frames of subject 1, where it is *brighter* than the tissue
around it (mean 1.42x a ring 5-20 px outside, p10-p90 1.21-1.61), with a bright broken rim and a
honeycomb of bright septa and darker fascicles.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import expit

SHAPE = (420, 580)  # rows, columns of every real frame


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sx: float, sy: float) -> np.ndarray:
    """Gaussian noise smoothed with (sx, sy) px, scaled to unit standard deviation."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sx, 0.4), sigmaY=max(sy, 0.4),
                             borderType=cv2.BORDER_REFLECT)  # fmt: skip
    return field / (field.std() + 1e-6)


def ellipse_radius(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, angle: float):
    """Normalised radius (1 on the ellipse) and polar angle of every pixel; ``a`` across, ``b`` down."""
    dy = np.arange(shape[0], dtype=np.float32)[:, None] - cy
    dx = np.arange(shape[1], dtype=np.float32)[None, :] - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / b
    return np.sqrt(u * u + v * v), np.arctan2(v, u)


@dataclass(frozen=True)
class Nerve:
    """A subject's nerve on the scene canvas: centre, semi-axes (across, down), tilt, lobed outline."""

    cy: float
    cx: float
    a: float
    b: float
    angle: float
    lobes: np.ndarray  # (3, 2): amplitude and phase of the outline's 2nd-4th harmonics
    level: float  # mean echo inside / the tissue around it, at visibility 1
    rim: float  # strength of the bright epineurium on the outline

    def radius(self, shape: tuple[int, int], oy: float, ox: float, scale: float = 1.0, jitter=None):
        """Normalised radius (1 on the lobed outline) and polar angle over a ``shape`` window at (oy, ox)."""
        dy, dx, da, db = (0.0, 0.0, 0.0, 0.0) if jitter is None else jitter
        r, theta = ellipse_radius(shape, self.cy - oy + dy, self.cx - ox + dx, self.a * scale * (1 + da),
                                   self.b * scale * (1 + db), self.angle)  # fmt: skip
        outline = 1 + sum(amp * np.cos((j + 2) * theta + phase) for j, (amp, phase) in enumerate(self.lobes))
        return r / outline, theta


def draw_nerve(rng: np.random.Generator, k: float, margin: tuple[int, int]) -> Nerve:
    """Where and how large: the real masks' centre (row 138, column 333 at 420x580, the rows spread
    down), area (about 7,000 px, 20% apart between subjects) and shape (taller than wide: 117 x 88)."""
    row = (0.24 + 0.4 * rng.beta(1.3, 3.5)) * SHAPE[0] * k
    col = rng.normal(0.565, 0.045) * SHAPE[1] * k
    area = np.exp(rng.normal(np.log(6900), 0.15)) * k * k
    aspect = np.exp(rng.normal(np.log(1.3), 0.17))  # height / width
    a = np.sqrt(area / (np.pi * aspect))
    lobes = np.stack([rng.uniform(0, 0.09, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
    return Nerve(row + margin[0], col + margin[1], a, a * aspect, float(rng.normal(0, 0.3)), lobes,
                 float(rng.uniform(1.35, 1.65)), float(rng.uniform(0.6, 1.0)))  # fmt: skip


def nerve_factor(
    nerve: Nerve, r: np.ndarray, theta: np.ndarray, texture: np.ndarray, vis: float
) -> np.ndarray:
    """The nerve's multiplicative echo: a honeycomb interior (bright septa, dark fascicles) brighter
    than the tissue around it, and a broken bright rim; ``vis`` scales its departure from 1."""
    inside = expit((1 - r) / 0.04)
    interior = nerve.level * np.exp(0.35 * texture - 0.06)  # exp(0.35 z) has mean exp(0.06)
    broken = 0.6 + 0.4 * np.cos(3 * theta + 7 * nerve.angle)
    rim = nerve.rim * np.exp(-(((r - 1) / 0.1) ** 2)) * broken
    return np.maximum(1 + vis * (inside * (interior - 1) + rim), 0.05)


def tissue_echo(rng: np.random.Generator, canvas: tuple[int, int], k: float) -> np.ndarray:
    """Tissue echogenicity: curved layers with fibres, streaks, muscle bundles and broken fascia."""
    h, w = canvas
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    bases = np.sort(rng.uniform([0.03, 0.11, 0.27, 0.47, 0.68], [0.07, 0.2, 0.4, 0.6, 0.8])) * h
    bends = gaussian_filter1d(rng.standard_normal((len(bases), w)), 60 * k + 1, axis=1, mode="reflect")
    bends = bends / bends.std(axis=1, keepdims=True) * rng.uniform(0.01, 0.04, (len(bases), 1)) * h
    bends += np.linspace(-1, 1, w) * rng.uniform(-0.04, 0.04, (len(bases), 1)) * h  # tilted layers
    bounds = (bases[:, None] + bends).astype(np.float32)  # (layers, w)
    layer = (y[None] >= bounds[:, None, :]).sum(axis=0)
    levels = np.array([0.9, 0.55, 0.6, 0.5, 0.55, 0.42]) * rng.uniform(0.8, 1.2, 6)
    tissue = levels.astype(np.float32)[layer]
    # fibres and short bright streaks that follow the curved layers
    map_x = np.broadcast_to(x, (h, w)).astype(np.float32)
    map_y = (y - bends.mean(axis=0)[None, :]).astype(np.float32)
    # the border is OpenCV's default (constant): the generator's data depend on it
    fibres = cv2.remap(smooth_field(rng, canvas, 14 * k, 1.6 * k), map_x, map_y, cv2.INTER_LINEAR)
    streaks = cv2.remap(smooth_field(rng, canvas, 18 * k, 1.6 * k), map_x, map_y, cv2.INTER_LINEAR)
    tissue *= np.exp(0.25 * fibres + 0.3 * smooth_field(rng, canvas, 22 * k, 7 * k))  # fibres, muscle bundles
    tissue += 1.2 * np.clip(streaks - 1.5, 0, None)
    tissue *= np.exp(0.25 * smooth_field(rng, canvas, 50 * k, 30 * k))
    # fascia: bright specular lines on the layer boundaries, broken along their length
    strength = rng.uniform(0.8, 1.8, len(bases))
    strength[0] = 2.0  # the skin line
    gaps = np.clip(
        0.6 + gaussian_filter1d(rng.standard_normal((len(bases), w)), 25 * k + 1, axis=1) * 8, 0, 1
    )
    for i in range(len(bases)):
        line = np.exp(-(((y - bounds[i][None, :]) / (2.6 * k + 0.5)) ** 2))
        tissue += (strength[i] * gaps[i])[None, :].astype(np.float32) * line
    return tissue


def add_artery(rng: np.random.Generator, tissue: np.ndarray, nerve: Nerve, k: float) -> None:
    """Often an anechoic artery with a bright wall and enhancement below it, away from the nerve."""
    if rng.random() >= 0.7:
        return
    h, w = tissue.shape
    radius = rng.uniform(14, 24) * k
    for _ in range(20):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.08, 0.92) * w
        if np.hypot(cy - nerve.cy, cx - nerve.cx) > max(nerve.a, nerve.b) + radius + 15 * k:
            break
    d, _ = ellipse_radius(tissue.shape, cy, cx, radius, radius, 0.0)
    tissue *= 1 - 0.85 * expit((1 - d) / 0.05)
    tissue += 0.8 * np.exp(-(((d - 1) / 0.1) ** 2))
    x = np.arange(w, dtype=np.float32)
    tissue *= 1 + 0.3 * np.exp(-(((x - cx) / radius) ** 2))[None, :] * (np.arange(h)[:, None] > cy + radius)


def speckle(rng: np.random.Generator, shape: tuple[int, int], k: float) -> np.ndarray:
    """A complex Gaussian field (H, W, 2) with laterally elongated grains."""
    return smooth_field(rng, (*shape, 2), 2.4 * k, 1.2 * k)
