"""The exact 3D Hausdorff distance of two run sets (numba kernels of the UW metric).

The runs come from :mod:`pipeline.datasets.uwmgi_metric_runs`. Why the distance is exact without
comparing all pairs:

- only voxels of A outside B are at a non-zero distance from B (an interval difference of runs);
- the nearest voxel of B in one row comes from that row's runs in O(runs), and rows are searched
  slice by slice outwards, only while they (and their slice's box) can hold a nearer voxel;
- a voxel that cannot raise the running maximum needs no exact distance: any voxel of B (a
  *witness*) bounds its distance from above. A spread sample of both directions first sets a high
  maximum (Taha & Hanbury's early break); then the voxels are visited run by run in raster order,
  each run trying the witnesses of its neighbours, and most runs are settled by the distances
  from one witness to their two ends (the bound is largest there).

The maximum need not lie on a set's boundary (a ball in a hollow shell peaks at its centre), so
every voxel outside the other set is bounded or searched. Every kernel takes and returns arrays;
the plain twins are ``scipy.ndimage.distance_transform_edt``
(:func:`pipeline.datasets.uwmgi_metric.hausdorff_volume_edt`) and ``directed_hausdorff`` in the tests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_SQRT3 = math.sqrt(3.0)
_SAMPLE = 32  # voxels of each direction searched first, in spread order, to set the running maximum
_MARGIN = 4.0  # searches aim this many voxel steps below the maximum
_WITNESSES = 1024  # a ring: an overwritten witness is still a voxel of B, only a looser bound


@njit(cache=True, nogil=True)
def _outside_runs(ptr_a, sa, ea, ptr_b, sb, eb, out, write):  # pragma: no cover - compiled
    """Runs of A outside B as (row, start, end), row by row (interval differences); returns their count."""
    n = 0
    for r in range(ptr_a.size - 1):
        kb = ptr_b[r]
        for ka in range(ptr_a[r], ptr_a[r + 1]):
            x = sa[ka]
            while x < ea[ka]:
                while kb < ptr_b[r + 1] and eb[kb] <= x:
                    kb += 1
                if kb < ptr_b[r + 1] and sb[kb] <= x:
                    x = eb[kb]
                    continue
                stop = ea[ka] if kb == ptr_b[r + 1] else min(ea[ka], sb[kb])
                if write:
                    out[n, 0], out[n, 1], out[n, 2] = r, x, stop
                n += 1
                x = stop
    return n


@njit(cache=True, nogil=True)
def _difference(ptr_a, sa, ea, ptr_b, sb, eb):  # pragma: no cover - compiled
    """(runs (m, 3) of A outside B, first (m + 1,)): run i holds voxels first[i]:first[i + 1]."""
    m = _outside_runs(ptr_a, sa, ea, ptr_b, sb, eb, np.empty((0, 3), np.int64), False)
    runs = np.empty((m, 3), np.int64)
    _outside_runs(ptr_a, sa, ea, ptr_b, sb, eb, runs, True)
    first = np.zeros(m + 1, np.int64)
    for i in range(m):
        first[i + 1] = first[i] + runs[i, 2] - runs[i, 1]
    return runs, first


@njit(cache=True, nogil=True)
def _slice_boxes(ptr, starts, ends, n_h):  # pragma: no cover - compiled
    """Per slice, the first and last row and column holding runs (lo > hi for an empty slice)."""
    n_s = (ptr.size - 1) // n_h
    box = np.empty((n_s, 4), np.int64)
    box[:, 0] = n_h
    box[:, 1] = -1
    box[:, 2] = np.iinfo(np.int32).max
    box[:, 3] = -1
    for r in range(ptr.size - 1):
        if ptr[r + 1] > ptr[r]:
            z, y = r // n_h, r % n_h
            box[z, 0] = min(box[z, 0], y)
            box[z, 1] = max(box[z, 1], y)
            box[z, 2] = min(box[z, 2], starts[ptr[r]])
            box[z, 3] = max(box[z, 3], ends[ptr[r + 1] - 1] - 1)
    return box


@njit(cache=True, nogil=True)
def _x_near(ptr, starts, ends, r, x):  # pragma: no cover - compiled
    """The x of the voxel of row r nearest to x (x itself inside a run); -1 for an empty row."""
    near = -1
    for k in range(ptr[r], ptr[r + 1]):
        if x < starts[k]:
            if near < 0 or starts[k] - x < x - near:
                return starts[k]
            return near
        if x < ends[k]:
            return x
        near = ends[k] - 1
    return near


@njit(cache=True, nogil=True)
def _nearest(ptr, starts, ends, box, n_h, w, z, y, x, best, stop_at):  # pragma: no cover - compiled
    """(d2, bz, by, bx): the nearest run voxel to (z, y, x) among those nearer than ``best``.

    Slices are visited outwards from z, rows outwards from y, and only while they (and the slice's
    box) can hold a voxel nearer than the best so far; the search ends at a d2 <= ``stop_at``.
    bz is -1 when no voxel is nearer than the ``best`` given.
    """
    wz, wy, wx = w
    n_s = box.shape[0]
    bz = by = bx = -1
    k = 0
    while wz * k * k < best and (z - k >= 0 or z + k < n_s):
        dz2 = wz * k * k
        for side in range(2 if k else 1):
            zz = z + k if side else z - k
            if zz < 0 or zz >= n_s:
                continue
            lo, hi = box[zz, 0], box[zz, 1]
            if lo > hi:
                continue
            gx = max(0, box[zz, 2] - x, x - box[zz, 3])
            floor = dz2 + wx * gx * gx
            j = max(0, lo - y, y - hi)
            while floor + wy * j * j < best and (y - j >= lo or y + j <= hi):
                d2 = dz2 + wy * j * j
                for side_y in range(2 if j else 1):
                    yy = y + j if side_y else y - j
                    if yy < lo or yy > hi:
                        continue
                    near = _x_near(ptr, starts, ends, zz * n_h + yy, x)
                    if near >= 0:
                        v = d2 + wx * (near - x) * (near - x)
                        if v < best:
                            best, bz, by, bx = v, zz, yy, near
                if best <= stop_at:
                    return best, bz, by, bx
                j += 1
        k += 1
    return best, bz, by, bx


@njit(cache=True, nogil=True)
def _sq(w, z, y, x, b):  # pragma: no cover - compiled
    """The squared weighted distance from voxel (z, y, x) to voxel b = (bz, by, bx)."""
    return w[0] * (z - b[0]) ** 2 + w[1] * (y - b[1]) ** 2 + w[2] * (x - b[2]) ** 2


@njit(cache=True, nogil=True)
def _sample_sq(runs, first, ptr_b, sb, eb, box, n_h, w, cmax):  # pragma: no cover - compiled
    """Raise cmax over a spread sample of the voxels of ``runs`` (golden-ratio stride).

    Returns (cmax, done, a voxel of B): done when the sample held every voxel.
    """
    n = first[-1]
    near = (-1, -1, -1)
    if n == 0:
        return cmax, True, near
    step = max(1, int(n * 0.6180339887498949))
    while math.gcd(step, n) != 1:
        step += 1
    i = 0
    for _ in range(min(n, _SAMPLE)):
        i = (i + step) % n
        k = np.searchsorted(first, i, side="right") - 1
        z, y, x = runs[k, 0] // n_h, runs[k, 0] % n_h, runs[k, 1] + i - first[k]
        ub = np.inf if near[0] < 0 else _sq(w, z, y, x, near)
        if ub > cmax:  # search until a voxel within cmax turns up: exact when there is none
            d2, bz, by, bx = _nearest(ptr_b, sb, eb, box, n_h, w, z, y, x, ub, cmax)
            if bz >= 0:
                near = (bz, by, bx)
            cmax = max(cmax, d2)
    return cmax, n <= _SAMPLE, near


@njit(cache=True, nogil=True)
def _raster_sq(runs, ptr_b, sb, eb, box, n_h, w, cmax, seed):  # pragma: no cover - compiled
    """max(cmax, the squared distance to B of every voxel of ``runs``), visited in raster order.

    Each voxel keeps a witness (a voxel of B near it). A run is settled without a search when the
    witness of the voxel before it, or of the voxels above its ends in the slice before, is within
    cmax of both its ends; else each voxel tries those witnesses and the one above it in the row
    before, and only a voxel none of them settles is searched. Searches aim a margin below cmax
    so that the witness they leave serves the next voxels too.
    """
    y0, y1, x0, x1 = n_h, -1, runs[0, 1], runs[0, 2]
    for k in range(runs.shape[0]):
        y = runs[k, 0] % n_h
        y0, y1 = min(y0, y), max(y1, y)
        x0, x1 = min(x0, runs[k, 1]), max(x1, runs[k, 2])
    grid = np.full((y1 - y0 + 1, x1 - x0), -1, np.int32)  # per (y, x): the witness last used there
    wit = np.empty((_WITNESSES, 3), np.int64)
    wit[0, 0], wit[0, 1], wit[0, 2] = seed
    n_wit, last = 1, 0
    margin = _MARGIN * math.sqrt(min(w[0], w[1], w[2]))
    for k in range(runs.shape[0]):
        z, y, xa, xb = runs[k, 0] // n_h, runs[k, 0] % n_h, runs[k, 1], runs[k, 2]
        row = grid[y - y0]
        settled = False
        for e in range(3):
            c = last if e == 0 else row[(xa if e == 1 else xb - 1) - x0]
            if c >= 0 and max(_sq(w, z, y, xa, wit[c]), _sq(w, z, y, xb - 1, wit[c])) <= cmax:
                row[xa - x0 : xb - x0] = c
                last, settled = c, True
                break
        if settled:
            continue
        above = grid[y - y0 - 1] if y > y0 else row
        for x in range(xa, xb):
            ub = _sq(w, z, y, x, wit[last])
            for c in (row[x - x0], above[x - x0]):
                if ub > cmax and c >= 0 and _sq(w, z, y, x, wit[c]) < ub:
                    ub, last = _sq(w, z, y, x, wit[c]), c
            if ub > cmax:
                aim = max(0.0, math.sqrt(cmax) - margin)
                d2, bz, by, bx = _nearest(ptr_b, sb, eb, box, n_h, w, z, y, x, ub, aim * aim)
                if bz >= 0:
                    last = n_wit % _WITNESSES
                    wit[last, 0], wit[last, 1], wit[last, 2] = bz, by, bx
                    n_wit += 1
                cmax = max(cmax, d2)
            row[x - x0] = last
    return cmax


@njit(cache=True, nogil=True)
def _hausdorff_sq(ptr_a, sa, ea, ptr_b, sb, eb, n_h, w):  # pragma: no cover - compiled
    """The squared symmetric Hausdorff distance of two non-empty run sets.

    Both directions are sampled first and share one running maximum; the direction whose sample
    reached it is scanned first, so that the other one mostly only confirms it.
    """
    box_a, box_b = _slice_boxes(ptr_a, sa, ea, n_h), _slice_boxes(ptr_b, sb, eb, n_h)
    runs_ab, first_ab = _difference(ptr_a, sa, ea, ptr_b, sb, eb)
    runs_ba, first_ba = _difference(ptr_b, sb, eb, ptr_a, sa, ea)
    c_ab, done_ab, seed_ab = _sample_sq(runs_ab, first_ab, ptr_b, sb, eb, box_b, n_h, w, 0.0)
    cmax, done_ba, seed_ba = _sample_sq(runs_ba, first_ba, ptr_a, sa, ea, box_a, n_h, w, c_ab)
    ba_first = cmax > c_ab
    for turn in range(2):
        if (turn == 0) == ba_first:
            if not done_ba:
                cmax = _raster_sq(runs_ba, ptr_a, sa, ea, box_a, n_h, w, cmax, seed_ba)
        elif not done_ab:
            cmax = _raster_sq(runs_ab, ptr_b, sb, eb, box_b, n_h, w, cmax, seed_ab)
    return cmax


def hausdorff_runs(
    runs_a: tuple, runs_b: tuple, shape: tuple[int, int, int], scale: tuple[int, int, int] | None = None
) -> float | None:
    """Normalised symmetric Hausdorff distance of two run sets on an (S, H, W) grid.

    ``scale``: the (S, H, W) that normalises the coordinates when the grid is cut from a larger
    volume (distances do not depend on where the cut lies); default ``shape``.
    """
    empty_a, empty_b = runs_a[0][-1] == runs_a[0][0], runs_b[0][-1] == runs_b[0][0]
    if empty_a and empty_b:
        return None
    if empty_a or empty_b:
        return 1.0
    n_s, n_h, n_w = shape if scale is None else scale
    weights = (1.0 / n_s**2, 1.0 / n_h**2, 1.0 / n_w**2)
    d2 = _hausdorff_sq(*runs_a, *runs_b, shape[1], weights)  # type: ignore[call-arg]  # a numba kernel
    return math.sqrt(d2) / _SQRT3
