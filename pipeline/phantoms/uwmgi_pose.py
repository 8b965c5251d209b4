"""A synthetic abdominal MRI phantom: a case's anatomy posed on one day (deformed, sliced, contrasted).

The anatomy itself is :mod:`pipeline.phantoms.uwmgi_anatomy`; the pixels, :mod:`pipeline.phantoms.uwmgi_render`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.phantoms.uwmgi_anatomy import TISSUES, Z_BOTTOM, Z_TOP, Anatomy, Blob, Tube

# --------------------------------------------------------------------------- a day's pose


@dataclass
class Day:
    """One day-volume of a case: deformed anatomy, slice depths, mm -> pixel map, contrast."""

    anatomy: Anatomy
    shape: tuple[int, int]  # (H, W)
    z: np.ndarray  # (S,) slice depths, mm
    affine: np.ndarray  # (2, 3): [col, row] = affine @ [x, y, 1]
    px_per_mm: float
    contrast: np.ndarray  # (n_tissues, 2) mean, texture
    peak: float  # intensity of 1.0 in the 16-bit output
    noise: float  # Rician noise sigma on the 0-1 scale
    blur: float  # Gaussian sigma in pixels (partial volume)
    air_level: float  # stomach air above this y (mm) is dark


def _warp(rng: np.random.Generator, k: float, amp: float, wavelength: tuple[float, float], n: int = 4):
    """A smooth random 3-D displacement field (sum of plane waves), as a function of points."""
    kv = rng.standard_normal((n, 3))
    kv *= (2 * np.pi / (rng.uniform(*wavelength, n) * k) / np.linalg.norm(kv, axis=1))[:, None]
    u = rng.standard_normal((n, 3))
    u *= (amp * k * rng.uniform(0.5, 1.0, n) / np.linalg.norm(u, axis=1))[:, None]
    phase = rng.uniform(0, 2 * np.pi, n)
    return lambda p: p + np.sin(p @ kv.T + phase) @ u


def make_day(
    anatomy: Anatomy,
    rng: np.random.Generator,
    shape: tuple[int, int],
    spacing: float,
    centre_px: tuple[float, float],
    contrast: np.ndarray,
    peak: float,
    n_slices: int,
) -> Day:
    """Shift, rotate, scale and deform a case's anatomy for one day; draw that day's imaging settings."""
    k = anatomy.k
    warp = _warp(rng, k, 4.0, (120, 260))
    local = _warp(rng, k, 3.5, (40, 80), n=6)  # small bowel loops move on their own

    def moved(item):
        if isinstance(item, Blob):
            return Blob(item.tissue, warp(item.center[None])[0], item.axes * rng.uniform(0.95, 1.05, 3), item.angle,
                        item.wobble, item.drift)  # fmt: skip
        if isinstance(item, Tube) and item.label is not None:
            pts = warp(item.points)
            grow = rng.uniform(0.85, 1.15) if item.label == 2 else 1.0  # stomach filling
            if item.label == 1:
                pts = local(pts)
            inner = None if item.inner is None else item.inner * grow
            return Tube(item.wall, pts, item.radius * grow, item.lumen, inner, item.content, item.label)
        return item

    moved_anatomy = Anatomy(
        k,
        anatomy.body,
        [moved(item) for item in anatomy.layers],
        [moved(item) for item in anatomy.organs],
        [(host, Tube(v.wall, warp(v.points), v.radius)) for host, v in anatomy.vessels],
        anatomy.spine,
    )
    top, bottom = (Z_TOP + rng.normal(0, 6)) * k, (Z_BOTTOM + rng.normal(0, 6)) * k
    z = top + (np.arange(n_slices) + 0.5) * (bottom - top) / n_slices
    theta, scale = rng.normal(0, 0.05), rng.uniform(0.96, 1.04) / spacing
    rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shift = np.asarray(centre_px) + rng.normal(0, 5.0 / spacing, 2)
    stomach = moved_anatomy.organs[0]
    y_lo, y_hi = np.min(stomach.points[:, 1] - stomach.radius), np.max(stomach.points[:, 1] + stomach.radius)
    return Day(
        anatomy=moved_anatomy,
        shape=shape,
        z=z,
        affine=np.concatenate([rot, shift[:, None]], axis=1),
        px_per_mm=float(scale),
        contrast=contrast * np.array([rng.uniform(0.95, 1.05, len(contrast)), np.ones(len(contrast))]).T,
        peak=peak * rng.uniform(0.85, 1.15),
        noise=rng.uniform(0.012, 0.035),
        blur=rng.uniform(0.5, 1.0),
        air_level=y_lo + rng.uniform(0.1, 0.3) * (y_hi - y_lo),
    )


def case_contrast(rng: np.random.Generator) -> np.ndarray:
    """A case's (mean, texture) per tissue: the reference table jittered by about 10%."""
    table = np.array(list(TISSUES.values()), dtype=np.float64)
    table[:, 0] *= np.clip(rng.normal(1.0, 0.1, len(table)), 0.7, 1.3)
    table[:, 1] *= rng.uniform(0.8, 1.25, len(table))
    return table
