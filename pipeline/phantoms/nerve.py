"""A synthetic phantom of the Kaggle "Ultrasound Nerve Segmentation" data, in its exact layout.

``generate_nerve(out, "demo")`` writes ``train/<subject>_<img>.tif`` with ``_mask.tif`` twins
(420x580 uint8, masks 0/255), ``train_masks.csv`` (column-major RLE), ``test/<img>.tif`` from
held-out subjects in shuffled order, ``sample_submission.csv``, the hidden answers
``test_labels.csv``, ``dataset.json`` and ``preview.png``.

Each subject is one ultrasound scene (:mod:`pipeline.phantoms.nerve_scene`: speckle on curved
tissue layers, fascia lines, depth attenuation, often an anechoic vessel) holding the brachial
plexus: an oval a little brighter than the tissue around it, with a broken bright rim and a
honeycomb inside, placed, sized and shaped as in the real masks. Its frames are clips of a video:
the probe shifts, the nerve's size changes a little with each clip, speckle partly decorrelates and
the nerve leaves the imaging plane in 59% of frames on average (from 11% to 98% per subject, as in
the real set). A few frames copy a nerve frame almost exactly but carry no mask: the contradictory
duplicates of the real set. Every subject is seeded from ``(seed, subject)``, so the bytes do not
depend on the number of workers. ``Preset.visibility`` scales the nerve's departure from the tissue
around it: 1 is the real contrast (``make data-stats`` compares them).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile
from scipy.special import expit

from pipeline.io import write_csv, write_json, write_with
from pipeline.phantoms.common import preset_spec, resolve_preset, run_jobs, write_dataset_folder
from pipeline.phantoms.nerve_scene import (
    SHAPE,
    Nerve,
    add_artery,
    draw_nerve,
    nerve_factor,
    smooth_field,
    speckle,
    tissue_echo,
)
from pipeline.rle import rle_encode_numpy

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: calibrated to the real masks and frames (share, size, place, contrast)
MARGIN = (31, 62)  # probe shift room around the frame, px at 420x580 (real: the nerve moves 18 / 36 px)
BRIGHTNESS = 0.78  # the real frames' mean grey level is about 95


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
    visibility: float = 1.0  # nerve contrast: 1 = as real (faint, a little bright)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 3, 15, 2, 6, size=(84, 116)),
    "demo": Preset("demo", 12, 240, 3, 60),  # the real contrast, as `full`
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


@dataclass
class Frame:
    offset: tuple[int, int]
    visible: bool  # the nerve is in the imaging plane
    labelled: bool
    source: int = -1  # a contradictory duplicate copies this frame
    scale: float = 1.0  # the nerve's size in this frame (probe pressure and angle)


def _plan_frames(
    rng: np.random.Generator, n: int, preset: Preset, margin: tuple[int, int]
) -> tuple[list[Frame], int]:
    """Video clips with small probe shifts; the nerve in view in the first ``share`` of them.

    The share of frames with a nerve differs a lot between subjects (real: 2% to 89%, mean 41%):
    a Beta draw around ``preset.nerve_share``, leaving every subject at least one frame of each kind.
    """
    frames: list[Frame] = []
    while len(frames) < n:
        base = rng.integers(0, 2 * np.asarray(margin) + 1)
        scale = float(np.exp(rng.normal(0, 0.08)))
        for _ in range(int(rng.integers(2, 9))):
            offset = np.clip(base + rng.integers(-2, 3, 2), 0, 2 * np.asarray(margin))
            jitter = float(np.exp(rng.normal(0, 0.03)))
            frames.append(Frame((int(offset[0]), int(offset[1])), False, False, scale=scale * jitter))
    frames = frames[:n]
    share = rng.beta(3.2 * preset.nerve_share, 3.2 * (1 - preset.nerve_share))
    n_nerve = int(np.clip(np.rint(n * share), 1, max(n - 1, 1)))
    for f in frames[:n_nerve]:
        f.visible = f.labelled = True
    n_dup = int(np.floor(preset.duplicate_rate * n + rng.random()))
    n_dup = min(n_dup, n_nerve, n - n_nerve)
    sources = rng.choice(n_nerve, n_dup, replace=False) if n_dup else np.zeros(0, int)
    targets = rng.choice(np.arange(n_nerve, n), n_dup, replace=False) if n_dup else np.zeros(0, int)
    for i, j in zip(sources, targets):
        frames[j] = Frame(frames[i].offset, True, False, int(i), frames[i].scale)
    return frames, n_dup


def _paint_nerve(echo: np.ndarray, f: Frame, nerve: Nerve, texture: np.ndarray, vis: float) -> None:
    """Multiply the frame's echo by the nerve's factor in a window around it (in place)."""
    h, w = echo.shape
    (oy, ox), half = f.offset, 1.5 * max(nerve.a, nerve.b) * f.scale + 4
    y0, y1 = max(int(nerve.cy - oy - half), 0), min(int(nerve.cy - oy + half) + 1, h)
    x0, x1 = max(int(nerve.cx - ox - half), 0), min(int(nerve.cx - ox + half) + 1, w)
    if y1 <= y0 or x1 <= x0:
        return
    r, theta = nerve.radius((y1 - y0, x1 - x0), oy + y0, ox + x0, f.scale)
    window = texture[oy + y0 : oy + y1, ox + x0 : ox + x1]
    echo[y0:y1, x0:x1] *= nerve_factor(nerve, r, theta, window, vis)


def render_subject(job: SubjectJob) -> tuple[np.ndarray, np.ndarray, int]:
    """Images (n, H, W) uint8, masks (n, H, W) uint8 0/255 in ``job.names`` order, duplicate count."""
    h, w = job.preset.size
    k = h / SHAPE[0]
    margin = (max(2, round(MARGIN[0] * k)), max(2, round(MARGIN[1] * k)))
    canvas = (h + 2 * margin[0], w + 2 * margin[1])
    rng = np.random.default_rng([job.seed, 2016, job.subject])
    tissue = tissue_echo(rng, canvas, k)
    nerve = draw_nerve(rng, k, margin)
    texture = smooth_field(rng, canvas, 5.0 * k, 1.6 * k)  # the nerve's fascicles and septa, lying across
    add_artery(rng, tissue, nerve, k)
    scene_speckle = speckle(rng, tissue.shape, k)
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
        own = speckle(frng, (h, w), k)
        if f.source >= 0:
            field = 0.97 * fields[f.source] + 0.25 * own
        else:
            field = 0.9 * scene_speckle[crop] + 0.44 * own
            fields[i] = field
        rayleigh = np.sqrt((field * field).sum(axis=2))
        echo = tissue[crop] * gain
        if f.visible:
            _paint_nerve(echo, f, nerve, texture, job.preset.visibility)
        grain = cv2.GaussianBlur(rayleigh / rayleigh.mean(), (0, 0), 0.7 * k + 0.3) ** 0.6
        image = 255 * BRIGHTNESS * echo * (0.25 + 0.75 * grain)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
        if f.labelled:  # the annotator's outline: the nerve's, with a little hand noise
            jitter = frng.normal(0, [1.0 * k, 1.0 * k, 0.04, 0.04])
            r, _ = nerve.radius((h, w), oy, ox, f.scale, jitter)
            masks[i] = (r <= 1) * np.uint8(255)
    return images[order], masks[order], n_dup


# --------------------------------------------------------------------------- writing


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
    return preset_spec(preset, seed, GENERATOR_VERSION)


def _write_all(tmp: Path, preset: Preset, seed: int, workers: int) -> dict:
    jobs = [dataclasses.replace(job, root=str(tmp)) for job in plan_subjects(preset, seed)]
    rows: dict[str, list] = {"train": [], "test": []}
    duplicates = {"train": 0, "test": 0}
    for job, (subject_rows, n_dup) in zip(
        jobs, run_jobs(write_subject, jobs, workers, "subjects", "subject")
    ):
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
