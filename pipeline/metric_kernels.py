"""Numba kernels of the exact Hausdorff distance and the Dice counts (see :mod:`pipeline.metric`).

Masks reach the kernels as C-contiguous uint8, non-zero = foreground. A *row* is (s, y); its
*runs* are the [start, end) intervals of x that are foreground, stored CSR-like: a row pointer
(S*H + 1,) into int32 ``starts`` and ``ends`` (:func:`class_runs` gives one row pointer per
class over shared arrays, :func:`union_runs` the runs of the classes merged, :func:`dice_runs`
the Dice counts from them).

:func:`line_runs` reads a mask once, eight bytes at a time: blocks of zero words and words inside
a run are skipped, and a word holding run edges yields them all from its byte mask.

Why the distance is exact without comparing all pairs:

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
(:func:`pipeline.metric.hausdorff_volume_edt`) and ``directed_hausdorff`` in the tests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_SQRT3 = math.sqrt(3.0)
_BLOCK = 16  # zero words skipped at once (one vectorised OR)
_SAMPLE = 32  # voxels of each direction searched first, in spread order, to set the running maximum
_MARGIN = 4.0  # searches aim this many voxel steps below the maximum
_WITNESSES = 1024  # a ring: an overwritten witness is still a voxel of B, only a looser bound

_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_GATHER = np.uint64(0x0002040810204081)  # moves bit 8i + 7 to bit 56 + i
_CTZ8 = np.array([8] + [(i & -i).bit_length() - 1 for i in range(1, 256)], np.int64)  # trailing zeros


@njit(cache=True, nogil=True)
def _skip_words(words, w, inside):  # pragma: no cover - compiled
    """The first word from w on that may hold a run edge: outside a run a non-zero word (aligned
    blocks of zero words are skipped at once), inside one a word with a zero byte."""
    n_words = words.size
    if inside:
        while w < n_words and ((words[w] - _ONES) & ~words[w] & _HIGHS) == 0:
            w += 1
        return w
    while w < n_words:
        if w % _BLOCK == 0 and w + _BLOCK <= n_words:
            acc = np.uint64(0)
            for j in range(w, w + _BLOCK):  # vectorised
                acc |= words[j]
            if acc == 0:
                w += _BLOCK
                continue
        if words[w] != 0:
            return w
        w += 1
    return w


@njit(cache=True, nogil=True)
def _byte_bits(word):  # pragma: no cover - compiled
    """The 8-bit mask of the non-zero bytes of a (little-endian) word: bit i for byte i."""
    high = (((word & _LOW7) + _LOW7) | word) & _HIGHS
    return np.int64((high * _GATHER) >> np.uint64(56))


@njit(cache=True, nogil=True)
def _cut(begin, end, n_w, starts, ends, counts, k):  # pragma: no cover - compiled
    """Store the flat run [begin, end) cut at row ends from index k on; the next k, -1 when full."""
    r = begin // n_w
    while begin < end:
        if k == starts.size:
            return -1
        stop = min(end, (r + 1) * n_w)
        starts[k] = begin - r * n_w
        ends[k] = stop - r * n_w
        counts[r + 1] += 1
        k += 1
        begin = stop
        r += 1
    return k


@njit(cache=True, nogil=True)
def _scan_flat(flat, words, n_w, starts, ends, counts):  # pragma: no cover - compiled
    """Store the runs of ``flat`` and count them per row; returns their number, -1 when ``starts``
    is too short. The edges in a word are the bits of its byte mask that differ from the bit
    before; the bytes after the last whole word make a zero-padded last word (which ends any run)."""
    n_words = words.size
    tail = np.uint64(0)
    for i in range(8 * n_words, flat.size):
        tail |= np.uint64(flat[i] != 0) << np.uint64(8 * (i - 8 * n_words) + 7)
    k, inside, begin = 0, 0, 0
    w = _skip_words(words, 0, False)
    while True:
        bits = _byte_bits(words[w] if w < n_words else tail)
        edges = (bits ^ ((bits << 1) | inside)) & 0xFF
        while edges:
            i = 8 * w + _CTZ8[edges]
            edges &= edges - 1
            if inside:
                k = _cut(begin, i, n_w, starts, ends, counts, k)
                if k < 0:
                    return -1
            else:
                begin = i
            inside ^= 1
        if w == n_words:
            return k
        w = _skip_words(words, w + 1, inside != 0)


@njit(cache=True, nogil=True)
def line_runs(rows):  # pragma: no cover - compiled
    """Runs of every row of a C-contiguous (n_rows, W) uint8 mask, in one pass over its bytes.

    Returns a row pointer (n_rows + 1,) into int32 starts and ends. The mask is read as one stream
    of 8-byte words (rows need not be word aligned); a run the stream carries over a row end is
    cut there. The arrays start small and the pass is redone with longer ones when they fill up.
    """
    n_rows, n_w = rows.shape
    flat = rows.reshape(-1)
    n = flat.size
    counts = np.zeros(n_rows + 1, np.int64)
    if n == 0:
        return counts, np.empty(0, np.int32), np.empty(0, np.int32)
    words = flat[: 8 * (n // 8)].view(np.uint64)
    most = n_rows * ((n_w + 1) // 2)  # a row holds at most (W + 1) // 2 runs
    cap = min(most, max(1024, n // 256))
    while True:
        starts = np.empty(cap, np.int32)
        ends = np.empty(cap, np.int32)
        k = _scan_flat(flat, words, n_w, starts, ends, counts)
        if k >= 0:
            return np.cumsum(counts), starts[:k].copy(), ends[:k].copy()
        counts[:] = 0
        cap = min(most, 8 * cap)


@njit(cache=True, nogil=True)
def class_runs(m):  # pragma: no cover - compiled
    """Runs of every class of an (S, C, H, W) mask: row pointers (C, S*H + 1) into shared starts
    and ends (int32). Class c's runs of row (s, y) are ``starts[ptr[c, r]:ptr[c, r + 1]]`` with
    r = s * H + y (one pass over the mask, then the runs regrouped class by class)."""
    n_s, n_c, n_h, n_w = m.shape
    ptr_all, s_all, e_all = line_runs(m.reshape((n_s * n_c * n_h, n_w)))  # rows in (s, c, y) order
    n_rows = n_s * n_h
    ptr = np.empty((n_c, n_rows + 1), np.int64)
    starts = np.empty_like(s_all)
    ends = np.empty_like(e_all)
    k = 0
    for c in range(n_c):
        for s in range(n_s):
            for y in range(n_h):
                ptr[c, s * n_h + y] = k
                q = (s * n_c + c) * n_h + y
                for j in range(ptr_all[q], ptr_all[q + 1]):
                    starts[k], ends[k] = s_all[j], e_all[j]
                    k += 1
        ptr[c, n_rows] = k
    return ptr, starts, ends


@njit(cache=True, nogil=True)
def dice_runs(ptr_p, sp, ep, ptr_t, st, et, n_h):  # pragma: no cover - compiled
    """(S, C, 3) int64: |P|, |T|, |P∩T| per (slice, class) from the runs of :func:`class_runs`."""
    n_c, n_s = ptr_p.shape[0], (ptr_p.shape[1] - 1) // n_h
    out = np.zeros((n_s, n_c, 3), np.int64)
    for c in range(n_c):
        for s in range(n_s):
            for r in range(s * n_h, (s + 1) * n_h):
                a, a_end, b, b_end = ptr_p[c, r], ptr_p[c, r + 1], ptr_t[c, r], ptr_t[c, r + 1]
                for k in range(a, a_end):
                    out[s, c, 0] += ep[k] - sp[k]
                for k in range(b, b_end):
                    out[s, c, 1] += et[k] - st[k]
                while a < a_end and b < b_end:  # the overlaps of two sorted run lists
                    out[s, c, 2] += max(0, min(ep[a], et[b]) - max(sp[a], st[b]))
                    if ep[a] < et[b]:
                        a += 1
                    else:
                        b += 1
    return out


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
    d2 = _hausdorff_sq(*runs_a, *runs_b, shape[1], weights)
    return math.sqrt(d2) / _SQRT3
