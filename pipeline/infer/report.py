"""``make cv``: the tuned ensemble's out-of-fold score, per class and per step, and its figures.

Reads ``postprocess.json`` (the decisions and the search curves of ``make tune``), applies the
decisions to the OOF once more (so the table is measured, not copied), and writes into
``runs/ensemble/<cfg>/report/``: ``cv_table.csv`` (per class and overall), ``cv_steps.csv``
(score and gain of each tuning step), ``pixel_threshold.png``, ``gate_threshold.png`` and
``min_component_size.png`` (OOF score against each value, one line per class) and
``overlays.png`` (prediction and truth contours on OOF slices from worst to best).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import CLASSES, EnsembleConfig
from pipeline.data.geometry import normalize
from pipeline.infer.ensemble import OOFSet, load_oof
from pipeline.infer.postprocess import Decisions, apply_postprocess, read_decisions
from pipeline.infer.tune import default_workers
from pipeline.io import write_csv, write_with
from pipeline.metric import aggregate, volume_stats
from pipeline.paths import run_dir

log = logging.getLogger(__name__)

COLORS = {"large_bowel": "#e6550d", "small_bowel": "#31a354", "stomach": "#3182bd"}
FIELD_TITLES = {
    "pixel_threshold": "pixel threshold",
    "gate_threshold": "classifier gate threshold",
    "min_component_size": "minimum 3D component size (voxels)",
}


@dataclass
class Report:
    dir: Path
    table: pd.DataFrame  # per class + "all"
    steps: pd.DataFrame
    score: float

    def format(self) -> str:
        with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
            return (
                f"OOF score {self.score:.4f}\n\nper class:\n{self.table.to_string(index=False)}\n\n"
                f"steps:\n{self.steps.to_string(index=False)}\n\nfigures and tables in {self.dir}"
            )


def _day_masks(oof: OOFSet, day: str, decisions: Decisions, names: list[str]) -> np.ndarray:
    weights = np.array([decisions.weights[n] for n in names])
    return apply_postprocess(oof.blend(day, weights), oof.gate(day), decisions.classes)


def _slice_dice(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean Dice over the (slice, class) rows not empty in both, per slice; NaN for empty slices."""
    p = mask.reshape(*mask.shape[:2], -1)
    t = np.asarray(truth, dtype=bool).reshape(p.shape)
    inter = np.count_nonzero(p & t, axis=2)
    total = np.count_nonzero(p, axis=2) + np.count_nonzero(t, axis=2)
    kept = total > 0
    dice_sum = np.where(kept, 2.0 * inter / np.maximum(total, 1), 0.0).sum(axis=1)
    n_kept = kept.sum(axis=1)
    return np.where(n_kept > 0, dice_sum / np.maximum(n_kept, 1), np.nan)


def measure(
    oof: OOFSet, decisions: Decisions, workers: int, progress: bool = True
) -> tuple[dict, pd.DataFrame]:
    """(score dict with per-class Hausdorff, per-slice Dice table) of the decisions on the OOF."""
    names = [m.name for m in oof.members]

    def one(day: str):
        truth = np.asarray(oof.truth_mask(day))
        mask = _day_masks(oof, day, decisions, names)
        return volume_stats(mask, truth, per_class=True), _slice_dice(mask, truth)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = list(
            tqdm(pool.map(one, oof.days), total=len(oof.days), desc="cv", unit="day", disable=not progress)
        )
    slices = pd.DataFrame(
        [(day, s, d) for day, (_, dice) in zip(oof.days, out) for s, d in enumerate(dice) if np.isfinite(d)],
        columns=["case_day", "slice_index", "dice"],
    )
    return aggregate([stats for stats, _ in out]), slices


def cv_tables(result: dict, decisions: Decisions) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for cls in CLASSES:
        pc = result["per_class"][cls]
        rows.append(
            {
                "class": cls,
                "dice": pc["dice"],
                "hausdorff": pc["hausdorff"],
                "score": pc["score"],
                **asdict(decisions.classes[cls]),
            }
        )
    rows.append(
        {"class": "all", "dice": result["dice"], "hausdorff": result["hausdorff"], "score": result["score"]}
    )
    table = pd.DataFrame(rows)
    steps = pd.DataFrame(
        [
            {k: s.get(k) for k in ("step", "label", "score", "dice", "hausdorff", "gain")}
            for s in decisions.steps
        ]
    )
    if not steps.empty:
        steps["gain"] = steps["score"].diff()
        steps["note"] = [s.get("skipped", "") for s in decisions.steps]
    return table, steps


# --------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> Path:
    return write_with(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def plot_curves(path: Path, field: str, curves: dict, raw_score: float | None) -> Path:
    """OOF score against one post-processing value, one line per class, the chosen value starred."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for cls in CLASSES:
        if cls not in curves:
            continue
        c = curves[cls]
        ax.plot(c["values"], c["score"], "-o", color=COLORS[cls], label=cls, markersize=4)
        i = int(np.argmin(np.abs(np.asarray(c["values"], float) - c["chosen"])))
        ax.plot([c["values"][i]], [c["score"][i]], "*", color=COLORS[cls], markersize=14, markeredgecolor="k")
    if raw_score is not None:
        ax.axhline(raw_score, color="0.5", linestyle=":", label="raw (threshold 0.5)")
    ax.set_xlabel(FIELD_TITLES.get(field, field))
    ax.set_ylabel("OOF score (0.4 Dice + 0.6 (1 - HD))")
    ax.set_title(f"{FIELD_TITLES.get(field, field)}: class by class, others held (star: chosen)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pick_slices(slices: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` slices with an organ in truth or prediction, spread from the worst Dice to the best."""
    if slices.empty or n <= 0:
        return slices.iloc[:0]
    ranked = slices.sort_values(["dice", "case_day", "slice_index"], kind="stable").reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(ranked) - 1, num=min(n, len(ranked))).round().astype(int))
    return ranked.iloc[picks]


def plot_overlays(path: Path, oof: OOFSet, decisions: Decisions, picks: pd.DataFrame) -> Path:
    """Image with truth (solid) and prediction (dashed) contours per class, one panel per slice."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = [m.name for m in oof.members]
    n = max(1, len(picks))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 4.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    masks_by_day: dict[str, np.ndarray] = {}
    for ax, row in zip(axes, picks.itertuples(index=False)):
        if row.case_day not in masks_by_day:
            masks_by_day = {row.case_day: _day_masks(oof, row.case_day, decisions, names)}
        s = int(row.slice_index)
        volume = oof.truth[row.case_day]
        ax.imshow(normalize(volume.image[s]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for c, cls in enumerate(CLASSES):
            truth, pred = np.asarray(volume.mask[s, c]), masks_by_day[row.case_day][s, c]
            if truth.any():
                ax.contour(truth, levels=[0.5], colors=[COLORS[cls]], linewidths=1.6)
            if pred.any():
                ax.contour(
                    pred.astype(np.uint8), levels=[0.5], colors=[COLORS[cls]], linewidths=1.6, linestyles="--"
                )
        ax.set_title(f"{volume.ids[s]}  Dice {row.dice:.2f}", fontsize=9)
        ax.set_axis_off()
    for ax in axes[len(picks) :]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=COLORS[c], label=c) for c in CLASSES]
    handles += [
        Line2D([], [], color="k", label="truth"),
        Line2D([], [], color="k", linestyle="--", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.suptitle("OOF predictions (dashed) vs truth (solid), worst to best slice Dice", fontsize=11)
    return _save(fig, path)


def run_report(
    cfg: EnsembleConfig, root: Path, *, workers: int | None = None, progress: bool = True
) -> Report:
    """Measure the tuned ensemble on its OOF and write the tables and figures of ``make cv``."""
    decisions = read_decisions(cfg.name)
    oof = load_oof(cfg, root, progress)
    tuned = [m["config"] for m in decisions.members]
    if sorted(tuned) != sorted(m.name for m in oof.members):
        raise ValueError(
            f"postprocess.json was tuned for {tuned}; rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )
    result, slices = measure(oof, decisions, workers or default_workers(), progress)
    expected = decisions.oof.get("score")
    if expected is not None and abs(expected - result["score"]) > 1e-6:
        log.warning(
            "OOF score %.5f differs from the tuned %.5f: the OOF files changed since `make tune`",
            result["score"],
            expected,
        )
    out = run_dir("ensemble", cfg.name) / "report"
    table, steps = cv_tables(result, decisions)
    write_csv(out / "cv_table.csv", table)
    write_csv(out / "cv_steps.csv", steps)
    raw = decisions.steps[0]["score"] if decisions.steps else None
    for field in FIELD_TITLES:
        if decisions.curves.get(field):
            plot_curves(out / f"{field}.png", field, decisions.curves[field], raw)
        else:
            log.info(
                "no %s curve (%s): no figure",
                field,
                "no classifier" if field == "gate_threshold" else "not tuned",
            )
    plot_overlays(out / "overlays.png", oof, decisions, pick_slices(slices, cfg.report_slices))
    return Report(out, table, steps, result["score"])
