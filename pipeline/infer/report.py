"""``make cv``: the tuned ensemble's out-of-fold score, per class and per step, and its figures.

Reads ``postprocess.json`` (the decisions and the search curves of ``make tune``), applies the
decisions to the OOF once more (so the final score is measured, not copied), and writes into
``runs/ensemble/<cfg>/report/``:

- ``cv_table.csv``: per class and overall, with each class's settings and blend weights;
- ``cv_steps.csv``: every member alone (at the tuned post-processing, weight 1 in every class), then
  each tuning step, with ``score`` (in-sample: chosen and scored on every OOF volume), ``held_out``
  (chosen on the tuning part, scored on the held-apart groups), their ``gain`` and ``held_gain``
  over the previous step, and ``gap = score - held_out``;
- ``<step>.png`` for every post-processing step of :mod:`pipeline.infer.steps` (``pixel_threshold.png``,
  ``gate_threshold.png``, ``prob_gate.png``, ``z_run.png``, ``min_component_size.png``,
  ``component_fraction.png``): OOF score
  against each value, one panel per class;
- ``steps.png``: the in-sample and held-apart score after each step;
- ``overlays.png``: truth filled, prediction outlined, on ``report_slices`` OOF slices from the worst
  slice Dice to the best.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import EnsembleConfig
from pipeline.data.geometry import normalize
from pipeline.datasets.base import DatasetSpec
from pipeline.datasets.common import slice_dice
from pipeline.infer.ensemble import OOFSet, load_oof
from pipeline.infer.evaluate import default_workers, map_volumes, metric_values
from pipeline.infer.postprocess import Decisions, apply_postprocess, read_decisions
from pipeline.infer.step_base import Axis, Step
from pipeline.infer.steps import registry
from pipeline.io import write_csv, write_with
from pipeline.paths import run_dir

log = logging.getLogger(__name__)

PALETTE = ("#e6550d", "#31a354", "#3182bd", "#756bb1", "#de2d26")  # class colours, in class order
STEP_COLUMNS = ("gain", "held_out", "held_gain")


@dataclass
class Report:
    dir: Path
    table: pd.DataFrame  # per class + "all"
    steps: pd.DataFrame
    score: float
    summary: list[str] = field(default_factory=list)  # held-apart and blend-gain lines

    def format(self) -> str:
        with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 200):
            lines = [f"OOF score {self.score:.4f}", *self.summary]
            return "\n".join(lines) + (
                f"\n\nper class:\n{self.table.to_string(index=False)}\n\n"
                f"steps (score: chosen and scored on every OOF volume; held_out: chosen on the tuning part, "
                f"scored on the held-apart groups):\n{self.steps.to_string(index=False)}\n\n"
                f"figures and tables in {self.dir}"
            )


def colors(classes: tuple[str, ...]) -> dict[str, str]:
    return {cls: PALETTE[c % len(PALETTE)] for c, cls in enumerate(classes)}


def volume_masks(oof: OOFSet, volume: str, decisions: Decisions) -> np.ndarray:
    """The masks ``make submit`` would write for an OOF volume: its members blended with the tuned
    weights and post-processed with the tuned steps."""
    weights = decisions.weight_matrix(oof.member_names())
    return apply_postprocess(
        oof.blend(volume, weights), oof.gate(volume), decisions.classes, oof.spec.volumetric
    )


def mean_slice_dice(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(S,) mean Dice over the classes not empty in both, per slice; NaN where every class is empty."""
    dice = slice_dice(mask, truth)
    predicted, present = (np.asarray(a).reshape(*dice.shape, -1).any(axis=2) for a in (mask, truth))
    kept = predicted | present
    n_kept = kept.sum(axis=1)
    return np.where(n_kept > 0, np.where(kept, dice, 0.0).sum(axis=1) / np.maximum(n_kept, 1), np.nan)


def measure(
    oof: OOFSet, decisions: Decisions, workers: int, progress: bool = True
) -> tuple[dict, pd.DataFrame]:
    """(score dict with per-class Hausdorff, per-slice Dice table) of the decisions on the OOF."""

    def one(volume: str) -> tuple[Any, np.ndarray]:
        truth = np.asarray(oof.truth_mask(volume))
        mask = volume_masks(oof, volume, decisions)
        return oof.spec.volume_stats(mask, truth), mean_slice_dice(mask, truth)

    out = map_volumes(one, oof.volumes, workers, "cv", progress)
    slices = pd.DataFrame(
        [(v, s, d) for v, (_, dice) in zip(oof.volumes, out) for s, d in enumerate(dice) if np.isfinite(d)],
        columns=["volume_id", "slice_index", "dice"],
    )
    return oof.spec.aggregate([stats for stats, _ in out]), slices


def cv_tables(result: dict, decisions: Decisions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-class table with settings and blend weights, steps table with in-sample and held-apart scores)."""
    rows = []
    for cls, params in decisions.classes.items():
        weights = {f"w:{m}": w for m, w in decisions.weights.get(cls, {}).items()}
        rows.append({"class": cls, **result["per_class"][cls], **asdict(params), **weights})
    rows.append({"class": "all", **metric_values(result)})
    table = pd.DataFrame(rows).astype(dict.fromkeys(registry().int_fields(), "Int64"))
    keys = ["step", "label", *metric_values(result), *STEP_COLUMNS]
    steps = pd.DataFrame([{k: s.get(k) for k in keys} for s in decisions.steps], columns=keys)
    if not steps.empty:
        steps[list(STEP_COLUMNS)] = steps[list(STEP_COLUMNS)].astype(float)
        steps["gap"] = steps["score"] - steps["held_out"]
        steps["note"] = [s.get("skipped", "") for s in decisions.steps]
    return table, steps


def summary_lines(decisions: Decisions) -> list[str]:
    """What the held-apart estimate and the blend's gain say, in words."""
    out = []
    h = decisions.holdout or {}
    if h.get("held_score") is not None and h.get("folds"):
        out.append(
            f"held apart, cross-fitted: the {len(h.get('groups', []))} groups in {len(h.get('fold_groups', []))} "
            f"folds, each tuned on the others (about {h.get('days_tuning')} volumes) and scored on its own: "
            f"{h['tuning_score']:.4f} on the tuning parts (mean), {h['held_score']:.4f} held apart over all "
            f"{h.get('days_held')} volumes"
        )
    elif h.get("held_score") is not None:
        out.append(
            f"held apart: {len(h.get('groups', []))} groups ({h.get('days_held')} volumes); tuned on the other "
            f"{h.get('days_tuning')}: {h['tuning_score']:.4f} there, {h['held_score']:.4f} on the held-apart ones"
        )
    elif h.get("skipped"):
        out.append(f"no held-apart estimate: {h['skipped']}")
    gain = decisions.oof.blend_gain
    if gain:
        held = "" if gain.held_out is None else f", {gain.held_out:+.4f} held-apart"
        out.append(f"blend over the best member alone ({gain.over}): {gain.score:+.4f} in-sample{held}")
    guard = decisions.oof.blend_guard
    if guard:
        out.append(
            f"blend guard: the blend loses held apart ({guard.blend_held_out:.4f} against "
            f"{guard.alone_held_out:.4f}), so {guard.kept} is kept alone (the steps below are its search; "
            "tune.blend_guard=false keeps the blend)"
        )
    return out


# --------------------------------------------------------------------------- figures


def _save(fig, path: Path) -> Path:
    return write_with(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def _panel_pairs(ax: Any, c: dict, color: str, step: Step) -> str:
    """One line per second number (t) against the first (N, even ticks), "off" dashed; the chosen text."""
    pairs = [tuple(v) for v in c["values"]]
    score = dict(zip(pairs, c["score"]))
    ns = sorted({n for n, _ in pairs if n > 0})
    x = {n: i for i, n in enumerate(ns)}
    off = next((score[p] for p in pairs if p[0] == 0), None)
    if off is not None:
        ax.axhline(off, color="0.5", linestyle="--", linewidth=1, label="off")
    for j, level in enumerate(sorted({t for n, t in pairs if n > 0})):
        line = [(x[n], score[(n, t)]) for n, t in pairs if n > 0 and t == level]
        line.sort()
        symbol = step.symbols[1] if len(step.symbols) > 1 else "t"
        ax.plot(
            *zip(*line), "-o", color=color, alpha=1.0 - 0.25 * j, markersize=4, label=f"{symbol} = {level:g}"
        )
    chosen = tuple(c["chosen"])
    if chosen[0] > 0:
        ax.plot([x[chosen[0]]], [score[chosen]], "*", color=color, markersize=15, markeredgecolor="k")
    ax.set_xticks(range(len(ns)), [f"{n:g}" for n in ns])
    ax.legend(fontsize=7, loc="lower right")
    values = list(score.values())
    span = max(float(np.ptp(values)), 1e-3)
    ax.set_ylim(min(values) - 0.1 * span, max(values) + 0.3 * span)
    return f"chosen {step.describe(chosen)}: {score[chosen]:.4f}"


def _panel_line(ax: Any, c: dict, color: str, step: Step) -> str:
    """Score against the value (evenly spaced ticks for a categorical step), chosen starred; the chosen text."""
    values, score = np.asarray(c["values"], float), np.asarray(c["score"], float)
    categorical = step.axis is Axis.CATEGORICAL
    x = np.arange(len(values)) if categorical else values
    i = int(np.argmin(np.abs(values - c["chosen"])))
    ax.plot(x, score, "-o", color=color, markersize=4)
    ax.plot([x[i]], [score[i]], "*", color=color, markersize=15, markeredgecolor="k")
    if categorical:
        ax.set_xticks(x, [step.describe(v) for v in values])
    span = max(float(np.ptp(score)), 1e-3)
    ax.set_ylim(score.min() - 0.1 * span, score.max() + 0.3 * span)
    return f"chosen {step.describe(c['chosen'])}: {score[i]:.4f}"


def plot_curves(path: Path, step: Step, curves: dict, classes: tuple[str, ...]) -> Path:
    """OOF score against one step's value, one panel per class (own y range), chosen starred.

    Classes were tuned left to right, each with the previous ones' choices held, so a panel is
    the overall OOF score as that class's value alone moves.
    """
    from matplotlib.figure import Figure

    names = [cls for cls in classes if cls in curves]
    palette = colors(classes)
    fig = Figure(figsize=(4.0 * max(1, len(names)), 3.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(names)), squeeze=False)).ravel()
    panel = _panel_pairs if step.axis is Axis.PAIRS else _panel_line
    for ax, cls in zip(axes, names):
        text = panel(ax, curves[cls], palette[cls], step)
        box = {"facecolor": "white", "edgecolor": "0.8", "alpha": 0.9}
        ax.text(0.03, 0.95, text, transform=ax.transAxes, va="top", fontsize=8, bbox=box)
        ax.set_title(cls, color=palette[cls], fontsize=10)
        ax.set_xlabel(step.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("OOF score (the dataset's metric)", fontsize=9)
    fig.suptitle(f"OOF score vs {step.title}, class by class (others held; star: chosen)", fontsize=10)
    return _save(fig, path)


def plot_steps(path: Path, steps: pd.DataFrame) -> Path:
    """The OOF score after each tuning step (and of each member alone): in-sample and held-apart bars."""
    from matplotlib.figure import Figure

    held = steps["held_out"].notna().any() if "held_out" in steps else False
    fig = Figure(figsize=(8.0, 0.9 + 0.42 * len(steps) * (1.6 if held else 1.0)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(steps))[::-1] * (1.6 if held else 1.0)
    h = 0.7 if held else 0.8
    ax.barh(
        y + (h / 2 if held else 0),
        steps["score"],
        height=h,
        color="#6baed6",
        label="in-sample (every volume)",
    )
    values = list(steps["score"])
    if held:
        ax.barh(
            y - h / 2, steps["held_out"], height=h, color="#fd8d3c", label="held-apart (chosen on the rest)"
        )
        values += [v for v in steps["held_out"] if pd.notna(v)]
    for yy, (_, row) in zip(y, steps.iterrows()):
        gain = "" if pd.isna(row["gain"]) else f"  ({row['gain']:+.4f})"
        note = f"  [{row['note']}]" if row.get("note") else ""
        ax.text(
            row["score"],
            yy + (h / 2 if held else 0),
            f" {row['score']:.4f}{gain}{note}",
            va="center",
            fontsize=7,
        )
        if held and pd.notna(row["held_out"]):
            hg = "" if pd.isna(row["held_gain"]) else f"  ({row['held_gain']:+.4f})"
            ax.text(row["held_out"], yy - h / 2, f" {row['held_out']:.4f}{hg}", va="center", fontsize=7)
    ax.set_yticks(y, steps["label"], fontsize=8)
    ax.set_xlim(max(0.0, min(values) - 0.1), max(values) + 0.25)
    ax.set_xlabel("OOF score (the dataset's metric)", fontsize=9)
    ax.set_title("score after each tuning step (gain over the previous step)", fontsize=10)
    if held:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def pick_slices(slices: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` slices with a class in truth or prediction, spread from the worst Dice to the best."""
    if slices.empty or n <= 0:
        return slices.iloc[:0]
    ranked = slices.sort_values(["dice", "volume_id", "slice_index"], kind="stable").reset_index(drop=True)
    picks = np.unique(np.linspace(0, len(ranked) - 1, num=min(n, len(ranked))).round().astype(int))
    return ranked.iloc[picks]


def _view_box(masks: list[np.ndarray], shape: tuple[int, int], min_side: int = 96) -> tuple[slice, slice]:
    """A square window around the given 2D masks (padded by half their extent), inside the image."""
    hits = np.argwhere(np.logical_or.reduce([np.asarray(m, bool) for m in masks]))
    if hits.size == 0:
        return slice(0, shape[0]), slice(0, shape[1])
    (y0, x0), (y1, x1) = hits.min(axis=0), hits.max(axis=0) + 1
    side = min(max(min_side, int(1.5 * max(y1 - y0, x1 - x0))), *shape)
    out = []
    for lo, hi, n in ((y0, y1, shape[0]), (x0, x1, shape[1])):
        start = int(np.clip((lo + hi - side) // 2, 0, n - side))
        out.append(slice(start, start + side))
    return out[0], out[1]


def plot_overlays(path: Path, oof: OOFSet, decisions: Decisions, picks: pd.DataFrame) -> Path:
    """Truth filled, prediction outlined, per class, zoomed on the organs; one panel per slice."""
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    classes = oof.spec.classes
    COLORS = colors(classes)
    n = max(1, len(picks))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.8 * cols, 4.0 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    masks_by_volume: dict[str, np.ndarray] = {}
    for ax, row in zip(axes, picks.itertuples(index=False)):
        if row.volume_id not in masks_by_volume:
            masks_by_volume = {row.volume_id: volume_masks(oof, row.volume_id, decisions)}
        s = int(row.slice_index)
        volume = oof.truth[row.volume_id]
        truth, pred = oof.truth_mask(row.volume_id)[s] != 0, masks_by_volume[row.volume_id][s]
        ys, xs = _view_box([*truth, *pred], truth.shape[1:])
        image = normalize(volume.gray()[s])[ys, xs]
        rgb = np.repeat(np.clip(image / max(float(image.max()), 1e-6), 0, 1)[..., None], 3, axis=2)
        for c, cls in enumerate(classes):  # truth: tinted fill
            fill = truth[c][ys, xs]
            rgb[fill] = 0.45 * rgb[fill] + 0.55 * np.array(to_rgb(COLORS[cls]))
        ax.imshow(rgb, interpolation="nearest")
        for c, cls in enumerate(classes):  # prediction: outline
            if pred[c][ys, xs].any():
                ax.contour(
                    pred[c][ys, xs].astype(np.uint8), levels=[0.5], colors=[COLORS[cls]], linewidths=2.0
                )
                ax.contour(pred[c][ys, xs].astype(np.uint8), levels=[0.5], colors=["white"], linewidths=0.6)
        ax.set_title(f"{volume.ids[s]}\nslice Dice {row.dice:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(picks) :]:
        ax.set_axis_off()
    handles = [Patch(facecolor=COLORS[c], label=f"{c}") for c in classes]
    handles.append(Patch(facecolor="none", edgecolor="k", label="outline = prediction, fill = truth"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle("OOF slices, worst to best Dice: truth filled, tuned prediction outlined", fontsize=11)
    return _save(fig, path)


def run_report(
    cfg: EnsembleConfig, spec: DatasetSpec, root: Path, *, workers: int | None = None, progress: bool = True
) -> Report:
    """Measure the tuned ensemble on its OOF and write the tables and figures of ``make cv``."""
    decisions = read_decisions(cfg.name)
    oof = load_oof(cfg, spec, root, progress)
    tuned = [m["config"] for m in decisions.members]
    if sorted(tuned) != sorted(m.name for m in oof.members):
        raise ValueError(
            f"postprocess.json was tuned for {tuned}; rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )
    result, slices = measure(oof, decisions, workers or default_workers(), progress)
    expected = decisions.oof.score
    if expected is not None and abs(expected - result["score"]) > 1e-6:
        log.warning(
            "OOF score %.5f differs from the tuned %.5f: the OOF files changed since `make tune`",
            result["score"],
            expected,
        )
    out = run_dir("ensemble", cfg.name) / "report"
    table, steps = cv_tables(result, decisions)
    summary = summary_lines(decisions)
    for line in summary:
        log.info("%s", line)
    write_csv(out / "cv_table.csv", table)
    write_csv(out / "cv_steps.csv", steps)
    if not steps.empty:
        plot_steps(out / "steps.png", steps)
    skipped = {s["step"]: s.get("skipped", "") for s in decisions.steps}
    for step in registry():
        if decisions.curves.get(step.name):
            plot_curves(out / f"{step.name}.png", step, decisions.curves[step.name], oof.spec.classes)
        else:
            log.info("no %s curve (%s): no figure", step.name, skipped.get(step.name) or "not tuned")
    plot_overlays(out / "overlays.png", oof, decisions, pick_slices(slices, cfg.report_slices))
    return Report(out, table, steps, result["score"], summary)
