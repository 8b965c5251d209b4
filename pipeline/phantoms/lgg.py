"""A synthetic phantom of the Kaggle LGG brain MRI dataset (mateuszbuda/lgg-mri-segmentation).

``generate_lgg(out, "demo")`` writes, like the real download, ``kaggle_3m/<VOL>/<VOL>_<k>.tif``
(256x256 RGB uint8: pre-contrast, FLAIR, post-contrast) with ``<VOL>_<k>_mask.tif`` (uint8 0/255)
and ``kaggle_3m/data.csv`` (one row per patient, clinical and genomic cluster codes); held-out
patients go to ``test/<VOL>/`` without masks, their answers to ``test_labels.csv`` (``id``,
row-major RLE). ``<VOL>`` is ``TCGA_<inst>_<pid>_<YYYYMMDD>``; ``k`` counts from 1 and must be
sorted as a number (``_10`` sorts before ``_2`` as text). Each patient is seeded from
``(seed, patient index)``, so the bytes do not depend on the number of workers.

The head is an ellipsoid that fills most of the frame, with scalp, a two-table skull, CSF, grey
and white matter (smooth noise folds the cortex), sulci, deep grey nuclei and two lateral
ventricles; slices shrink towards the ends of the stack. The tumour is a lobed, wobbly union of
ellipsoids, as large and irregular as the real ones (``stages.data_stats`` compares them): brighter
than the brain in FLAIR by a patient-level factor that is often faint, slightly dark before
contrast, a faint enhancing rim after. The images are as dark as the real ones, with a per-patient,
per-sequence scale, a bias field and Rician noise; as in the real data, a missing sequence is
sometimes replaced by FLAIR, and some patients' pre-contrast comes on a grey background.
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

from pipeline.io import write_csv, write_json, write_with
from pipeline.phantoms.common import preset_spec, resolve_preset, run_jobs, write_dataset_folder
from pipeline.phantoms.lgg_anatomy import (
    GREY,
    WHITE,
    anatomy,
    smooth_noise,
    tumour,
    tumour_axes,
    tumour_lobes,
)
from pipeline.rle import rle_encode_numpy

__all__ = [
    "PRESETS",
    "PatientJob",
    "Preset",
    "format_stats",
    "generate_lgg",
    "plan_patients",
    "render_patient",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: calibrated to the real dev set (sizes, shapes, contrast, head, intensities)
CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")
INSTITUTION_WEIGHTS = (0.15, 0.45, 0.05, 0.15, 0.20)  # about the real mix of the 110 patients
FILLED_SHARE = 0.08  # per missing-able sequence: replaced by FLAIR, as in the real data
GREY_SHARE = 0.67  # FG patients whose pre-contrast comes on a grey background (2 of 3 in the real set)
# (pre-contrast, FLAIR, post-contrast) intensity of each tissue code on a 0..1 scale
# (real slices are dark: the brain near 50 of 255, the scalp near 160-250)
CONTRAST = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.80, 0.62, 0.78],
        [0.04, 0.04, 0.05],
        [0.07, 0.05, 0.09],
        [0.19, 0.23, 0.21],
        [0.25, 0.18, 0.26],
    ],
    np.float32,
)
TUMOUR_T1 = (0.7, 0.95)  # tumour / grey matter before and after contrast (T1-dark)
FLAIR_RATIO = (0.85, 1.85)  # tumour FLAIR / grey matter FLAIR, per patient: often faint
RIM = np.array([0.0, 0.0, 0.06], np.float32)  # faint enhancing rim after contrast
# data.csv: column -> (lowest code, highest code, blank share); age is drawn apart
CLINICAL = {
    "RNASeqCluster": (1, 4, 0.12), "MethylationCluster": (1, 5, 0.01), "miRNACluster": (1, 4, 0.0),
    "CNCluster": (1, 3, 0.01), "RPPACluster": (1, 4, 0.30), "OncosignCluster": (1, 3, 0.05),
    "COCCluster": (1, 3, 0.0), "histological_type": (1, 3, 0.01), "neoplasm_histologic_grade": (1, 2, 0.01),
    "tumor_tissue_site": (1, 1, 0.01), "laterality": (1, 3, 0.01), "tumor_location": (1, 6, 0.01),
    "gender": (1, 2, 0.01), "age_at_initial_pathologic": (0, 0, 0.01), "race": (1, 3, 0.02),
    "ethnicity": (1, 2, 0.07), "death01": (0, 1, 0.01),
}  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """How much data to generate: patients per split, slices per patient (``skew`` > 1 favours short)."""

    name: str
    train_patients: int
    test_patients: int
    slices: tuple[int, int]
    size: int = 256
    skew: float = 1.0
    small_tumour_share: float = 0.1


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 4, 2, (6, 10), size=64),
    # 12 test patients: a per-patient mean over 6 is one patient's luck
    "demo": Preset("demo", 24, 12, (20, 36)),
    "full": Preset("full", 90, 20, (20, 88), skew=3.3),  # about 3,900 slices, as in the real set
}


@dataclass(frozen=True)
class PatientJob:
    root: str
    split: str
    index: int  # draw order: seeds the patient
    volume: str  # TCGA_<inst>_<pid>_<date>
    n_slices: int
    size: int
    seed: int
    small_tumour_share: float

    @property
    def patient(self) -> str:
        return self.volume.rsplit("_", 1)[0]


def _patient_ids(rng: np.random.Generator, n: int) -> list[str]:
    alnum = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    ids: list[str] = []
    while len(ids) < n:
        inst = rng.choice(INSTITUTIONS, p=INSTITUTION_WEIGHTS)
        pid = f"{rng.integers(4900, 8600)}" if rng.random() < 0.8 else "A" + "".join(rng.choice(alnum, 3))
        if f"TCGA_{inst}_{pid}" not in ids:
            ids.append(f"TCGA_{inst}_{pid}")
    return ids


def plan_patients(preset: Preset, seed: int) -> list[PatientJob]:
    """Names and slice counts of every patient, train then test, each split ordered by volume name."""
    rng = np.random.default_rng([seed, 7919])
    n = preset.train_patients + preset.test_patients
    lo, hi = preset.slices
    jobs = []
    for index, patient in enumerate(_patient_ids(rng, n)):
        date = np.datetime64("1995-01-01") + rng.integers(0, 11 * 365)
        n_slices = lo + round((hi - lo) * rng.random() ** preset.skew)
        split = "train" if index < preset.train_patients else "test"
        volume = f"{patient}_{str(date).replace('-', '')}"
        jobs.append(
            PatientJob("", split, index, volume, n_slices, preset.size, seed, preset.small_tumour_share)
        )
    return sorted(jobs, key=lambda j: (j.split != "train", j.volume))


def patient_setup(job: PatientJob) -> dict:
    """The patient's head placement, contrast, tumour and scanner settings (scalars only: cheap)."""
    rng = np.random.default_rng([job.seed, job.index])
    small = bool(rng.random() < job.small_tumour_share)
    extent = tumour_axes(rng, small)
    side = rng.choice([-1.0, 1.0])
    centre = (side * rng.uniform(0.12, 0.38), rng.uniform(-0.45, 0.35), rng.uniform(-0.3, 0.4))
    level = np.exp(rng.normal(0.1, 0.15))  # the whole patient brighter or darker ...
    grey = job.volume.split("_")[1] == "FG" and rng.random() < GREY_SHARE
    return {
        "centre": (0.5 + rng.normal(0, 0.015), 0.5 + rng.normal(0, 0.02)),
        "rotation": float(rng.normal(0, 0.06)),
        "axes": (rng.uniform(0.64, 0.74), rng.uniform(0.80, 0.90)),
        "outline": rng.uniform(0, 2 * np.pi, 2),
        "contrast": CONTRAST * rng.normal(1.0, 0.05, CONTRAST.shape).astype(np.float32),
        "tumour_centre": centre,
        "lobes": tumour_lobes(rng, centre, extent),
        "wobble": float(rng.uniform(0.25, 0.45)),
        "tumour_t1": rng.uniform(*TUMOUR_T1, 2),
        "flair_ratio": float(rng.uniform(*FLAIR_RATIO)),
        "small_tumour": small,
        "scale": (level * np.exp(rng.normal(0, 0.2, 3))).astype(np.float32),  # ... and each sequence
        "bias": rng.normal(0, 0.12, (3, 3)).astype(np.float32),
        "noise": float(rng.uniform(0.002, 0.01)),
        "filled": tuple(bool(x) for x in rng.random(2) < FILLED_SHARE),  # pre, post replaced by FLAIR
        "grey": float(rng.uniform(70, 110)) if grey else 0.0,  # pre-contrast background level, 0 = none
    }


def render_patient(job: PatientJob) -> tuple[np.ndarray, np.ndarray]:
    """Images (S, H, W, 3) uint8 (pre-contrast, FLAIR, post-contrast) and masks (S, H, W) uint8 0/255."""
    setup = patient_setup(job)
    rng = np.random.default_rng([job.seed, job.index, 1])
    shape = (job.n_slices, job.size, job.size)
    tissue, x, y, t = anatomy(setup, rng, shape)
    mask = tumour(setup, rng, x, y, t, np.isin(tissue, (GREY, WHITE)))
    blur = max(0.5, 0.8 * job.size / 256)
    image = setup["contrast"][tissue]  # (S, H, W, 3)
    brain = np.isin(tissue, (GREY, WHITE))[..., None]
    texture = smooth_noise(rng, shape, cell=job.size / 90, z_sigma=0.5)[..., None]
    image *= np.where(brain, 1 + 0.035 * texture, 1)
    soft = np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.5 * blur) for m in mask])[..., None]
    hetero = 1 + 0.12 * smooth_noise(rng, shape, cell=job.size / 30, z_sigma=1.0)[..., None]
    pre, post = setup["tumour_t1"]
    colour = setup["contrast"][GREY] * np.array([pre, setup["flair_ratio"], post], np.float32)
    image = image * (1 - soft) + colour * hetero * soft + RIM * 4 * soft * (1 - soft)
    image = np.stack([cv2.GaussianBlur(im, (0, 0), blur) for im in image])
    bias = setup["bias"]
    field = (
        1
        + bias[:, 0] * x[..., None] * 0.6
        + bias[:, 1] * y[..., None] * 0.6
        + bias[:, 2] * (x * y)[..., None]
    )
    image *= np.clip(field, 0.6, 1.4)[None] * setup["scale"]
    sigma = setup["noise"]
    n1, n2 = (rng.standard_normal(image.shape, dtype=np.float32) * sigma for _ in range(2))
    image = np.sqrt((image + n1) ** 2 + n2**2)  # Rician magnitude noise
    if setup["grey"]:  # the pre-contrast of some real patients: a grey frame, the head lighter on it
        image[..., 0] = setup["grey"] / 255 + 0.6 * image[..., 0]
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    for channel, filled in zip((0, 2), setup["filled"]):
        if filled:
            image[..., channel] = image[..., 1]
    return image, mask.astype(np.uint8) * 255


def write_patient(job: PatientJob) -> dict:
    """Render one patient and write its TIFFs; return its tumour areas and (test) label rows."""
    images, masks = render_patient(job)
    folder = Path(job.root) / ("kaggle_3m" if job.split == "train" else "test") / job.volume
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (image, mask) in enumerate(zip(images, masks), start=1):
        stem = f"{job.volume}_{k}"
        tifffile.imwrite(folder / f"{stem}.tif", image, photometric="rgb", metadata=None)
        if job.split == "train":
            tifffile.imwrite(folder / f"{stem}_mask.tif", mask, photometric="minisblack", metadata=None)
        else:
            rows.append((stem, rle_encode_numpy(mask > 0, order="C")))
    return {"areas": (masks > 0).sum(axis=(1, 2)).tolist(), "rows": rows}


# --------------------------------------------------------------------------- tables, stats, preview


def clinical_table(jobs: list[PatientJob], seed: int) -> pd.DataFrame:
    """data.csv: one row per patient (sorted), numeric cluster and clinical codes, some blanks."""
    rng = np.random.default_rng([seed, 104729])
    rows = []
    for job in sorted(jobs, key=lambda j: j.patient):
        setup = patient_setup(job)
        row: dict = {"Patient": job.patient}
        for column, (lo, hi, blank) in CLINICAL.items():
            value = float(rng.integers(lo, hi + 1))
            if column == "age_at_initial_pathologic":
                value = float(np.clip(round(rng.normal(44, 13)), 20, 75))
            elif column == "laterality":  # 1 left, 2 midline, 3 right (radiological: image left = right)
                value = (
                    2.0
                    if abs(setup["tumour_centre"][0]) < 0.15
                    else (3.0 if setup["tumour_centre"][0] < 0 else 1.0)
                )
            row[column] = np.nan if rng.random() < blank else value
        rows.append(row)
    table = pd.DataFrame(rows)
    whole = [c for c in CLINICAL if table[c].notna().all()]  # like the real file: ints unless blanks
    return table.astype(dict.fromkeys(whole, "int64"))


def split_stats(results: list[dict], jobs: list[PatientJob], size: int) -> dict:
    areas = np.array([a for r in results for a in r["areas"]], dtype=np.int64)
    tumour = areas[areas > 0]
    return {
        "patients": len(jobs),
        "slices": len(areas),
        "tumour_slices": len(tumour),
        "tumour_share": round(float(len(tumour) / max(len(areas), 1)), 4),
        "tumour_area_pct_mean": round(float(tumour.mean() / size**2 * 100), 3) if len(tumour) else 0.0,
        "small_tumour_patients": sum(patient_setup(j)["small_tumour"] for j in jobs),
    }


def format_stats(stats: dict) -> str:
    """A few readable lines for the log."""
    lines = [
        f"{split}: {s['patients']} patients, {s['slices']} slices, tumour on {s['tumour_slices']} "
        f"({s['tumour_share']:.1%}), mean tumour area {s['tumour_area_pct_mean']:.2f}% of the slice"
        for split, s in stats.items()
        if split in ("train", "test")
    ]
    if stats.get("flair_filled"):
        lines.append(f"a sequence replaced by FLAIR in {len(stats['flair_filled'])} patients")
    return "\n".join(lines)


def save_preview(
    root: Path, jobs: list[PatientJob], results: list[dict], path: Path, n_rows: int = 3
) -> Path:
    """Three train patients at their largest tumour slice: each channel and the RGB file, with contours."""
    from matplotlib.figure import Figure

    chosen = [(j, r) for j, r in zip(jobs, results) if j.split == "train" and max(r["areas"], default=0)][
        :n_rows
    ]
    fig = Figure(figsize=(12, 3.1 * max(1, len(chosen))))
    axes = fig.subplots(max(1, len(chosen)), 4, squeeze=False)
    for row, (job, result) in zip(axes, chosen):
        k = int(np.argmax(result["areas"])) + 1
        stem = root / "kaggle_3m" / job.volume / f"{job.volume}_{k}"
        image, mask = tifffile.imread(f"{stem}.tif"), tifffile.imread(f"{stem}_mask.tif")
        for c, ax in enumerate(row):
            ax.imshow(image if c == 3 else image[..., c], cmap=None if c == 3 else "gray", vmin=0, vmax=255)
            ax.contour(mask, levels=[127], colors=["lime" if c == 3 else "tab:red"], linewidths=0.8)
            ax.set_title(f"{job.volume}_{k} {CHANNELS[c] if c < 3 else 'RGB'}", fontsize=8)
            ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01, wspace=0.03, hspace=0.12)
    return write_with(path, lambda p: fig.savefig(p, format="png", dpi=72))


# --------------------------------------------------------------------------- the dataset


def _spec(preset: Preset, seed: int) -> dict:
    return preset_spec(preset, seed, GENERATOR_VERSION, dataset="lgg")


def _write_all(tmp: Path, preset: Preset, seed: int, workers: int) -> dict:
    jobs = [dataclasses.replace(job, root=str(tmp)) for job in plan_patients(preset, seed)]
    results = list(run_jobs(write_patient, jobs, workers, "patients", "patient"))
    stats: dict = {}
    for split in ("train", "test"):
        picked = [(j, r) for j, r in zip(jobs, results) if j.split == split]
        stats[split] = split_stats([r for _, r in picked], [j for j, _ in picked], preset.size)
    stats["flair_filled"] = [j.volume for j in jobs if any(patient_setup(j)["filled"])]
    labels = [row for j, r in zip(jobs, results) if j.split == "test" for row in r["rows"]]
    write_csv(tmp / "test_labels.csv", pd.DataFrame(labels, columns=["id", "segmentation"]))
    write_csv(tmp / "kaggle_3m" / "data.csv", clinical_table(jobs, seed))
    save_preview(tmp, jobs, results, tmp / "preview.png")
    counts = {split: {k: stats[split][k] for k in ("patients", "slices")} for split in ("train", "test")}
    write_json(tmp / "dataset.json", {"spec": _spec(preset, seed), "counts": counts, "stats": stats})
    return stats


def generate_lgg(
    out_dir: Path | str, preset: str | Preset, seed: int = 0, workers: int = 1, force: bool = False
) -> dict:
    """Write the synthetic LGG dataset under ``out_dir`` and return its statistics.

    An ``out_dir`` already holding the same preset and seed is kept as is; one made otherwise is
    replaced only with ``force``; a non-empty folder without ``dataset.json`` never is.
    """
    preset = resolve_preset(preset, PRESETS)
    spec = _spec(preset, seed)
    return write_dataset_folder(
        out_dir, spec, lambda tmp: _write_all(tmp, preset, seed, workers), force, what="synthetic LGG dataset"
    )
