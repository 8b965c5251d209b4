"""Row runs of masks, read in one pass, and the Dice counts from them (numba kernels of the UW metric).

Masks reach the kernels as C-contiguous uint8, non-zero = foreground. A *row* is (s, y); its
*runs* are the [start, end) intervals of x that are foreground, stored CSR-like: a row pointer
(S*H + 1,) into int32 ``starts`` and ``ends`` (:func:`class_runs` gives one row pointer per
class over shared arrays, :func:`union_runs` the runs of the classes merged, :func:`dice_runs`
the Dice counts from them). The Hausdorff search over runs is
:mod:`pipeline.datasets.uwmgi_metric_hausdorff`.

:func:`line_runs` reads a mask once, eight bytes at a time: blocks of zero words and words inside
a run are skipped, and a word holding run edges yields them all from its byte mask. Every kernel
takes and returns arrays; the tests compare them with plain NumPy twins.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_BLOCK = 16  # zero words skipped at once (one vectorised OR)

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
