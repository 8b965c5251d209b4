"""``make bench-scale``: every stage after training, timed at fractions of the ``full`` synthetic set.

The preset's set is generated once (not timed) under ``<root>/<preset>/``; each scale is a nested
subset of its cases (:func:`pipeline.phantoms.uwmgi.subset_dataset`, images hard-linked)
with its own ``data``, ``runs`` and ``cache`` folders (``DATA_DIR``, ``RUNS_DIR``, ``CACHE_DIR``).
The stages run in order, each in a fresh process, so that its wall time and peak resident memory
(the child's own ``VmHWM``) are its own: ``folds``, ``cache`` (the volume cache build), ``oof`` (planted
out-of-fold files of every member x fold, :mod:`pipeline.bench.planted`), ``tune``, ``cv``,
``submit`` (post-processing, RLE and CSV of the test split on planted predictions) and ``score``.

A child reports the seconds of its work after its imports (``work_s``); the growth exponent of a
stage is the least-squares slope of log work seconds (and of log peak memory) against log slices,
train slices for the train-side stages and test slices for ``submit`` and ``score``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline.bench.growth import GIB, TEST_SIDE, checks, growth_table
from pipeline.datasets.uwmgi_files import CLASSES, scan_split
from pipeline.errors import PipelineError
from pipeline.io import write_csv, write_with
from pipeline.paths import PROJECT_ROOT
from pipeline.phantoms.uwmgi import generate_dataset, subset_dataset

log = logging.getLogger(__name__)

STAGES = ("folds", "cache", "oof", "tune", "cv", "submit", "score")
PLANTED = ("cache", "oof", "submit")  # run by pipeline.bench.planted, the others by their own stage module
DEFAULT_SCALES = (0.125, 0.25, 0.5, 1.0)
LOG_TAIL = 3000  # characters of a failed stage's log shown in the error


class BenchError(PipelineError, RuntimeError):
    """A stage failed or the disk cannot hold a scale; the message says which and where its log is."""


@dataclass(frozen=True)
class BenchSettings:
    root: Path = PROJECT_ROOT / "build" / "scale"
    preset: str = "full"
    scales: tuple[float, ...] = DEFAULT_SCALES
    seed: int = 0
    workers: int = 2  # processes generating the preset's set
    n_folds: int = 5
    ensemble: str = "configs/scale_ensemble.yaml"
    tune_set: tuple[str, ...] = ()  # overrides of the ensemble config for tune and cv
    keep: bool = False  # keep each scale's runs and cache (else removed once measured)
    disk_check: bool = True


@dataclass(frozen=True)
class ScaleDirs:
    """One scale's folders: ``<root>/<preset>-<fraction>/{data,runs,cache,logs}``."""

    base: Path

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def runs(self) -> Path:
        return self.base / "runs"

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def submission(self) -> Path:
        return self.base / "submission.csv"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATA_DIR": str(self.data),
            "RUNS_DIR": str(self.runs),
            "CACHE_DIR": str(self.cache),
            "DATASET": "uwmgi",
            "PYTHONUNBUFFERED": "1",
        }


@dataclass
class BenchResult:
    runs: pd.DataFrame  # stage x scale: n_slices, wall_s, work_s, plant_s, peak_gib
    growth: pd.DataFrame  # per stage: exponents, seconds and GiB at 1x
    disk: pd.DataFrame  # per scale: slices, largest volume, scores, GiB of data, caches and OOF
    checks: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data and disk


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under ``path`` (0 when absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum((Path(d) / f).stat().st_size for d, _, files in os.walk(path) for f in files)


def disk_use(dirs: ScaleDirs) -> dict[str, float]:
    """GiB of a scale's data (hard links to the generated set), volume cache, OOF files and decoded OOF cache."""
    oof_npz = sum(tree_bytes(p) for p in dirs.runs.glob("seg/*/fold_*/oof"))
    oof_npy = tree_bytes(dirs.cache / "oof")
    return {
        "data_gib": tree_bytes(dirs.data) / GIB,
        "volume_cache_gib": (tree_bytes(dirs.cache) - oof_npy) / GIB,
        "oof_npz_gib": oof_npz / GIB,
        "oof_npy_gib": oof_npy / GIB,
        "submission_gib": tree_bytes(dirs.submission) / GIB,
    }


def scores(dirs: ScaleDirs, ensemble: str) -> dict[str, float]:
    """The tuned OOF score (``postprocess.json``) and the submission's score (last line of the score log)."""
    decisions = dirs.runs / "ensemble" / ensemble / "postprocess.json"
    oof = json.loads(decisions.read_text())["oof"]["score"] if decisions.is_file() else float("nan")
    lines = (
        (dirs.logs / "score.log").read_text().strip().splitlines()
        if (dirs.logs / "score.log").is_file()
        else []
    )
    test = json.loads(lines[-1])["score"] if lines and lines[-1].startswith("{") else float("nan")
    return {"oof_score": oof, "test_score": test}


def expected_bytes(data: Path, n_members: int, n_classes: int) -> int:
    """What a scale writes: uint16 images + uint8 masks cached, each member's OOF decoded (+10% for the npz)."""
    catalog = scan_split(data, "train")
    pixels = int((catalog["height"] * catalog["width"]).sum())
    return int(pixels * (2 + n_classes + 1.1 * n_members * n_classes))


def split_size(data: Path, split: str) -> dict[str, float]:
    """Slices, millions of voxels, and millions of voxels in the largest volume (what a stage streaming
    volume by volume holds at once) of one split."""
    catalog = scan_split(data, split)
    if catalog.empty:
        return {"slices": 0, "mvox": 0.0, "largest_mvox": 0.0}
    voxels = (catalog["height"] * catalog["width"]).groupby(catalog["volume_id"]).sum()
    return {
        "slices": len(catalog),
        "mvox": float(voxels.sum()) / 1e6,
        "largest_mvox": float(voxels.max()) / 1e6,
    }


def check_disk(dirs: ScaleDirs, n_members: int, n_classes: int) -> None:
    need = expected_bytes(dirs.data, n_members, n_classes)
    free = shutil.disk_usage(dirs.base).free
    if need > free - 2 * GIB:
        raise BenchError(
            f"{dirs.base} needs up to {need / GIB:.1f} GiB (volume cache + OOF of {n_members} members) but "
            f"{free / GIB:.1f} GiB are free; free some space, or pass --no-disk-check to try anyway"
        )


def prepare_base(settings: BenchSettings) -> Path:
    """The preset's generated set under ``<root>/<preset>`` (generated when absent; kept when it matches)."""
    base = settings.root / settings.preset
    start = time.perf_counter()
    generate_dataset(base, settings.preset, seed=settings.seed, workers=settings.workers, force=True)
    log.info(
        "data: %s (%s preset) ready in %.0f s (not timed)", base, settings.preset, time.perf_counter() - start
    )
    return base


def prepare_scale(base: Path, settings: BenchSettings, fraction: float) -> ScaleDirs:
    """A scale's folders, its subset of the generated set written, its runs and caches emptied."""
    dirs = ScaleDirs(settings.root / f"{settings.preset}-{fraction:g}")
    subset_dataset(base, dirs.data, fraction, settings.seed)
    for folder in (dirs.runs, dirs.cache):
        shutil.rmtree(folder, ignore_errors=True)  # every stage starts cold
    dirs.submission.unlink(missing_ok=True)
    dirs.logs.mkdir(parents=True, exist_ok=True)
    return dirs


# --------------------------------------------------------------------------- running the stages


def stage_args(stage: str, dirs: ScaleDirs, settings: BenchSettings) -> list[str]:
    """The command-line arguments of one stage at one scale."""
    tune_set = ["--set", *settings.tune_set] if settings.tune_set else []
    return {
        "folds": ["--config", "configs/folds.yaml", "--set", f"n_folds={settings.n_folds}", "--force"],
        "cache": [],
        "oof": ["--config", settings.ensemble],
        "tune": ["--config", settings.ensemble, *tune_set],
        "cv": ["--config", settings.ensemble, *tune_set],
        "submit": ["--config", settings.ensemble, "--out", str(dirs.submission)],
        "score": ["--dataset", "uwmgi", "--submission", str(dirs.submission), "--truth",
                  str(dirs.data / "test_labels.csv"), "--data-dir", str(dirs.data)],
    }[stage]  # fmt: skip


def peak_rss_gib() -> float:
    """This process's own peak resident memory (``VmHWM``), in GiB.

    Not ``getrusage``: a child's ``ru_maxrss`` starts from its parent's resident size at the fork,
    so it would charge the bench's own memory to every stage.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    import resource  # not Linux: the rusage figure (an upper bound)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def run_child(command: list[str], env: dict[str, str], log_path: Path) -> tuple[float, int]:
    """Run ``command`` to its end with its output in ``log_path``; (wall seconds, exit status)."""
    with open(log_path, "w") as log_file:
        start = time.perf_counter()
        status = subprocess.run(command, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return time.perf_counter() - start, status.returncode


def run_stage(stage: str, dirs: ScaleDirs, settings: BenchSettings) -> dict:
    """One stage in a fresh process (``python -m stages.bench_scale stage ...``); its figures."""
    timing = dirs.logs / f"{stage}.json"
    timing.unlink(missing_ok=True)
    command = [sys.executable, "-m", "stages.bench_scale", "stage", stage, "--timing", str(timing),
               *stage_args(stage, dirs, settings)]  # fmt: skip
    log_path = dirs.logs / f"{stage}.log"
    wall, status = run_child(command, dirs.env(), log_path)
    if status != 0 or not timing.is_file():
        tail = log_path.read_text(errors="replace")[-LOG_TAIL:]
        raise BenchError(f"stage {stage} failed (exit {status}) in {dirs.base}; log {log_path}:\n{tail}")
    inner = json.loads(timing.read_text())
    return {
        "wall_s": wall,
        "work_s": inner["work_s"],
        "plant_s": inner.get("plant_s", 0.0),
        "peak_gib": inner["peak_gib"],
    }


def run_bench(settings: BenchSettings, progress: bool = True) -> BenchResult:
    """Every stage at every scale, smallest first; the tables of :class:`BenchResult`."""
    from pipeline.datasets import load_config

    cfg = load_config(settings.ensemble, list(settings.tune_set), stage="ensemble")
    n_classes = len(CLASSES)  # the bench runs on the UW-Madison phantom (ScaleDirs.env)
    base = prepare_base(settings)
    full = {split: split_size(base, split) for split in ("train", "test")}
    runs, disk = [], []
    bar = tqdm(
        total=len(settings.scales) * len(STAGES), desc="bench-scale", unit="stage", disable=not progress
    )
    for fraction in sorted(settings.scales):
        dirs = prepare_scale(base, settings, fraction)
        size = {split: split_size(dirs.data, split) for split in ("train", "test")}
        if settings.disk_check:
            check_disk(dirs, len(cfg.members), n_classes)
        for stage in STAGES:
            bar.set_postfix_str(f"{fraction:g} {stage}")
            n = size["test" if stage in TEST_SIDE else "train"]
            figures = run_stage(stage, dirs, settings)
            runs.append(
                {"stage": stage, "scale": fraction, "n_slices": n["slices"], "n_mvox": n["mvox"], **figures}
            )
            log.info("%-6s x%-6g %6d slices: %8.1f s, peak %.2f GiB", stage, fraction, n["slices"],
                     figures["work_s"], figures["peak_gib"])  # fmt: skip
            bar.update()
        disk.append(
            {"scale": fraction, **{f"{split}_{k}": v for split, d in size.items() for k, v in d.items()},
             **scores(dirs, cfg.name), **disk_use(dirs)}
        )  # fmt: skip
        if not settings.keep:
            for folder in (dirs.runs, dirs.cache):
                shutil.rmtree(folder, ignore_errors=True)
    bar.close()
    table = pd.DataFrame(runs)
    growth = growth_table(table, full)
    return BenchResult(table, growth, pd.DataFrame(disk), checks(table, growth))


# --------------------------------------------------------------------------- output


def format_result(result: BenchResult) -> str:
    """The scale table (stage x scale: seconds and peak GiB), the exponents and the disk use."""
    runs = result.runs.assign(
        cell=lambda f: [f"{s:8.1f} s {g:5.2f} GiB" for s, g in zip(f["work_s"], f["peak_gib"])]
    )
    wide = runs.pivot(index="stage", columns="scale", values="cell").reindex(
        list(dict.fromkeys(runs["stage"]))
    )
    wide.columns = [f"x{c:g}" for c in wide.columns]
    growth = result.growth.set_index("stage")
    wide["time ~ n^a"] = growth["time_exponent"].map("{:.2f}".format)
    wide["~ voxels^a"] = growth["time_exponent_voxels"].map("{:.2f}".format)
    wide["RSS ~ n^b"] = growth["rss_exponent"].map("{:.2f}".format)
    wide["1x s"] = growth["full_s"].map("{:.0f}".format)
    wide["1x GiB"] = growth["full_gib"].map("{:.2f}".format)
    with pd.option_context(
        "display.width", 250, "display.max_columns", 20, "display.float_format", "{:.2f}".format
    ):
        return "\n".join(
            [
                "work seconds (after imports) and peak RSS per stage and scale; 1x: measured at scale 1, else the",
                "largest scale's figure times (voxels at 1x / voxels)^a, a at least 1 for time and 0 for memory:",
                wide.to_string(),
                "",
                "per scale: slices, M voxels, largest volume (M voxels), OOF and test scores of the planted "
                "predictions, disk use (GiB):",
                result.disk.to_string(index=False),
                "",
                *result.checks,
            ]
        )


def plot_result(path: Path, result: BenchResult) -> Path:
    """Log-log work seconds and peak RSS against slices, one line per stage."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for stage, group in result.runs.groupby("stage", sort=False):
        for ax, column in zip(axes, ("work_s", "peak_gib")):
            ax.plot(group["n_slices"], group[column], "-o", markersize=4, label=stage)
    for ax, title in zip(axes, ("work seconds", "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("slices (train; test for submit and score)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return write_with(path, lambda p: fig.savefig(p, format="png", dpi=100))


def write_result(out: Path, result: BenchResult) -> list[Path]:
    """``scale_runs.csv``, ``scale_growth.csv``, ``scale_disk.csv``, ``scale_table.txt`` and ``scale.png``."""
    out = Path(out)
    return [
        write_csv(out / "scale_runs.csv", result.runs),
        write_csv(out / "scale_growth.csv", result.growth),
        write_csv(out / "scale_disk.csv", result.disk),
        write_with(out / "scale_table.txt", lambda p: Path(p).write_text(format_result(result) + "\n")),
        plot_result(out / "scale.png", result),
    ]
