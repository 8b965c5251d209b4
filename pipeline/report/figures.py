"""The report page's own figures, drawn with matplotlib and returned inline (SVG or PNG bytes).

Every figure is a :class:`Figure` record holding its bytes and MIME type, so the page embeds it as
a ``data:`` URI and needs no file beside it. Training curves come from each fold's ``metrics.csv``
(the columns of :func:`pipeline.train.engine.fit`), the classifier's per-class AUC from the same
files, the detector's mAP per epoch from the ``results.csv`` its training wrote.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from pipeline.report.records import FoldRun, MemberRuns

FOLD_COLORS = ("#3182bd", "#e6550d", "#31a354", "#756bb1", "#de2d26", "#636363", "#8c6d31", "#d6616b")
# (metrics.csv column, panel title, log scale); a panel is drawn when some fold has the column
TRAIN_PANELS = (
    ("train_loss", "training loss", False),
    ("score", "validation score", False),
    ("lr", "learning rate", True),
    ("images_per_s", "images / s (training)", False),
)
AUC_PREFIX = "auc_"
DET_PREFIX = "metrics/"  # ultralytics' validation columns in results.csv


@dataclass(frozen=True)
class Figure:
    """One inline figure: its bytes, MIME type and a caption."""

    data: bytes
    mime: str
    caption: str = ""

    def uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    @classmethod
    def from_file(cls, path: Path, caption: str = "") -> Figure:
        mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
        return cls(path.read_bytes(), mime, caption)


def render(fig: Any, fmt: str = "svg", caption: str = "", dpi: int = 100) -> Figure:
    """A matplotlib Figure as SVG (text as paths: no font needed to show it) or PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(
        buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None
    )
    return Figure(buf.getvalue(), "image/svg+xml" if fmt == "svg" else "image/png", caption)


def _new(width: float, height: float, panels: int) -> tuple[Any, np.ndarray]:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels, squeeze=False)).ravel()
    return fig, axes


def _with_metrics(member: MemberRuns) -> list[FoldRun]:
    """The folds that finished at least one epoch (their ``metrics`` is a non-empty frame)."""
    return [f for f in member.folds.values() if f.metrics is not None and not f.metrics.empty]


def _columns(f: FoldRun) -> pd.Index:
    return pd.Index([]) if f.metrics is None else f.metrics.columns


def _curves(ax: Any, folds: list[FoldRun], column: str, log: bool) -> None:
    """One line per fold; the best epoch (highest score) starred on every panel."""
    for i, f in enumerate(folds):
        m = f.metrics
        if m is None or column not in m.columns:
            continue
        values = pd.to_numeric(m[column], errors="coerce")
        keep = values.notna() & (values > 0 if log else True)
        if not keep.any():
            continue
        color = FOLD_COLORS[i % len(FOLD_COLORS)]
        ax.plot(
            m["epoch"][keep],
            values[keep],
            "-o",
            color=color,
            markersize=3,
            linewidth=1.2,
            label=f"fold {f.fold}",
        )
        epoch, _ = f.best()
        at = m.index[(m["epoch"] == epoch) & keep]
        if epoch is not None and len(at):
            ax.plot([epoch], [values[at[0]]], "*", color=color, markersize=11, markeredgecolor="k", zorder=5)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def training_curves(member: MemberRuns) -> Figure | None:
    """Loss, validation score, learning rate and images/s against the epoch, per fold (star: best epoch)."""
    folds = _with_metrics(member)
    if not folds:
        return None
    panels = [p for p in TRAIN_PANELS if any(p[0] in _columns(f) for f in folds)]
    fig, axes = _new(3.2 * len(panels), 2.8, len(panels))
    for ax, (column, title, log) in zip(axes, panels):
        _curves(ax, folds, column, log)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{member.stage} {member.name}: per fold (star: best validation epoch)", fontsize=10)
    return render(fig, caption=f"training curves of {member.name}")


def classifier_auc(member: MemberRuns, classes: tuple[str, ...]) -> tuple[Figure | None, pd.DataFrame]:
    """AUC per class against the epoch (one panel per class, a line per fold) and the best epoch's table."""
    folds = _with_metrics(member)
    present = [c for c in classes if any(f"{AUC_PREFIX}{c}" in _columns(f) for f in folds)]
    if not present:
        return None, pd.DataFrame()
    fig, axes = _new(3.0 * len(present), 2.8, len(present))
    rows = []
    for ax, cls in zip(axes, present):
        _curves(ax, folds, f"{AUC_PREFIX}{cls}", False)
        ax.set_title(f"AUC {cls}", fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
    for f in folds:
        epoch, _ = f.best()
        m = f.metrics if f.metrics is not None else pd.DataFrame({"epoch": []})
        row = m[m["epoch"] == epoch]
        if not row.empty:
            rows.append(
                {
                    "fold": f.fold,
                    "epoch": epoch,
                    **{c: row[f"{AUC_PREFIX}{c}"].iloc[0] for c in present if f"{AUC_PREFIX}{c}" in row},
                }
            )
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"classifier {member.name}: validation AUC per class (star: best epoch)", fontsize=10)
    table = pd.DataFrame(rows)
    if not table.empty:
        mean = {"fold": "mean", "epoch": "", **{c: table[c].mean() for c in present if c in table}}
        table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    return render(fig, caption=f"classifier AUC per class of {member.name}"), table


def detector_curves(results_csv: Path) -> Figure | None:
    """ultralytics' validation metrics (mAP50, mAP50-95, precision, recall) against the epoch."""
    if not results_csv.is_file():
        return None
    frame = pd.read_csv(results_csv)
    frame.columns = [c.strip() for c in frame.columns]
    columns = [c for c in frame.columns if c.startswith(DET_PREFIX)]
    if not columns or "epoch" not in frame.columns:
        return None
    fig, axes = _new(4.5, 3.0, 1)
    ax = axes[0]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, column in enumerate(columns):
        label = column.removeprefix(DET_PREFIX).removesuffix("(B)")
        ax.plot(
            frame["epoch"],
            frame[column],
            "-o",
            markersize=3,
            color=FOLD_COLORS[i % len(FOLD_COLORS)],
            label=label,
        )
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("detector validation (ultralytics results.csv)", fontsize=10)
    return render(fig, caption="detector mAP per epoch")


def score_bars(table: pd.DataFrame, title: str) -> Figure | None:
    """Per-class scores as horizontal bars (``table``: columns class, score)."""
    if table.empty:
        return None
    fig, axes = _new(5.0, 0.6 + 0.35 * len(table), 1)
    ax = axes[0]
    y = np.arange(len(table))[::-1]
    ax.barh(y, table["score"], color="#6baed6")
    for yy, v in zip(y, table["score"]):
        ax.text(v, yy, f" {v:.4f}", va="center", fontsize=8)
    ax.set_yticks(y, table["class"], fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return render(fig, caption=title)
