"""The UW-Madison phantom: a synthetic abdominal MRI set in the exact Kaggle layout.

``generate_dataset(out, "demo")`` writes ``train.csv``, ``train/caseN/caseN_dayD/scans/*.png``
(16-bit), a ``test/`` tree of other cases, ``sample_submission.csv``, the hidden answers
``test_labels.csv``, ``dataset.json`` and ``preview.png``. Every day-volume is seeded from
``(seed, case, day)``, so the bytes do not depend on the number of workers. The anatomy lives
in :mod:`pipeline.phantoms.uwmgi_anatomy`, the image model in :mod:`pipeline.phantoms.uwmgi_render`.
``subset_dataset`` writes a fraction of a generated set's cases (images hard-linked, smaller
fractions nested in larger ones): the scales of ``make bench-scale``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.datasets.uwmgi_files import (
    CLASSES,
    decode_masks,
    load_split,
    make_id,
    read_labels,
    scan_split,
    slice_filename,
)
from pipeline.io import write_csv, write_json, write_with
from pipeline.phantoms import uwmgi_anatomy as phantom
from pipeline.phantoms import uwmgi_pose
from pipeline.phantoms.common import (
    SyntheticDataError,
    preset_spec,
    resolve_preset,
    run_jobs,
    write_dataset_folder,
)
from pipeline.phantoms.uwmgi_render import render_day
from pipeline.rle import rle_encode_numpy  # the NumPy twin: no JIT start-up in every worker

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# (width, height, pixel spacing) of the real scans; a case keeps its size on every day
SIZES = ((266, 266, 1.50), (360, 310, 1.50), (276, 276, 1.63), (234, 234, 1.50))
SIZE_PATTERN = (0, 1, 2, 0, 3, 1, 0, 2, 0, 1)  # 40% 266, 30% 360x310, 20% 276, 10% 234
BODY_FRACTION = {0: (0.62, 0.86), 1: (0.58, 0.78), 2: (0.60, 0.86), 3: (0.74, 0.88)}  # body width / frame
MIN_LABEL_PX = 30  # annotators leave slivers unlabelled (real masks start around 40 px)
SHORT_SIZE = 2  # 276x276 scans have the shorter volumes (80 slices instead of 144)
BOWEL = (CLASSES.index("large_bowel"), CLASSES.index("small_bowel"))


@dataclass(frozen=True)
class Preset:
    """How much data to generate. ``slices`` = (per day-volume, for 276x276 cases)."""

    name: str
    train_cases: int
    test_cases: int
    days: tuple[int, ...]  # a case's day count is drawn from these
    test_days: tuple[int, ...]
    slices: tuple[int, int]
    truncate_share: float = 0.15  # day-volumes whose bowel labels stop before the organs do


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 3, 1, (2,), (1,), (12, 10)),
    "demo": Preset("demo", 10, 4, (2, 3), (2,), (40, 32)),
    "full": Preset("full", 85, 50, (1, 2, 3, 4, 4, 5), (1, 2, 3, 4, 4, 5), (144, 80)),
}


@dataclass(frozen=True)
class VolumeJob:
    root: str
    split: str
    case: int
    day: int
    size: int  # index into SIZES
    n_slices: int
    seed: int
    truncate_share: float


def plan_volumes(preset: Preset, seed: int) -> list[VolumeJob]:
    """Case numbers, days, sizes and slice counts of every day-volume (train first, then test)."""
    rng = np.random.default_rng([seed, 7919])
    n_cases = preset.train_cases + preset.test_cases
    numbers = rng.choice(np.arange(1, max(160, 2 * n_cases) + 1), n_cases, replace=False)
    jobs = []
    splits: tuple[tuple[str, list[int], tuple[int, ...]], ...] = (
        ("train", sorted(numbers[: preset.train_cases]), preset.days),
        ("test", sorted(numbers[preset.train_cases :]), preset.test_days),
    )
    for split, cases, day_choices in splits:
        offset = 0 if split == "train" else 4
        for i, case in enumerate(cases):
            size = SIZE_PATTERN[(i + offset) % len(SIZE_PATTERN)]
            n_days = int(rng.choice(np.asarray(day_choices)))
            first = int(
                rng.choice(np.array([0, rng.integers(1, 20)]))
            )  # real day numbers: day0, day13, day15...
            days = first + np.concatenate([[0], np.cumsum(rng.integers(1, 6, n_days - 1))])
            n_slices = preset.slices[1] if size == SHORT_SIZE else preset.slices[0]
            jobs += [
                VolumeJob("", split, int(case), int(d), size, n_slices, seed, preset.truncate_share)
                for d in days
            ]
    return jobs


def case_setup(seed: int, case: int, size: int) -> dict:
    """A case's anatomy, frame placement, contrast and intensity scale (shared by all its days)."""
    rng = np.random.default_rng([seed, case])
    width, height, spacing = SIZES[size]
    frac = rng.uniform(*BODY_FRACTION[size])
    aspect = rng.uniform(0.58, 0.75)
    body_half = frac * width / 2 * spacing  # mm, cavity plus walls (about 30 mm at k = 1)
    anatomy = phantom.make_anatomy(rng, body_half / 1.25, aspect)
    centre = (width / 2 + rng.normal(0, 0.02 * width), height / 2 + rng.normal(-0.04, 0.02) * height)
    return {
        "anatomy": anatomy,
        "shape": (height, width),
        "spacing": spacing,
        "centre_px": centre,
        "contrast": uwmgi_pose.case_contrast(rng),
        "peak": float(np.exp(rng.uniform(np.log(800), np.log(16000)))),
    }


def render_volume(job: VolumeJob) -> tuple[np.ndarray, np.ndarray, bool]:
    """Image (S, H, W) uint16, labels (S, 3, H, W) uint8 and whether the bowel labels were cut short."""
    setup = case_setup(job.seed, job.case, job.size)
    rng = np.random.default_rng([job.seed, job.case, job.day])
    day = uwmgi_pose.make_day(
        setup["anatomy"],
        rng,
        setup["shape"],
        setup["spacing"],
        setup["centre_px"],
        setup["contrast"],
        setup["peak"],
        job.n_slices,
    )
    image, labels = render_day(day, rng)
    labels[labels.sum(axis=(2, 3), dtype=np.int64) < MIN_LABEL_PX] = 0
    bowel = np.flatnonzero(labels[:, list(BOWEL)].any(axis=(1, 2, 3)))
    truncated = bool(rng.random() < job.truncate_share and len(bowel) > 2)
    if truncated:
        cut = int(rng.integers(max(1, job.n_slices // 40), max(2, job.n_slices // 14) + 1))
        labels[bowel[-1] - cut + 1 :, list(BOWEL)] = 0
    return image, labels, truncated


def write_volume(job: VolumeJob) -> tuple[list[tuple[str, str, str]], str | None]:
    """Render one day-volume, write its PNGs; return its label rows and its name if truncated."""
    image, labels, truncated = render_volume(job)
    width, height, spacing = SIZES[job.size]
    folder = Path(job.root) / job.split / f"case{job.case}" / f"case{job.case}_day{job.day}" / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(len(image)):
        if not cv2.imwrite(str(folder / slice_filename(s + 1, width, height, spacing, spacing)), image[s]):
            raise OSError(f"could not write a slice into {folder}")
        slice_id = make_id(job.case, job.day, s + 1)
        rows += [(slice_id, name, rle_encode_numpy(labels[s, c])) for c, name in enumerate(CLASSES)]
    return rows, (f"case{job.case}_day{job.day}" if truncated else None)


# --------------------------------------------------------------------------- statistics


def _rle_area(rle: str) -> int:
    return sum(map(int, rle.split()[1::2])) if rle else 0


def label_stats(labels: pd.DataFrame, pixels: pd.Series) -> dict:
    """Empty-slice share and per-class coverage of one split's labels (``pixels``: id -> H*W)."""
    area = labels.assign(area=labels["segmentation"].map(_rle_area))
    wide = area.pivot(index="id", columns="class", values="area").reindex(columns=list(CLASSES)).fillna(0)
    pct = wide.div(pixels.reindex(wide.index).to_numpy(), axis=0) * 100
    ids = wide.index.to_series()
    out: dict[str, Any] = {
        "cases": int(ids.str.extract(r"^case(\d+)_")[0].nunique()),
        "days": int(ids.str.extract(r"^(case\d+_day\d+)_")[0].nunique()),
        "slices": len(wide),
        "empty_share": round(float((wide.sum(axis=1) == 0).mean()), 4),
    }
    classes: dict[str, dict] = {}
    out["classes"] = classes
    for name in CLASSES:
        nonempty = pct[name][wide[name] > 0]
        classes[name] = {
            "nonempty_share": round(float(len(nonempty) / max(len(wide), 1)), 4),
            "area_pct_mean": round(float(nonempty.mean()), 3) if len(nonempty) else 0.0,
            "area_pct_min": round(float(nonempty.min()), 3) if len(nonempty) else 0.0,
            "area_pct_max": round(float(nonempty.max()), 3) if len(nonempty) else 0.0,
        }
    return out


def dataset_stats(root: Path) -> dict:
    """Label statistics of a dataset on disk (train, and test when ``test_labels.csv`` exists)."""
    root = Path(root)
    stats = {}
    for split, csv in (("train", "train.csv"), ("test", "test_labels.csv")):
        if (root / csv).is_file():
            catalog = scan_split(root, split)
            pixels = pd.Series((catalog["width"] * catalog["height"]).to_numpy(), index=catalog["id"])
            stats[split] = label_stats(read_labels(root / csv), pixels)
    meta = root / "dataset.json"
    if meta.is_file():
        stats["truncated_tail"] = json.loads(meta.read_text()).get("truncated_tail", [])
    return stats


def format_stats(stats: dict) -> str:
    """A few readable lines for the log."""
    lines = []
    for split in ("train", "test"):
        if split not in stats:
            continue
        s = stats[split]
        lines.append(
            f"{split}: {s['cases']} cases, {s['days']} day-volumes, {s['slices']} slices, "
            f"{s['empty_share']:.1%} without any label"
        )
        for name, c in s["classes"].items():
            lines.append(
                f"  {name:<12} on {c['nonempty_share']:.1%} of slices, area % of the slice "
                f"mean {c['area_pct_mean']:.2f} min {c['area_pct_min']:.2f} max {c['area_pct_max']:.2f}"
            )
    if "truncated_tail" in stats:
        lines.append(f"truncated bowel labels in {len(stats['truncated_tail'])} day-volumes")
    return "\n".join(lines)


# --------------------------------------------------------------------------- preview


def save_preview(root: Path, path: Path, n_panels: int = 8) -> Path:
    """A grid of train slices from different cases and depths with the three masks as contours."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    catalog = load_split(root, "train")
    firsts = catalog.groupby("group", sort=True)["volume_id"].first().tolist()
    rest = [d for d in dict.fromkeys(catalog["volume_id"]) if d not in firsts]
    chosen = ((firsts + rest) * n_panels)[:n_panels]
    depths = np.linspace(0.22, 0.72, n_panels)
    colors = ("tab:red", "lime", "cyan")
    cols = min(4, n_panels)
    fig = Figure(figsize=(4 * cols, 4.2 * -(-n_panels // cols)))
    axes = fig.subplots(-(-n_panels // cols), cols, squeeze=False).ravel()
    for ax, volume_id, depth in zip(axes, chosen, depths):
        rows = catalog[catalog["volume_id"] == volume_id].sort_values("slice")
        row = rows.iloc[[int(depth * (len(rows) - 1))]]
        image = cv2.imread(row["path"].iloc[0], cv2.IMREAD_UNCHANGED)
        if image is None:
            raise SyntheticDataError(
                f"{row['path'].iloc[0]}: unreadable PNG; rewrite the phantom with make data"
            )
        image = image.astype(np.float32)
        masks = decode_masks(row)[0]
        ax.imshow(image, cmap="gray", vmin=0, vmax=float(np.percentile(image, 99.5)) or 1.0)
        for c, color in enumerate(colors):
            if masks[c].any():
                ax.contour(masks[c], levels=[0.5], colors=[color], linewidths=0.9)
        ax.set_title(f"{row['id'].iloc[0]}  {row['width'].iloc[0]}x{row['height'].iloc[0]}", fontsize=9)
        ax.axis("off")
    handles = [Line2D([], [], color=c, label=name) for c, name in zip(colors, CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.96, bottom=0.05, wspace=0.03, hspace=0.1)
    return write_with(path, lambda p: fig.savefig(p, format="png", dpi=64))


# --------------------------------------------------------------------------- the dataset


def _spec(preset: Preset, seed: int) -> dict:
    return preset_spec(preset, seed, GENERATOR_VERSION)


def _write_all(tmp: Path, preset: Preset, seed: int, workers: int) -> dict:
    jobs = [dataclasses.replace(job, root=str(tmp)) for job in plan_volumes(preset, seed)]
    rows: dict[str, list] = {"train": [], "test": []}
    truncated = []
    for job, (volume_rows, cut) in zip(jobs, run_jobs(write_volume, jobs, workers, "volumes", "vol")):
        rows[job.split] += volume_rows
        truncated += [cut] if cut else []
    pixels = pd.Series({make_id(j.case, j.day, s + 1): SIZES[j.size][0] * SIZES[j.size][1]
                        for j in jobs for s in range(j.n_slices)})  # fmt: skip
    frames = {split: pd.DataFrame(r, columns=["id", "class", "segmentation"]) for split, r in rows.items()}
    stats: dict[str, Any] = {
        split: label_stats(frame, pixels) for split, frame in frames.items() if len(frame)
    }
    stats["truncated_tail"] = truncated
    write_csv(tmp / "test_labels.csv", frames["test"])
    write_csv(tmp / "sample_submission.csv", frames["test"][["id", "class"]].assign(predicted=""))
    write_csv(tmp / "train.csv", frames["train"])
    save_preview(tmp, tmp / "preview.png")
    counts = {
        split: {k: stats[split][k] for k in ("cases", "days", "slices")} for split in frames if split in stats
    }
    write_json(
        tmp / "dataset.json",
        {"spec": _spec(preset, seed), "counts": counts, "truncated_tail": truncated, "stats": stats},
    )
    return stats


def generate_dataset(
    out_dir: Path | str, preset: str | Preset, seed: int = 0, workers: int = 1, force: bool = False
) -> dict:
    """Write the synthetic GI-tract dataset under ``out_dir`` and return its statistics.

    An ``out_dir`` already holding the same preset and seed is kept as is. One made otherwise is
    replaced only with ``force``; a non-empty folder that is not a synthetic dataset never is.
    """
    preset = resolve_preset(preset, PRESETS)
    return write_dataset_folder(
        out_dir, _spec(preset, seed), lambda tmp: _write_all(tmp, preset, seed, workers), force
    )


# --------------------------------------------------------------------------- nested subsets


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` under ``dst`` (copy where the file system refuses a link)."""
    for folder, _, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, target / name)
            except OSError:
                shutil.copy2(Path(folder) / name, target / name)


def subset_cases(cases: list[int], fraction: float, seed: int) -> list[int]:
    """The first ``round(fraction * len(cases))`` (at least one) cases of a seeded order: nested in ``fraction``."""
    order = np.random.default_rng([seed, 104729]).permutation(sorted(cases))
    return sorted(int(c) for c in order[: max(1, round(fraction * len(cases)))])


def _case_of(ids: pd.Series) -> pd.Series:
    return ids.str.extract(r"^case(\d+)_", expand=False).astype(int)


def subset_dataset(src: Path | str, out: Path | str, fraction: float, seed: int = 0) -> dict:
    """Write a fraction of a generated set's train and test cases under ``out`` (images hard-linked).

    Smaller fractions are subsets of larger ones, so a scale series measures the same volumes.
    ``out`` is rebuilt when ``src`` or ``fraction`` changed; returns the slice counts per split.
    """
    src = Path(src)
    meta_path = src / "dataset.json"
    if not meta_path.is_file():
        raise SyntheticDataError(f"{src} holds no dataset.json: generate it first (`make data PRESET=full`)")
    if not 0 < fraction <= 1:
        raise SyntheticDataError(f"subset fraction must be in (0, 1], got {fraction}")
    base = json.loads(meta_path.read_text())
    spec = {**base["spec"], "subset_of": str(src.resolve()), "fraction": fraction, "subset_seed": seed}

    def write(tmp: Path) -> dict:
        counts = {}
        for split, csvs in (
            ("train", ("train.csv",)),
            ("test", ("test_labels.csv", "sample_submission.csv")),
        ):
            cases = [int(p.name.removeprefix("case")) for p in (src / split).glob("case*") if p.is_dir()]
            keep = subset_cases(cases, fraction, seed) if cases else []
            for case in keep:
                _link_tree(src / split / f"case{case}", tmp / split / f"case{case}")
            for name in csvs:
                frame = pd.read_csv(src / name, dtype=str, keep_default_na=False)
                write_csv(tmp / name, frame[_case_of(frame["id"]).isin(keep).to_numpy()])
            labels = pd.read_csv(tmp / csvs[0], usecols=["id"], dtype=str)
            counts[split] = {"cases": len(keep), "slices": int(labels["id"].nunique())}
        write_json(tmp / "dataset.json", {"spec": spec, "counts": counts, "stats": counts})
        return counts

    return write_dataset_folder(out, spec, write, force=True, what="synthetic subset")
