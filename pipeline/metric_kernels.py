"""Numba kernels of the exact Hausdorff distance and the Dice counts (see :mod:`pipeline.metric`).

Masks reach the kernels as uint8 (S, C, H, W), non-zero = foreground. A *row* is (s, y); its
*runs* are the [start, end) intervals of x that are foreground, stored CSR-like: a row pointer
(S*H + 1,) into int32 ``starts`` and ``ends`` (:func:`class_runs` gives one row pointer per
class over shared arrays, :func:`union_runs` the runs of the classes merged).

Why the distance is exact without comparing all pairs:

- only voxels of A outside B are at a non-zero distance from B (an interval difference of runs);
- the nearest voxel of B in one row comes from that row's runs in O(runs);
- rows are searched slice by slice outwards, and only while they can hold a nearer voxel;
- a voxel whose distance cannot exceed the running maximum needs no exact distance: a spread
  sample first sets a high maximum (Taha & Hanbury's early break), then voxels are visited in
  raster order, where ``d(p) <= d(q) + |p - q|`` for the previous voxel q in x, y or z skips
  most searches outright.

Every kernel takes and returns arrays; the plain twins are ``scipy.ndimage.distance_transform_edt``
(:func:`pipeline.metric.hausdorff_volume_edt`) and ``directed_hausdorff`` in the tests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_SQRT3 = math.sqrt(3.0)


@njit(cache=True, nogil=True)
def row_any(m):  # pragma: no cover - compiled
    """(S, C, H) uint8: 1 where the row m[s, c, y, :] has a foreground pixel."""
    n_s, n_c, n_h, n_w = m.shape
    out = np.zeros((n_s, n_c, n_h), np.uint8)
    for s in range(n_s):
        for c in range(n_c):
            for y in range(n_h):
                acc = np.uint8(0)
                for x in range(n_w):
                    acc |= m[s, c, y, x]
                out[s, c, y] = acc != 0
    return out


@njit(cache=True, nogil=True)
def dice_counts(p, t, fp, ft):  # pragma: no cover - compiled
    """(S, C, 3) int64: |P|, |T|, |P∩T| per (slice, class), reading only non-empty rows."""
    n_s, n_c, n_h, n_w = p.shape
    out = np.zeros((n_s, n_c, 3), np.int64)
    for s in range(n_s):
        for c in range(n_c):
            for y in range(n_h):
                if fp[s, c, y] == 0 and ft[s, c, y] == 0:
                    continue
                a = 0
                b = 0
                both = 0
                for x in range(n_w):
                    vp = p[s, c, y, x] != 0
                    vt = t[s, c, y, x] != 0
                    a += vp
                    b += vt
                    both += vp & vt
                out[s, c, 0] += a
                out[s, c, 1] += b
                out[s, c, 2] += both
    return out


_BLOCK = 16
_SAMPLE = 256  # points searched first, in spread order, to set the running maximum
_MARGIN = 4.0  # searches aim this many voxel steps below the maximum


_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)


@njit(cache=True, nogil=True)
def _scan_row(buf, words, n_w, starts, ends, k):  # pragma: no cover - compiled
    """Append the runs of the row copied into ``buf`` (zero padded) at index k; returns the next index.

    Eight pixels at a time: a zero word holds no run start outside a run, a word without a zero
    byte holds no run end inside one.
    """
    inside = False
    for w in range(words.size):
        word = words[w]
        if inside:
            if ((word - _ONES) & ~word & _HIGHS) == 0:
                continue
        elif word == 0:
            continue
        for i in range(8 * w, min(8 * w + 8, n_w)):
            if (buf[i] != 0) != inside:
                if inside:
                    ends[k] = i
                    k += 1
                else:
                    starts[k] = i
                inside = not inside
    if inside:
        ends[k] = n_w
        k += 1
    return k


@njit(cache=True, nogil=True)
def class_runs(m, f):  # pragma: no cover - compiled
    """Runs of every class: row pointers (C, S*H + 1) into shared starts and ends (int32).

    Class c's runs of row (s, y) are ``starts[ptr[c, r]:ptr[c, r + 1]]`` with r = s * H + y.
    """
    n_s, n_c, n_h, n_w = m.shape
    n_rows = n_s * n_h
    busy = 0
    for s in range(n_s):
        for c in range(n_c):
            for y in range(n_h):
                busy += f[s, c, y] != 0
    cap = busy * ((n_w + 1) // 2)  # a row holds at most (W + 1) // 2 runs
    starts = np.empty(cap, np.int32)
    ends = np.empty(cap, np.int32)
    n_words = (n_w + 7) // 8
    buf = np.zeros(8 * n_words, np.uint8)
    words = buf.view(np.uint64)
    ptr = np.zeros((n_c, n_rows + 1), np.int64)
    k = 0
    for c in range(n_c):
        for r in range(n_rows):
            ptr[c, r] = k
            s, y = r // n_h, r % n_h
            if f[s, c, y]:
                buf[:n_w] = m[s, c, y]
                k = _scan_row(buf, words, n_w, starts, ends, k)
        ptr[c, n_rows] = k
    return ptr, starts[:k].copy(), ends[:k].copy()


@njit(cache=True, nogil=True)
def union_runs(ptr, starts, ends):  # pragma: no cover - compiled
    """Runs of the union of all classes (one row pointer), merging the sorted class runs per row."""
    n_c, n_rows = ptr.shape[0], ptr.shape[1] - 1
    out_ptr = np.zeros(n_rows + 1, np.int64)
    out_s = np.empty(starts.size, np.int32)
    out_e = np.empty(starts.size, np.int32)
    pos = np.empty(n_c, np.int64)
    k = 0
    for r in range(n_rows):
        for c in range(n_c):
            pos[c] = ptr[c, r]
        while True:  # repeatedly take the class run that starts first
            pick = -1
            for c in range(n_c):
                if pos[c] < ptr[c, r + 1] and (pick < 0 or starts[pos[c]] < starts[pos[pick]]):
                    pick = c
            if pick < 0:
                break
            lo, hi = starts[pos[pick]], ends[pos[pick]]
            pos[pick] += 1
            if k > out_ptr[r] and lo <= out_e[k - 1]:
                out_e[k - 1] = max(out_e[k - 1], hi)
            else:
                out_s[k] = lo
                out_e[k] = hi
                k += 1
        out_ptr[r + 1] = k
    return out_ptr, out_s[:k], out_e[:k]


@njit(cache=True, nogil=True)
def _outside_points(ptr_a, sa, ea, ptr_b, sb, eb, n_w, pts, write):  # pragma: no cover - compiled
    """Voxels of A not in B, row by row (interval difference of the runs); returns their count."""
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
                    for xx in range(x, stop):
                        pts[n + xx - x, 0] = r
                        pts[n + xx - x, 1] = xx
                n += stop - x
                x = stop
    return n


@njit(cache=True, nogil=True)
def _x_gap(ptr, starts, ends, r, x):  # pragma: no cover - compiled
    """Distance in x from x to the nearest run of row r (0 inside a run); -1 for an empty row."""
    gap = -1
    for k in range(ptr[r], ptr[r + 1]):
        if x < starts[k]:
            d = starts[k] - x
            if gap < 0 or d < gap:
                gap = d
            break
        if x < ends[k]:
            return 0
        gap = x - ends[k] + 1
    return gap


@njit(cache=True, nogil=True)
def _nearest_sq(runs, n_h, z, y, x, box, w, bound, stop_at):  # pragma: no cover - compiled
    """Squared distance from voxel (z, y, x) to the nearest run voxel among rows nearer than ``bound``.

    Rows are visited slice by slice outwards, then row by row outwards, and only while they can
    hold a nearer voxel; the search ends early at a distance <= ``stop_at``. Returns ``bound``
    when no row nearer than it holds a voxel.
    """
    ptr, starts, ends = runs
    zlo, zhi, ylo, yhi = box
    wz, wy, wx = w
    best = bound
    k = max(0, zlo - z, z - zhi)
    while wz * k * k < best and (z - k >= zlo or z + k <= zhi):
        dz2 = wz * k * k
        for side in range(2 if k else 1):
            zz = z + k if side else z - k
            if zz < zlo or zz > zhi:
                continue
            lo, hi = ylo[zz], yhi[zz]  # the rows of this slice that hold runs (none when lo > hi)
            j = max(0, lo - y, y - hi)
            while dz2 + wy * j * j < best and (y - j >= lo or y + j <= hi):
                d2 = dz2 + wy * j * j
                for side_y in range(2 if j else 1):
                    yy = y + j if side_y else y - j
                    if yy < lo or yy > hi:
                        continue
                    gap = _x_gap(ptr, starts, ends, zz * n_h + yy, x)
                    if gap >= 0 and d2 + wx * gap * gap < best:
                        best = d2 + wx * gap * gap
                if best <= stop_at:
                    return best
                j += 1
        k += 1
    return best


@njit(cache=True, nogil=True)
def _bound_sq(runs, n_h, z, y, x, box, w, cmax, aim_sq, upper_sq):  # pragma: no cover - compiled
    """A squared distance bound for one voxel: some value <= cmax when the voxel cannot raise the
    maximum (rows within cmax searched, stopping at the first value <= ``aim_sq``), else the exact
    squared distance (knowing it is at most ``upper_sq``)."""
    if cmax > 0.0:
        d2 = _nearest_sq(runs, n_h, z, y, x, box, w, np.nextafter(cmax, np.inf), aim_sq)
        if d2 <= cmax:
            return d2
    return _nearest_sq(runs, n_h, z, y, x, box, w, upper_sq, 0.0)


@njit(cache=True, nogil=True)
def _directed_sq(ptr_a, sa, ea, ptr_b, sb, eb, n_h, n_w, wz, wy, wx):  # pragma: no cover - compiled
    """max over voxels of A of the squared weighted distance to the nearest voxel of B (B non-empty)."""
    n_rows = ptr_b.size - 1
    n_s = n_rows // n_h
    zlo, zhi = n_s, -1
    ylo = np.full(n_s, n_h, np.int64)  # per slice, the first and last row of B
    yhi = np.full(n_s, -1, np.int64)
    for r in range(n_rows):
        if ptr_b[r + 1] > ptr_b[r]:
            z, y = r // n_h, r % n_h
            zlo, zhi = min(zlo, z), max(zhi, z)
            ylo[z], yhi[z] = min(ylo[z], y), max(yhi[z], y)
    runs, box, w = (ptr_b, sb, eb), (zlo, zhi, ylo, yhi), (wz, wy, wx)
    none = np.empty((0, 2), np.int32)
    n = _outside_points(ptr_a, sa, ea, ptr_b, sb, eb, n_w, none, False)
    if n == 0:
        return 0.0
    pts = np.empty((n, 2), np.int32)  # (row, x) of every voxel of A outside B, in raster order
    _outside_points(ptr_a, sa, ea, ptr_b, sb, eb, n_w, pts, True)
    # 1) a spread sample (golden-ratio stride) sets a high running maximum early
    step = max(1, int(n * 0.6180339887498949))
    while math.gcd(step, n) != 1:
        step += 1
    cmax = 0.0
    i = 0
    for _ in range(min(n, _SAMPLE)):
        i = (i + step) % n
        z, y, x = pts[i, 0] // n_h, pts[i, 0] % n_h, pts[i, 1]
        cmax = max(cmax, _bound_sq(runs, n_h, z, y, x, box, w, cmax, cmax, np.inf))
    if n <= _SAMPLE:  # the stride visited every voxel
        return cmax
    # 2) every voxel in raster order. The distance is 1-Lipschitz: the bound of the voxel before
    #    it in x, y or z plus one step bounds it, which skips most searches; searches aim a margin
    #    below cmax so that the bound they leave carries on to the next voxels
    steps = (math.sqrt(wz), math.sqrt(wy), math.sqrt(wx))
    margin = _MARGIN * min(steps)
    upper = np.full((n_h, n_w), np.inf)
    stamp = np.full((n_h, n_w), -1, np.int64)  # the slice that wrote upper[y, x]
    for i in range(n):
        z, y, x = pts[i, 0] // n_h, pts[i, 0] % n_h, pts[i, 1]
        u = upper[y, x] + steps[0] if stamp[y, x] == z - 1 else np.inf
        if y > 0 and stamp[y - 1, x] == z:
            u = min(u, upper[y - 1, x] + steps[1])
        if x > 0 and stamp[y, x - 1] == z:
            u = min(u, upper[y, x - 1] + steps[2])
        if u * u > cmax:
            aim = max(0.0, math.sqrt(cmax) - margin)
            d2 = _bound_sq(runs, n_h, z, y, x, box, w, cmax, aim * aim, u * u)
            cmax = max(cmax, d2)
            u = min(u, math.sqrt(d2))
        upper[y, x] = u
        stamp[y, x] = z
    return cmax


def hausdorff_runs(runs_a: tuple, runs_b: tuple, shape: tuple[int, int, int]) -> float | None:
    """Normalised symmetric Hausdorff distance of two run sets on an (S, H, W) grid."""
    empty_a, empty_b = runs_a[0][-1] == runs_a[0][0], runs_b[0][-1] == runs_b[0][0]
    if empty_a and empty_b:
        return None
    if empty_a or empty_b:
        return 1.0
    n_s, n_h, n_w = shape
    weights = (1.0 / n_s**2, 1.0 / n_h**2, 1.0 / n_w**2)
    d2 = max(
        _directed_sq(*runs_a, *runs_b, n_h, n_w, *weights),
        _directed_sq(*runs_b, *runs_a, n_h, n_w, *weights),
    )
    return math.sqrt(d2) / _SQRT3
