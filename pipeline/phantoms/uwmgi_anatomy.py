"""A synthetic abdominal MRI phantom: a case's anatomy (its pose on a day: uwmgi_pose; pixels: uwmgi_render).

Anatomy lives in patient millimetres: x towards the image right (patient left), y towards the
image bottom (posterior), z along the slice axis (superior -> inferior, slice 1 at the top).
Organ positions are written in units of the abdominal cavity's semi-axes (so they scale with
the body) and sizes in units of ``k`` = cavity half-width / 120 mm. Stomach, large and small
bowel are tubes (unions of spheres along 3-D paths): their slice cross-sections are the labels,
so neighbouring slices agree. Everything else (liver, kidneys, spine, fat...) only shapes the
image, painted in order onto a tissue map that a per-day contrast table turns into intensities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import interpolate, ndimage

# tissue -> (mean intensity, texture amplitude) on a 0-1 scale before per-case contrast jitter
TISSUES: dict[str, tuple[float, float]] = {
    "background": (0.0, 0.0),
    "fat": (0.80, 0.06),
    "muscle": (0.30, 0.12),
    "visceral": (0.72, 0.10),
    "mesentery": (0.30, 0.10),
    "liver": (0.42, 0.08),
    "spleen": (0.50, 0.07),
    "kidney": (0.60, 0.07),
    "hilum": (0.30, 0.14),
    "cortex": (0.86, 0.08),
    "marrow": (0.20, 0.25),
    "disc": (0.36, 0.10),
    "csf": (0.92, 0.05),
    "blood": (0.85, 0.06),
    "lung": (0.05, 0.80),
    "heart": (0.44, 0.10),
    "bladder": (0.90, 0.05),
    "gallbladder": (0.86, 0.05),
    "st_wall": (0.34, 0.16),
    "lb_wall": (0.30, 0.16),
    "sb_wall": (0.40, 0.16),
    "st_lumen": (1.0, 0.16),  # lumen means come from the content canvas
    "lb_lumen": (1.0, 0.38),
    "sb_lumen": (1.0, 0.14),
}
T = {name: i for i, name in enumerate(TISSUES)}
LUMENS = (T["st_lumen"], T["lb_lumen"], T["sb_lumen"])
N_POINTS = 64  # outline vertices of a polygon
SHIFT = 4  # cv2 sub-pixel bits
Z_TOP, Z_BOTTOM = -85.0, 290.0  # volume extent in units of k mm


@dataclass
class Blob:
    """A deformed ellipsoid; its slice sections are wobbly ellipses."""

    tissue: int
    center: np.ndarray  # (3,) mm
    axes: np.ndarray  # (3,) semi-axes mm
    angle: float = 0.0  # in-plane rotation (radians)
    wobble: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (K, 2) amplitude, phase
    drift: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre shift across its z extent (mm)

    def section(self, z: float) -> np.ndarray | None:
        """(N_POINTS, 2) outline in mm at depth z, or None outside."""
        t = (z - self.center[2]) / self.axes[2]
        if abs(t) >= 1.0:
            return None
        s = np.sqrt(1.0 - t * t)
        theta = np.linspace(0, 2 * np.pi, N_POINTS, endpoint=False)
        r = 1.0 + sum(a * np.cos((k + 2) * theta + p + 2 * t) for k, (a, p) in enumerate(self.wobble))
        x, y = self.axes[0] * s * r * np.cos(theta), self.axes[1] * s * r * np.sin(theta)
        c, sn = np.cos(self.angle), np.sin(self.angle)
        centre = self.center[:2] + self.drift * t
        return np.stack([centre[0] + c * x - sn * y, centre[1] + sn * x + c * y], axis=1)


@dataclass
class Tube:
    """Spheres along a 3-D path; a wall with an optional lumen whose content sets its intensity."""

    wall: int
    points: np.ndarray  # (N, 3) mm
    radius: np.ndarray  # (N,) outer radius mm
    lumen: int | None = None
    inner: np.ndarray | None = None  # (N,) lumen radius mm
    content: np.ndarray | None = None  # (N,) lumen intensity
    label: int | None = None  # index into CLASSES


@dataclass
class Body:
    """Abdominal cavity outline plus muscle and fat walls (thickness anterior, lateral, posterior)."""

    a: float
    b: float
    wobble: np.ndarray
    waist: np.ndarray  # (2, 3) amplitude, period, phase of the x and y semi-axis change along z
    muscle: tuple[float, float, float]
    fat: tuple[float, float, float]
    power: float  # superellipse exponent of the cavity (2 = ellipse, larger = boxier)

    def outlines(self, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body, muscle-wall and cavity outlines in mm at depth z."""
        theta = np.linspace(0, 2 * np.pi, N_POINTS, endpoint=False)
        a, b = (
            ax * (1 + w[0] * np.sin(2 * np.pi * z / w[1] + w[2]))
            for ax, w in zip((self.a, self.b), self.waist)
        )
        cos, sin = np.cos(theta), np.sin(theta)
        r = (np.abs(cos / a) ** self.power + np.abs(sin / b) ** self.power) ** (-1 / self.power)
        r = r * (1.0 + sum(amp * np.cos((k + 2) * theta + ph) for k, (amp, ph) in enumerate(self.wobble)))

        def thickness(ant: float, lat: float, post: float, sharp: int) -> np.ndarray:
            return lat + (ant - lat) * np.clip(-sin, 0, 1) ** 2 + (post - lat) * np.clip(sin, 0, 1) ** sharp

        r_muscle = r + thickness(*self.muscle, sharp=6)
        r_body = r_muscle + thickness(*self.fat, sharp=2)
        table = 0.93 * np.max(r_body * sin)  # the patient lies on a flat table
        r_body = np.where(sin > 0.2, np.minimum(r_body, table / np.maximum(sin, 1e-6)), r_body)
        r_muscle = np.minimum(r_muscle, r_body - 2.0)
        body, muscle, cavity = (np.stack([rr * cos, rr * sin], axis=1) for rr in (r_body, r_muscle, r))
        return body, muscle, cavity


@dataclass
class Anatomy:
    """One case: body walls, unlabelled structures in painting order, the labelled organs, vessels."""

    k: float
    body: Body
    layers: list[Blob | Tube]  # painted in order after the body walls
    organs: list[Tube]  # stomach, large bowel, small bowel tubes (labelled)
    vessels: list[tuple[int, Tube]]  # (host tissue, vessel): drawn only over that tissue
    spine: tuple[float, float, float, float]  # x, y, radius of the vertebral body, disc period (mm)


def spline_tube(ctrl: np.ndarray, radii: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a path through control points at ``step`` mm with a cubic spline."""
    seg = np.linalg.norm(np.diff(ctrl, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(np.maximum(seg, 1e-6))])
    fine = np.arange(0.0, s[-1], step)
    path = interpolate.CubicSpline(s, ctrl, bc_type="natural")(fine)
    return path, np.interp(fine, s, radii)


def smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """A 1-D Gaussian-smoothed random sequence scaled to 0-1."""
    x = ndimage.gaussian_filter1d(rng.standard_normal(n + 8 * int(sigma) + 8), sigma, mode="wrap")[:n]
    return (x - x.min()) / max(np.ptp(x), 1e-9)


def random_walk(rng, start, end, centre, semi, n_steps: int, step: float) -> np.ndarray:
    """A self-avoiding-ish walk with momentum inside an ellipsoid that ends at ``end`` (small bowel)."""
    p, d = np.array(start, float), rng.standard_normal(3)
    pts = [p.copy()]
    for i in range(n_steps):
        d = d / np.linalg.norm(d) + 0.3 * rng.standard_normal(3)
        q = (p - centre) / semi
        if np.sum(q * q) > 0.75:
            d -= 1.5 * q / np.linalg.norm(q)
        if i > 12:
            prev = np.asarray(pts[:-12])
            delta = p - prev
            dist2 = np.sum(delta * delta, axis=1)
            near = dist2 < (5 * step) ** 2
            if near.any():
                away = np.sum(delta[near] / dist2[near, None], axis=0)
                d += 0.8 * away / (np.linalg.norm(away) + 1e-9)
        guide = max(0.0, (i - 0.75 * n_steps) / (0.25 * n_steps))
        if guide > 0:
            d = (1 - guide) * d / np.linalg.norm(d) + 2 * guide * (end - p) / (np.linalg.norm(end - p) + 1e-6)
        p = p + step * d / np.linalg.norm(d)
        pts.append(p.copy())
    pts.append(np.asarray(end, float))
    return ndimage.gaussian_filter1d(np.asarray(pts), 1.5, axis=0, mode="nearest")


def _blob(tissue, a, b, k, xn, yn, z, ax, ay, az, rng, angle=0.0, wob=0.06, jitter=0.04) -> Blob:
    """A blob placed in cavity units (xn, yn), z and sizes in k-units; axes in cavity units if < 2."""
    centre = np.array(
        [(xn + jitter * rng.standard_normal()) * a, (yn + jitter * rng.standard_normal()) * b, z * k]
    )
    axes = np.array([ax * a if ax < 2 else ax * k, ay * b if ay < 2 else ay * k, az * k])
    axes *= rng.uniform(0.9, 1.1, 3)
    wobble = np.stack([wob * rng.uniform(0.2, 1, 3) / np.arange(1, 4), rng.uniform(0, 2 * np.pi, 3)], axis=1)
    return Blob(T[tissue], centre, axes, angle + rng.normal(0, 0.08), wobble, rng.normal(0, 4 * k, 2))


def make_anatomy(rng: np.random.Generator, cavity_a: float, aspect: float) -> Anatomy:
    """A case's anatomy for a cavity half-width ``cavity_a`` mm and depth/width ``aspect``."""
    a, b = cavity_a, cavity_a * aspect
    k = a / 120.0
    zs = rng.uniform(0.92, 1.08)  # organ placement along z (stretch), a case's own
    zo = rng.normal(0, 6)
    body = Body(
        a,
        b,
        np.stack([rng.uniform(0, 0.04, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
        np.stack(
            [rng.uniform(0.02, 0.07, 2), rng.uniform(250, 450, 2) * k, rng.uniform(0, 2 * np.pi, 2)], axis=1
        ),
        (rng.uniform(8, 14) * k, rng.uniform(6, 11) * k, rng.uniform(38, 50) * k),
        _three(rng.uniform(5, 32) * k * np.array([1.0, rng.uniform(0.8, 1.4), 0.8])),
        rng.uniform(2.0, 3.0),
    )
    vx, vy, vr = rng.normal(0, 3) * k, b - 4 * k, rng.uniform(15, 19) * k

    def B(tissue: str, xn: float, yn: float, zc: float, ax: float, ay: float, az: float, **kw: float) -> Blob:
        return _blob(tissue, a, b, k, xn, yn, zc, ax, ay, az, rng=rng, **kw)

    def z(v):
        return (v + zo) * zs

    blobs = [
        B("lung", -0.55, 0.25, z(-100), 0.42, 0.72, 95),
        B("lung", 0.55, 0.25, z(-100), 0.42, 0.72, 95),
        B("heart", 0.12, -0.3, z(-95), 0.40, 0.50, 70),
        B("liver", -0.36, 0.0, z(32), 0.60, 0.80, 78, angle=0.15, wob=0.09),
        B("liver", 0.05, -0.45, z(10), 0.30, 0.30, 50, wob=0.08),
        B("gallbladder", -0.30, -0.5, z(72), 13, 11, 25),
        B("spleen", 0.70, 0.40, z(45), 0.18, 0.38, 45, angle=0.6),
        B("kidney", 0.44, 0.62, z(110), 22, 28, 52, angle=0.55),
        B("kidney", -0.44, 0.62, z(125), 22, 28, 52, angle=-0.55),
        B("bladder", 0.0, -0.3, z(275), 0.28, 0.38, 50),
        B("cortex", -0.62, 0.45, z(240), 0.30, 0.10, 55, angle=-0.9),
        B("cortex", 0.62, 0.45, z(240), 0.30, 0.10, 55, angle=0.9),
    ]
    layers: list[Blob | Tube] = list(blobs)
    for kid in (blobs[7], blobs[8]):  # renal hilum: a dark core on the medial side
        hilum = Blob(
            T["hilum"], kid.center.copy(), kid.axes * [0.45, 0.5, 0.8], kid.angle, kid.wobble, kid.drift
        )
        hilum.center[0] -= np.sign(kid.center[0]) * 10 * k
        layers.append(hilum)
    for bone in blobs[10:12]:
        layers.append(
            Blob(T["marrow"], bone.center, bone.axes * [0.7, 0.45, 1.0], bone.angle, bone.wobble, bone.drift)
        )
    layers += _trunk_tubes(rng, (vx, vy, vr), k, z(100))

    organs = [_stomach(rng, a, b, k, z), _large_bowel(rng, a, b, k, z), _small_bowel(rng, a, b, k, z)]
    vessels = _vessels(rng, blobs[3], organs[2], k)
    return Anatomy(k, body, layers, organs, vessels, (vx, vy, vr, rng.uniform(28, 34) * k))


def _trunk_tubes(
    rng: np.random.Generator, spine: tuple[float, float, float], k: float, psoas_top: float
) -> list[Tube]:
    """The aorta, the inferior vena cava and the two psoas muscles, placed from the spine (x, y, radius)."""
    vx, vy, vr = spine
    zz = np.linspace(Z_TOP - 40, Z_BOTTOM + 40, 40) * k

    def line(x: float, y: float) -> np.ndarray:
        return np.stack([np.full(len(zz), x), np.full(len(zz), y), zz], axis=1)

    tubes = [
        Tube(T["blood"], line(vx + 13 * k, vy - vr - 11 * k), np.full(40, 11 * k)),  # aorta
        Tube(T["blood"], line(vx - 24 * k, vy - vr - 9 * k), np.full(40, 12 * k)),  # inferior vena cava
    ]
    for side in (-1, 1):  # psoas: grows from the mid abdomen into the pelvis
        zp = np.linspace(psoas_top, Z_BOTTOM + 40, 20) * k
        xs = side * (vr + 14 * k + np.linspace(0, 40 * k, 20) ** 1.3 / 3)
        grow = np.clip(np.linspace(0.2, 1.6, 20), 0, 1) * rng.uniform(16, 22) * k
        tubes.append(Tube(T["muscle"], np.stack([xs, np.full(20, vy - 8 * k), zp], axis=1), grow))
    return tubes


def _vessels(rng: np.random.Generator, liver: Blob, small_bowel: Tube, k: float) -> list[tuple[int, Tube]]:
    """(host tissue, vessel) pairs: 6 hepatic vessels (bright) and 18 mesenteric ones (dark lines in the fat)."""
    vessels = []
    for i in range(24):
        host = liver.center if i < 6 else small_bowel.points[rng.integers(len(small_bowel.points))]
        start = host + rng.normal(0, 20 * k, 3)
        ctrl = start + np.cumsum(rng.normal(0, 25 * k, (5, 3)), axis=0)
        pts, rad = spline_tube(ctrl, np.linspace(6, 2, 5) * k * (1 if i < 6 else 0.4), 2.0 * k)
        vessels.append(
            (T["liver"], Tube(T["blood"], pts, rad))
            if i < 6
            else (T["visceral"], Tube(T["mesentery"], pts, rad))
        )
    return vessels


def _three(values: np.ndarray) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _jitter_ctrl(rng, ctrl, a, b, k, z, amp) -> tuple[np.ndarray, np.ndarray]:
    ctrl = np.asarray(ctrl, float)
    pts = np.stack([ctrl[:, 0] * a, ctrl[:, 1] * b, z(ctrl[:, 2]) * k], axis=1) + rng.normal(
        0, amp * k, (len(ctrl), 3)
    )
    return pts, ctrl[:, 3] * k * rng.uniform(0.85, 1.15)


def _stomach(rng, a, b, k, z) -> Tube:
    ctrl = [(0.45, 0.15, 42, 22), (0.50, -0.05, 58, 32), (0.40, -0.30, 80, 30), (0.25, -0.50, 98, 26),
            (0.05, -0.56, 108, 18), (-0.08, -0.45, 112, 12)]  # fmt: skip
    pts, rad = spline_tube(*_jitter_ctrl(rng, ctrl, a, b, k, z, 5), 3.0 * k)
    rad *= 0.9
    content = 0.55 + 0.35 * smooth_noise(rng, len(pts), 6)
    return Tube(T["st_wall"], pts, rad, T["st_lumen"], np.maximum(rad - 5 * k, 0), content, label=2)


def _large_bowel(rng, a, b, k, z) -> Tube:
    ctrl = [(-0.58, 0.05, 185, 28), (-0.66, 0.08, 160, 26), (-0.70, 0.10, 135, 24), (-0.62, -0.20, 118, 22),
            (-0.38, -0.58, 145, 21), (0.00, -0.70, 160, 20), (0.35, -0.60, 152, 20), (0.64, -0.22, 132, 20),
            (0.78, 0.28, 100, 19), (0.77, 0.25, 125, 18), (0.72, 0.25, 155, 18), (0.66, 0.20, 185, 18),
            (0.40, -0.10, 212, 18), (0.10, -0.05, 222, 17), (0.02, 0.40, 225, 16)]  # fmt: skip
    pts, rad = spline_tube(*_jitter_ctrl(rng, ctrl, a, b, k, z, 6), 3.0 * k)
    rad *= 0.78
    s = np.arange(len(pts)) * 3.0 * k
    rad = rad * (1 + 0.12 * np.sin(2 * np.pi * s / (rng.uniform(25, 40) * k)))  # haustra
    c = smooth_noise(rng, len(pts), 5)
    content = np.where(c < 0.45, 0.05 + 0.2 * c, np.where(c < 0.85, 0.15 + 0.35 * c, 0.4 + 0.5 * c))
    return Tube(T["lb_wall"], pts, rad, T["lb_lumen"], np.maximum(rad - 3.5 * k, 0), content, label=0)


def _small_bowel(rng, a, b, k, z) -> Tube:
    centre = np.array([-0.02 * a, 0.08 * b, z(162) * k])
    semi = np.array([0.45 * a, 0.38 * b, 56 * k])
    start, end = np.array([0.15 * a, 0.0 * b, z(130) * k]), np.array([-0.32 * a, 0.02 * b, z(182) * k])
    length = rng.uniform(1300, 1800) * k
    pts = random_walk(rng, start, end, centre, semi, int(length / (6 * k)), 6 * k)
    pts, rad = spline_tube(pts, np.full(len(pts), 1.0), 2.5 * k)
    rad = rad * k * (rng.uniform(10, 12.5) + 1.5 * np.sin(np.arange(len(pts)) / rng.uniform(8, 14)))
    open_ = smooth_noise(rng, len(pts), 10)  # collapsed loops show wall only
    content = 0.5 + 0.4 * smooth_noise(rng, len(pts), 8)
    return Tube(T["sb_wall"], pts, rad, T["sb_lumen"], rad * (0.25 + 0.55 * open_), content, label=1)
