"""Growth of a stage's cost with the data: exponents, projections to full scale, the issue's limits.

``time ~ n^a``: ``a`` is the least-squares slope of log seconds against log size. A projection to the
full set scales the largest run (not the fit's intercept), with the exponent floored (at 1 for
time: a small scale doing extra work must not bend the projection below linear).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

TEST_SIDE = ("submit", "score")  # stages whose size is the test split's
GIB = 1024**3
TUNE_LIMIT_S = 600.0  # `make tune` at full scale on 2 cores
SUPERLINEAR = 1.15  # a time exponent above this is reported (scales differ in frame sizes and load)


def growth_exponent(n: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope ``a`` of log y against log n (y ~ n^a); NaN with fewer than two sizes."""
    sizes, values = np.asarray(n, float), np.asarray(y, float)
    ok = (sizes > 0) & (values > 0)
    if len(np.unique(sizes[ok])) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes[ok]), np.log(values[ok]), 1)[0])


def extrapolate(n: Sequence[float], y: Sequence[float], target: float, min_exponent: float = 0.0) -> float:
    """y at ``target``: measured when ``target`` was run, else the largest run's y scaled by
    ``(target / n) ** max(a, min_exponent)`` with ``a`` the fitted exponent.

    Scaling from the largest run (not from the fit's intercept) with a floor on the exponent keeps
    a small scale that did extra work (tune's second sweep) from bending the projection down.
    """
    sizes, values = np.asarray(n, float), np.asarray(y, float)
    if np.any(sizes == target):
        return float(values[sizes == target][-1])
    a = growth_exponent(n, y)
    if np.isnan(a):
        return float("nan")
    last = int(np.argmax(sizes))
    return float(values[last] * (target / sizes[last]) ** max(a, min_exponent))


def growth_table(runs: pd.DataFrame, full: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Per stage: exponents of time (on slices and on voxels) and of peak memory, and seconds and GiB at
    the full set (``full[split]``: ``slices`` and ``mvox``); time grows at least linearly, memory at least not at all.
    """
    rows = []
    for stage, group in runs.groupby("stage", sort=False):
        target = full["test" if stage in TEST_SIDE else "train"]
        rows.append(
            {
                "stage": stage,
                "time_exponent": growth_exponent(group["n_slices"], group["work_s"]),
                "time_exponent_voxels": growth_exponent(group["n_mvox"], group["work_s"]),
                "rss_exponent": growth_exponent(group["n_slices"], group["peak_gib"]),
                "full_slices": target["slices"],
                "full_s": extrapolate(group["n_mvox"], group["work_s"], target["mvox"], min_exponent=1.0),
                "full_gib": extrapolate(group["n_mvox"], group["peak_gib"], target["mvox"]),
            }
        )
    return pd.DataFrame(rows)


def checks(runs: pd.DataFrame, growth: pd.DataFrame) -> list[str]:
    """The issue's limits, measured at scale 1 or projected to it (NaN: one scale below 1 cannot project)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    at_full = "measured" if 1.0 in set(runs["scale"]) else "projected"
    worst = runs.loc[runs["peak_gib"].idxmax()]
    out = [
        f"largest peak RSS: {worst['peak_gib']:.2f} GiB ({worst['stage']} at x{worst['scale']:g}); at 1x "
        f"({at_full}) {growth['full_gib'].max():.2f} GiB; this machine has {memory:.1f} GiB",
    ]
    tune = growth.set_index("stage")["full_s"].get("tune", float("nan"))
    if np.isfinite(tune):
        verdict = "within" if tune <= TUNE_LIMIT_S else "OVER"
        out.append(f"tune at 1x: {tune:.0f} s ({at_full}), {verdict} the {TUNE_LIMIT_S:.0f} s limit")
    superlinear = growth[growth["time_exponent_voxels"] > SUPERLINEAR]["stage"].tolist()
    out.append(
        f"time growing faster than linear (exponent on voxels > {SUPERLINEAR}): {', '.join(superlinear) or 'none'}"
    )
    return out
