"""The best and worst out-of-fold volumes under the tuned decisions, and their overlays.

Each OOF volume is blended with the tuned per-class weights, post-processed with the tuned steps
(:func:`pipeline.infer.postprocess.apply_postprocess`, as ``make cv`` and ``make submit`` do) and
scored alone with the dataset's metric; the lowest and highest scoring volumes are drawn, a few
slices each (truth filled, prediction outlined), on one window per volume around both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.data.geometry import normalize
from pipeline.infer.ensemble import OOFSet
from pipeline.infer.evaluate import map_volumes
from pipeline.infer.postprocess import Decisions
from pipeline.infer.report import colors, volume_masks
from pipeline.report.figures import Figure, render

VOLUMES_EACH_END = 2  # worst and best volumes drawn
SLICES_PER_VOLUME = 4


def score_volumes(oof: OOFSet, decisions: Decisions, workers: int, progress: bool = True) -> pd.DataFrame:
    """One row per OOF volume, worst score first: ``volume_id, group, score`` and a column per class."""
    spec = oof.spec

    def one(volume: str) -> dict:
        result = spec.aggregate(
            [spec.volume_stats(volume_masks(oof, volume, decisions), oof.truth_mask(volume))]
        )
        per_class = {c: (result.get("per_class") or {}).get(c, {}).get("score") for c in spec.classes}
        return {
            "volume_id": volume,
            "group": oof.groups.get(volume, ""),
            "score": result["score"],
            **per_class,
        }

    rows = map_volumes(one, oof.volumes, workers, "report volumes", progress)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["score", "volume_id"], kind="stable").reset_index(drop=True)


def pick_volumes(table: pd.DataFrame, n: int = VOLUMES_EACH_END) -> pd.DataFrame:
    """The ``n`` worst and ``n`` best volumes (all of them when there are fewer than 2n), worst first."""
    if len(table) <= 2 * n:
        return table
    return pd.concat([table.head(n), table.tail(n)])


def pick_slices(truth: np.ndarray, pred: np.ndarray, n: int = SLICES_PER_VOLUME) -> list[int]:
    """``n`` slices spread over those with a class in truth or prediction (the middle ones when none has)."""
    busy = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1) | pred.reshape(len(pred), -1).any(axis=1))
    pool = busy if len(busy) else np.arange(len(truth))
    picks = np.unique(np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int))
    return [int(pool[i]) for i in picks]


def window(masks: np.ndarray, shape: tuple[int, int], min_side: int = 64) -> tuple[slice, slice]:
    """A square window around the (..., H, W) masks (padded by half their extent), inside the image."""
    hits = np.argwhere(masks.reshape(-1, *shape).any(axis=0))
    if hits.size == 0:
        return slice(0, shape[0]), slice(0, shape[1])
    (y0, x0), (y1, x1) = hits.min(axis=0), hits.max(axis=0) + 1
    side = min(max(min_side, int(1.5 * max(y1 - y0, x1 - x0))), *shape)
    out = []
    for lo, hi, size in ((y0, y1, shape[0]), (x0, x1, shape[1])):
        start = int(np.clip((lo + hi - side) // 2, 0, size - side))
        out.append(slice(start, start + side))
    return out[0], out[1]


def _tint(image: np.ndarray, truth: np.ndarray, palette: list[tuple[float, float, float]]) -> np.ndarray:
    rgb = np.repeat(np.clip(image / max(float(image.max()), 1e-6), 0, 1)[..., None], 3, axis=2)
    for c, color in enumerate(palette):
        fill = truth[c]
        rgb[fill] = 0.45 * rgb[fill] + 0.55 * np.array(color)
    return rgb


def plot_volumes(oof: OOFSet, decisions: Decisions, picks: pd.DataFrame) -> Figure | None:
    """One row per picked volume (worst first), ``SLICES_PER_VOLUME`` slices: truth filled, prediction outlined."""
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.patches import Patch

    if picks.empty:
        return None
    classes = oof.spec.classes
    hex_colors = colors(classes)
    palette = [to_rgb(hex_colors[c]) for c in classes]
    rows, cols = len(picks), SLICES_PER_VOLUME
    fig = MplFigure(figsize=(2.4 * cols, 2.5 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(picks.itertuples(index=False)):
        volume = oof.truth[row.volume_id]
        truth, pred = oof.truth_mask(row.volume_id) != 0, volume_masks(oof, row.volume_id, decisions)
        slices = pick_slices(truth, pred)
        ys, xs = window(np.concatenate([truth[slices], pred[slices]]), truth.shape[2:])
        image = normalize(volume.gray())
        for c_ax, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c_ax >= len(slices):
                ax.set_axis_off()
                continue
            s = slices[c_ax]
            ax.imshow(_tint(image[s][ys, xs], truth[s][:, ys, xs], palette), interpolation="nearest")
            for c, cls in enumerate(classes):
                part = pred[s, c][ys, xs]
                if part.any():
                    ax.contour(part.astype(np.uint8), levels=[0.5], colors=[hex_colors[cls]], linewidths=1.6)
                    ax.contour(part.astype(np.uint8), levels=[0.5], colors=["white"], linewidths=0.5)
            ax.set_title(f"slice {s}", fontsize=8)
        axes[r][0].set_ylabel(f"{row.volume_id}\nscore {row.score:.3f}", fontsize=8)
    handles = [Patch(facecolor=hex_colors[c], label=c) for c in classes]
    handles.append(Patch(facecolor="none", edgecolor="k", label="fill = truth, outline = prediction"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("worst and best OOF volumes under the tuned decisions (worst first)", fontsize=10)
    return render(fig, "png", caption="best and worst OOF volumes", dpi=80)
