"""The anatomy of the LGG phantom (:mod:`pipeline.phantoms.lgg`): tissue codes of a head and its tumour.

The head is an ellipsoid with scalp, a two-table skull, CSF, grey and white matter (smooth noise
folds the cortex), sulci, deep grey nuclei and two lateral ventricles; slices shrink towards the
ends of the stack. The tumour is a union of wobbly ellipsoids (a main one and 1-4 lobes bulging
from it), cut to the brain and to one run of slices: as large and irregular as the real ones
(``make data-stats``: solidity 0.84 on the real dev set, 0.96 for the single ellipsoid it replaced).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

T_RANGE = (-0.8, 0.88)  # the stack runs from the skull base to near the vertex (head radius 1)
MIN_TUMOUR_PX = 20  # at 256x256: smaller cross-sections are left unlabelled (the real smallest: 23)
# tissue codes (their intensities: phantom_lgg.CONTRAST)
BACKGROUND, FAT, BONE, CSF, GREY, WHITE = range(6)


def tumour_lobes(rng: np.random.Generator, centre: tuple, axes: tuple) -> list[tuple]:
    """The main ellipsoid and 1-4 smaller ones bulging from its surface: ``(centre, axes, angle)``."""
    lobes = [(centre, axes, float(rng.uniform(0, np.pi)))]
    for _ in range(int(rng.integers(1, 5))):
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction) + 1e-9
        offset = direction * np.asarray(axes) * rng.uniform(0.5, 0.9)
        lobe_axes = tuple(np.asarray(axes) * rng.uniform(0.35, 0.7, 3))
        lobes.append((tuple(np.asarray(centre) + offset), lobe_axes, float(rng.uniform(0, np.pi))))
    return lobes


def tumour_axes(rng: np.random.Generator, small: bool) -> tuple[float, float, float]:
    """In-plane semi-axes (head radius 1 = half the frame) and the extent along the stack.

    As the real ones (dev set): a tumour slice's area is about 1,500 px at 256x256 (p5-p95 about
    200-5,000) and a third of a patient's slices hold tumour; the wider tumours reach further.
    """
    if small:
        return (*rng.uniform(0.1, 0.14, 2), rng.uniform(0.1, 0.18))
    ab = np.clip(np.exp(rng.normal(np.log(0.22), 0.45, 2)), 0.08, 0.5)
    return (*ab, min(rng.uniform(0.14, 0.33) * np.sqrt(ab.mean() / 0.22), 0.4))


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], cell: float, z_sigma: float
) -> np.ndarray:
    """Unit-variance noise smooth over ``cell`` pixels in-plane and ``z_sigma`` slices."""
    s, h, w = shape
    coarse = rng.standard_normal((s, max(2, round(h / cell)), max(2, round(w / cell)))).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, (z_sigma, 0.7, 0.7))
    coarse /= coarse.std() + 1e-6
    return np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, ax, ay) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1


def anatomy(setup: dict, rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Tissue codes (S, H, W), the in-plane coordinates and the slice heights ``t``."""
    s, h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (x - setup["centre"][0] * w) / (w / 2), (y - setup["centre"][1] * h) / (h / 2)
    c, si = np.cos(setup["rotation"]), np.sin(setup["rotation"])
    x, y = c * x + si * y, -si * x + c * y
    t = np.linspace(*T_RANGE, s, dtype=np.float32)
    radius = np.sqrt(np.clip(1 - np.abs(t) ** 2.4, 0.03, None))[:, None, None]
    phi = np.arctan2(y, x)
    p1, p2 = setup["outline"]
    rho = np.hypot(x / setup["axes"][0], y / setup["axes"][1])
    rho *= 1 + 0.025 * np.cos(2 * phi + p1) + 0.015 * np.cos(3 * phi + p2)
    d = rho[None] / radius
    folds = smooth_noise(rng, shape, cell=w / 64, z_sigma=0.02 * s + 0.5)
    sulci = smooth_noise(rng, shape, cell=w / 60, z_sigma=0.02 * s + 0.5)
    tissue = np.zeros(shape, np.uint8)
    for edge, code in ((1.0, FAT), (0.945, BONE), (0.915, FAT), (0.895, BONE), (0.87, CSF)):
        tissue[d < edge] = code
    brain = d + 0.012 * folds < 0.85
    tissue[brain] = GREY
    tissue[brain & (d + 0.045 * folds < 0.73)] = WHITE
    tissue[brain & (sulci > 1.6) & (d > 0.66)] = CSF
    k = setup["axes"][0] / 0.65  # inner structures scale with the head
    xs, ys = x / k, y / k
    deep = (np.abs(t - 0.05) < 0.2)[:, None, None]
    tissue[deep & (_ellipse(np.abs(xs), ys, 0.10, 0.08, 0.07, 0.10) & brain)] = GREY  # thalami
    v = np.clip(1 - ((t - 0.12) / 0.36) ** 2, 0, None)[:, None, None]  # ventricle size per slice
    for side in (-1.0, 1.0):
        centre = side * (0.07 + 0.07 * (ys + 0.25) / 0.5)
        body = ((xs - centre) / (0.05 * np.sqrt(v) + 1e-6)) ** 2 + ((ys + 0.02) / (0.25 * v + 1e-6)) ** 2 < 1
        caudate = _ellipse(xs, ys, side * 0.13, -0.12, 0.05, 0.12)
        tissue[body & ~caudate & (v > 0)] = CSF
    return tissue, x / k, y / k, t


def tumour(setup: dict, rng: np.random.Generator, x, y, t, brain: np.ndarray) -> np.ndarray:
    """Boolean tumour volume: wobbly lobes inside the brain, one contiguous run of slices."""
    s, _, w = brain.shape
    f = np.full(brain.shape, np.inf, np.float32)
    for (cx, cy, cz), (a, b, c), angle in setup["lobes"]:
        co, si = np.cos(angle), np.sin(angle)
        u, v = co * (x - cx) + si * (y - cy), -si * (x - cx) + co * (y - cy)
        lobe = np.sqrt((u / a)[None] ** 2 + (v / b)[None] ** 2 + ((t - cz) / c)[:, None, None] ** 2)
        np.minimum(f, lobe, out=f)
    wobble = smooth_noise(rng, brain.shape, cell=w / 16, z_sigma=0.05 * s + 0.5)
    inside = (f < 1 + setup["wobble"] * wobble) & brain
    area = inside.sum(axis=(1, 2))
    inside[area < max(1, round(MIN_TUMOUR_PX * (w / 256) ** 2))] = False
    on = np.flatnonzero(inside.any(axis=(1, 2)))
    if len(on):  # keep the run of slices holding the largest cross-section
        runs = np.split(on, np.flatnonzero(np.diff(on) > 1) + 1)
        keep = max(runs, key=lambda r: int(area[r].sum()))
        inside[np.setdiff1d(np.arange(s), keep)] = False
    return inside
