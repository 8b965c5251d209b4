"""A synthetic phantom of the Kaggle "Ultrasound Nerve Segmentation" data, in its exact layout.

``generate_nerve(out, "demo")`` writes ``train/<subject>_<img>.tif`` with ``_mask.tif`` twins
(420x580 uint8, masks 0/255), ``train_masks.csv`` (column-major RLE), ``test/<img>.tif`` from
held-out subjects in shuffled order, ``sample_submission.csv``, the hidden answers
``test_labels.csv``, ``dataset.json`` and ``preview.png``.

Each subject is one ultrasound scene (speckle on curved tissue layers, fascia lines, depth
attenuation, often an anechoic vessel) holding a hypoechoic brachial plexus with a bright rim.
Its frames are clips of a video: the probe shifts a little, speckle partly decorrelates and the
nerve leaves the imaging plane in about 59% of frames. A few frames copy a nerve frame almost
exactly but carry no mask: the contradictory duplicates of the real set. Every subject is
seeded from ``(seed, subject)``, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile
from scipy.ndimage import gaussian_filter1d
from scipy.special import expit
from tqdm.auto import tqdm

from pipeline.data.synthetic_io import SyntheticDataError, write_dataset_folder, resolve_preset
from pipeline.io import write_csv, write_json, write_with
from pipeline.rle import rle_encode_numpy

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SHAPE = (420, 580)  # rows, columns of every real frame
MARGIN = 20  # probe shift room around the frame, px at 420x580


@dataclass(frozen=True)
class Preset:
    """How much data to generate; image totals are spread evenly over the subjects."""

    name: str
    train_subjects: int
    train_images: int
    test_subjects: int
    test_images: int
    size: tuple[int, int] = SHAPE
    nerve_share: float = 0.41  # labelled frames (the real train set: 41%)
    duplicate_rate: float = 0.05  # contradictory duplicates per frame
    visibility: float = 1.0  # nerve contrast: 1 = the real data's faint oval; the CPU demo needs more


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 3, 15, 2, 6, size=(84, 116)),
    "demo": Preset("demo", 12, 240, 3, 60, visibility=2.2),  # learnable by a small CPU model in minutes
    "full": Preset("full", 47, 5635, 46, 5508),  # 46 test subjects: an assumption, not published
}


@dataclass(frozen=True)
class SubjectJob:
    root: str
    split: str
    subject: int
    names: tuple[str, ...]  # file stems in output order: "3_7" (train) or "128" (test)
    seed: int
    preset: Preset


def _counts(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def plan_subjects(preset: Preset, seed: int) -> list[SubjectJob]:
    """Every subject's split and file names: train subjects 1..n, then the held-out test subjects."""
    rng = np.random.default_rng([seed, 5144])
    jobs = [
        SubjectJob("", "train", s + 1, tuple(f"{s + 1}_{i + 1}" for i in range(n)), seed, preset)
        for s, n in enumerate(_counts(preset.train_images, preset.train_subjects))
    ]
    numbers = rng.permutation(preset.test_images) + 1  # the real test set mixes subjects
    start = 0
    for s, n in enumerate(_counts(preset.test_images, preset.test_subjects)):
        names = tuple(str(k) for k in numbers[start : start + n])
        jobs.append(SubjectJob("", "test", preset.train_subjects + s + 1, names, seed, preset))
        start += n
    return jobs


# --------------------------------------------------------------------------- the scene


def _field(rng: np.random.Generator, shape: tuple[int, ...], sx: float, sy: float) -> np.ndarray:
    """Gaussian noise smoothed with (sx, sy) px, scaled to unit standard deviation."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sx, 0.4), sigmaY=max(sy, 0.4),
                             borderType=cv2.BORDER_REFLECT)  # fmt: skip
    return field / (field.std() + 1e-6)


def _ellipse_radius(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, angle: float):
    """Normalised radius (1 on the ellipse) and cos(2 * polar angle) of every pixel."""
    dy = np.arange(shape[0], dtype=np.float32)[:, None] - cy
    dx = np.arange(shape[1], dtype=np.float32)[None, :] - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / b
    r2 = u * u + v * v
    return np.sqrt(r2), (u * u - v * v) / (r2 + 1e-6)


def _scene(
    rng: np.random.Generator, canvas: tuple[int, int], k: float, vis: float = 1.0
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Tissue echogenicity, the nerve's multiplicative factor and the nerve ellipse (canvas px)."""
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
    fibres = cv2.remap(
        _field(rng, canvas, 14 * k, 1.6 * k), map_x, map_y, cv2.INTER_LINEAR, cv2.BORDER_REFLECT
    )
    streaks = cv2.remap(
        _field(rng, canvas, 18 * k, 1.6 * k), map_x, map_y, cv2.INTER_LINEAR, cv2.BORDER_REFLECT
    )
    tissue *= np.exp(0.25 * fibres + 0.3 * _field(rng, canvas, 22 * k, 7 * k))  # fibres, muscle bundles
    tissue += 1.2 * np.clip(streaks - 1.5, 0, None)
    tissue *= np.exp(0.25 * _field(rng, canvas, 50 * k, 30 * k))
    # fascia: bright specular lines on the layer boundaries, broken along their length
    strength = rng.uniform(0.8, 1.8, len(bases))
    strength[0] = 2.0  # the skin line
    gaps = np.clip(
        0.6 + gaussian_filter1d(rng.standard_normal((len(bases), w)), 25 * k + 1, axis=1) * 8, 0, 1
    )
    for i in range(len(bases)):
        line = np.exp(-(((y - bounds[i][None, :]) / (2.6 * k + 0.5)) ** 2))
        tissue += (strength[i] * gaps[i])[None, :].astype(np.float32) * line
    # the nerve: an oval at a subject-specific spot in the mid field
    nerve = (rng.uniform(0.32, 0.6) * h, rng.uniform(0.3, 0.75) * w, rng.uniform(38, 60) * k,
             rng.uniform(28, 42) * k, rng.uniform(-0.4, 0.4))  # fmt: skip
    r, c2 = _ellipse_radius(canvas, *nerve)
    inside = expit((1 - r) / 0.04)
    inner = rng.uniform(0.68, 0.8) * np.exp(0.2 * _field(rng, canvas, 2.5 * k, 2.5 * k))  # fascicles
    rim = np.exp(-(((r - 1) / 0.09) ** 2)) * (0.55 - 0.45 * c2)  # strongest on top and bottom
    factor = 1 + inside * vis * (inner - 1) + vis * rng.uniform(0.35, 0.6) * rim
    factor = np.maximum(factor, 0.05)
    # often an anechoic artery with a bright wall, away from the nerve
    if rng.random() < 0.7:
        radius = rng.uniform(14, 24) * k
        for _ in range(20):
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.08, 0.92) * w
            if np.hypot(cy - nerve[0], cx - nerve[1]) > nerve[2] + radius + 15 * k:
                break
        d, _ = _ellipse_radius(canvas, cy, cx, radius, radius, 0.0)
        tissue *= 1 - 0.85 * expit((1 - d) / 0.05)
        tissue += 0.8 * np.exp(-(((d - 1) / 0.1) ** 2))
        tissue *= 1 + 0.3 * np.exp(-(((x - cx) / radius) ** 2))[None, :] * (y > cy + radius)
    return tissue.astype(np.float32), factor.astype(np.float32), nerve


def _speckle(rng: np.random.Generator, shape: tuple[int, int], k: float) -> np.ndarray:
    """A complex Gaussian field (H, W, 2) with laterally elongated grains."""
    return _field(rng, (*shape, 2), 2.4 * k, 1.2 * k)


@dataclass
class Frame:
    offset: tuple[int, int]
    visible: bool  # the nerve is in the imaging plane
    labelled: bool
    source: int = -1  # a contradictory duplicate copies this frame


def _plan_frames(rng: np.random.Generator, n: int, preset: Preset, margin: int) -> tuple[list[Frame], int]:
    """Video clips with small probe shifts; the nerve in view in the first ``share`` of them."""
    frames = []
    while len(frames) < n:
        base = rng.integers(0, 2 * margin + 1, 2)
        for _ in range(int(rng.integers(2, 9))):
            offset = np.clip(base + rng.integers(-2, 3, 2), 0, 2 * margin)
            frames.append(Frame((int(offset[0]), int(offset[1])), False, False))
    frames = frames[:n]
    share = np.clip(rng.normal(preset.nerve_share, 0.08), 0.2, 0.65)
    n_nerve = int(np.rint(n * share))
    for f in frames[:n_nerve]:
        f.visible = f.labelled = True
    n_dup = int(np.floor(preset.duplicate_rate * n + rng.random()))
    n_dup = min(n_dup, n_nerve, n - n_nerve)
    sources = rng.choice(n_nerve, n_dup, replace=False) if n_dup else []
    targets = rng.choice(np.arange(n_nerve, n), n_dup, replace=False) if n_dup else []
    for i, j in zip(sources, targets):
        frames[j] = Frame(frames[i].offset, True, False, int(i))
    return frames, n_dup


def render_subject(job: SubjectJob) -> tuple[np.ndarray, np.ndarray, int]:
    """Images (n, H, W) uint8, masks (n, H, W) uint8 0/255 in ``job.names`` order, duplicate count."""
    h, w = job.preset.size
    k = h / SHAPE[0]
    margin = max(2, round(MARGIN * k))
    rng = np.random.default_rng([job.seed, 2016, job.subject])
    tissue, factor, nerve = _scene(rng, (h + 2 * margin, w + 2 * margin), k, job.preset.visibility)
    scene_speckle = _speckle(rng, tissue.shape, k)
    frames, n_dup = _plan_frames(rng, len(job.names), job.preset, margin)
    depth = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    across = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    gain = np.exp(-rng.uniform(0.2, 0.45) * depth) * (1 - 0.3 * expit((depth - 0.8) / 0.05))
    gain = gain * (1 - 0.15 * across**4) * rng.uniform(0.85, 1.15)
    order = rng.permutation(len(frames))  # file numbers do not follow the video
    images = np.empty((len(frames), h, w), np.uint8)
    masks = np.zeros((len(frames), h, w), np.uint8)
    fields: dict[int, np.ndarray] = {}
    for i in sorted(range(len(frames)), key=lambda i: frames[i].source):  # sources before copies
        f = frames[i]
        frng = np.random.default_rng([job.seed, 2016, job.subject, i])
        (oy, ox), crop = f.offset, np.s_[f.offset[0] : f.offset[0] + h, f.offset[1] : f.offset[1] + w]
        own = _speckle(frng, (h, w), k)
        if f.source >= 0:
            field = 0.97 * fields[f.source] + 0.25 * own
        else:
            field = 0.9 * scene_speckle[crop] + 0.44 * own
            fields[i] = field
        rayleigh = np.sqrt((field * field).sum(axis=2))
        echo = tissue[crop] * (factor[crop] if f.visible else 1) * gain
        grain = cv2.GaussianBlur(rayleigh / rayleigh.mean(), (0, 0), 0.7 * k + 0.3) ** 0.6
        image = 255 * 0.7 * echo * (0.25 + 0.75 * grain)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
        if f.labelled:  # the annotator's oval: the nerve outline with a little hand noise
            cy, cx, a, b, angle = nerve
            jitter = frng.normal(0, [1.0 * k, 1.0 * k, 0.04, 0.04])
            r, _ = _ellipse_radius((h, w), cy - oy + jitter[0], cx - ox + jitter[1],
                                   a * (1 + jitter[2]), b * (1 + jitter[3]), angle)  # fmt: skip
            masks[i] = (r <= 1) * np.uint8(255)
    return images[order], masks[order], n_dup


# --------------------------------------------------------------------------- writing


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def write_subject(job: SubjectJob) -> tuple[list[tuple[int, int, str]], int]:
    """Render one subject and write its TIFFs; return its (subject, img, rle) rows and duplicate count."""
    images, masks, n_dup = render_subject(job)
    folder = Path(job.root) / job.split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, image, mask in zip(job.names, images, masks):
        tifffile.imwrite(folder / f"{name}.tif", image, photometric="minisblack", metadata=None)
        if job.split == "train":
            tifffile.imwrite(folder / f"{name}_mask.tif", mask, photometric="minisblack", metadata=None)
        rows.append((job.subject, int(name.split("_")[-1]), rle_encode_numpy(mask, order="F")))
    return rows, n_dup


def _area(rle: str) -> int:
    return sum(map(int, rle.split()[1::2])) if rle else 0


def _split_stats(frame: pd.DataFrame, duplicates: int) -> dict:
    area = frame["pixels"].map(_area)
    filled = area[area > 0]
    return {
        "subjects": int(frame["subject"].nunique()),
        "images": len(frame),
        "nerve_share": round(float((area > 0).mean()), 4) if len(frame) else 0.0,
        "contradictory_duplicates": duplicates,
        "mask_px_mean": round(float(filled.mean()), 1) if len(filled) else 0.0,
        "mask_px_min": int(filled.min()) if len(filled) else 0,
        "mask_px_max": int(filled.max()) if len(filled) else 0,
    }


def format_stats(stats: dict) -> str:
    """A few readable lines for the log."""
    return "\n".join(
        f"{split}: {s['subjects']} subjects, {s['images']} images, {s['nerve_share']:.1%} with a nerve "
        f"(mask px mean {s['mask_px_mean']:.0f}, min {s['mask_px_min']}, max {s['mask_px_max']}), "
        f"{s['contradictory_duplicates']} contradictory duplicates"
        for split, s in stats.items()
    )


def save_preview(root: Path, path: Path, n_panels: int = 6) -> Path:
    """A grid of train frames with a nerve, from different subjects, with the mask contour."""
    from matplotlib.figure import Figure

    labels = pd.read_csv(root / "train_masks.csv", keep_default_na=False)
    filled = labels[labels["pixels"] != ""]
    chosen = filled.groupby("subject").head(2).sort_values(["img", "subject"]).head(n_panels)
    cols = min(3, max(len(chosen), 1))
    rows = max(1, -(-len(chosen) // cols))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, chosen.itertuples(index=False)):
        stem = root / "train" / f"{row.subject}_{row.img}"
        ax.imshow(tifffile.imread(f"{stem}.tif"), cmap="gray", vmin=0, vmax=255)
        ax.contour(tifffile.imread(f"{stem}_mask.tif"), levels=[127], colors=["yellow"], linewidths=0.8)
        ax.set_title(f"{row.subject}_{row.img}.tif", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.03, hspace=0.12)
    return write_with(path, lambda p: fig.savefig(p, format="png", dpi=64))


def _spec(preset: Preset, seed: int) -> dict:
    return json.loads(
        json.dumps({"generator": GENERATOR_VERSION, "seed": seed, **dataclasses.asdict(preset)})
    )


def _write_all(tmp: Path, preset: Preset, seed: int, workers: int) -> dict:
    jobs = [dataclasses.replace(job, root=str(tmp)) for job in plan_subjects(preset, seed)]
    rows: dict[str, list] = {"train": [], "test": []}
    duplicates = {"train": 0, "test": 0}
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(workers, initializer=_init_worker) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(write_subject, jobs) if pool else map(write_subject, jobs)
        for job, (subject_rows, n_dup) in zip(jobs, tqdm(results, total=len(jobs), desc="subjects")):
            rows[job.split] += subject_rows
            duplicates[job.split] += n_dup
    train = pd.DataFrame(rows["train"], columns=["subject", "img", "pixels"]).sort_values(["subject", "img"])
    test = pd.DataFrame(rows["test"], columns=["subject", "img", "pixels"]).sort_values("img")
    write_csv(tmp / "train_masks.csv", train)
    write_csv(tmp / "sample_submission.csv", test[["img"]].assign(pixels=""))
    write_csv(tmp / "test_labels.csv", test[["img", "pixels", "subject"]])
    stats = {
        "train": _split_stats(train, duplicates["train"]),
        "test": _split_stats(test, duplicates["test"]),
    }
    save_preview(tmp, tmp / "preview.png")
    counts = {split: {k: s[k] for k in ("subjects", "images")} for split, s in stats.items()}
    write_json(tmp / "dataset.json", {"spec": _spec(preset, seed), "counts": counts, "stats": stats})
    return stats


def generate_nerve(
    out_dir: Path | str, preset: str | Preset, seed: int = 0, workers: int = 1, force: bool = False
) -> dict:
    """Write the nerve phantom under ``out_dir`` and return its statistics.

    An ``out_dir`` already holding the same preset and seed is kept as is; one made otherwise is
    replaced only with ``force``; a non-empty folder that is not a phantom never is.
    """
    preset = resolve_preset(preset, PRESETS)
    return write_dataset_folder(
        out_dir,
        _spec(preset, seed),
        lambda tmp: _write_all(tmp, preset, seed, workers),
        force,
        what="nerve phantom",
    )
