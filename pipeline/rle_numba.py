"""Numba kernels of the RLE encoder: run finding (row- and column-major) and digit formatting.

Arrays in, arrays out; :mod:`pipeline.rle` wraps them and its NumPy twin ``rle_encode_numpy``
is what the tests compare them with.

A row-major scan reads the mask 64 bytes (eight uint64 words) at a time: a block whose words
are all zero is skipped with a few ORs, any other block becomes a 64-bit "non-zero byte" mask
whose edges (bit changes) are the run boundaries. A column-major scan first finds the row-major
runs, paints them transposed into a small grid covering their bounding box, and scans that.
A scan returns the number of runs and stores the first ``limit`` of them (1-indexed start,
length) at ``base``; callers rescan into larger storage in the rare case it was too small.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

_LITTLE = sys.byteorder == "little"  # the word tricks assume byte i is the i-th lowest byte
_CAP = 512  # initial run storage
_U1 = np.uint64(1)
_U7 = np.uint64(7)
_U56 = np.uint64(56)
_FULL = np.uint64(0xFFFFFFFFFFFFFFFF)
_HIGH = np.uint64(0x8080808080808080)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_GATHER = np.uint64(0x0102040810204080)  # moves bit 8i (byte i's flag) to bit 56 + i


@njit(cache=True, nogil=True, inline="always")
def _byte_flags(v):  # pragma: no cover - compiled
    """8-bit mask: bit i set when byte i of word ``v`` is non-zero."""
    nonzero = (((v & _LOW7) + _LOW7) | v) & _HIGH
    return ((nonzero >> _U7) * _GATHER) >> _U56


@njit(cache=True, nogil=True, inline="always")
def _block_or(words, w):  # pragma: no cover - compiled
    acc = np.uint64(0)
    for j in range(np.uintp(w), np.uintp(w + 8)):
        acc |= words[j]
    return acc


@njit(cache=True, nogil=True, inline="always")
def _span_or(words, w):  # pragma: no cover - compiled
    """OR of the 256 words (32 blocks, 2 KiB) from ``w``; long spans keep the loads streaming."""
    acc = np.uint64(0)
    for j in range(np.uintp(w), np.uintp(w + 256)):  # unsigned: no negative-index wraparound
        acc |= words[j]
    return acc


@njit(cache=True, nogil=True)
def _slow_block(flat, lo):  # pragma: no cover - compiled
    """Non-zero mask of ``flat[lo : lo + 64]``, clipped to the array (head, tail, big-endian)."""
    bits = np.uint64(0)
    for k in range(max(lo, 0), min(lo + 64, flat.size)):
        if flat[k] != 0:
            bits |= _U1 << np.uint64(k - lo)
    return bits


@njit(cache=True, nogil=True)
def _aligned_words(flat):  # pragma: no cover - compiled
    """(offset, words): the uint64 view of ``flat``'s whole aligned words, which start at ``offset``."""
    off = (8 - flat.ctypes.data % 8) % 8
    if not _LITTLE or off >= flat.size:
        return 0, np.empty(0, np.uint64)
    nwords = (flat.size - off) // 8
    return off, flat[off : off + nwords * 8].view(np.uint64)


@njit(cache=True, nogil=True)
def _scan_c(flat, off, words, g0, end, starts, lengths, base, limit):  # pragma: no cover - compiled
    """Runs of ``flat[g0:end]`` (row-major order); starts are 1-indexed from ``g0``."""
    n = 0
    inside = np.uint64(0)  # 1 while in a run (the previous byte was non-zero)
    begin = 0
    nwords = words.size
    b0 = (g0 - off + 64) // 64 - 1  # block b covers flat[off + 64 b : off + 64 b + 64]
    b1 = (end - off + 63) // 64
    fast_end = min(b1, nwords // 8)  # blocks [0, fast_end) are whole words of the view
    b = b0
    while b < b1:
        if inside == 0 and b >= 0:  # skip zero blocks
            while b + 32 <= fast_end and _span_or(words, 8 * b) == 0:
                b += 32
            while b < fast_end and _block_or(words, 8 * b) == 0:
                b += 1
            if b == b1:
                break
        lo = off + 64 * b
        w = 8 * b
        if b >= 0 and b < fast_end:
            bits = np.uint64(0)
            for j in range(8):
                bits |= _byte_flags(words[np.uintp(w + j)]) << np.uint64(8 * j)
        else:
            bits = _slow_block(flat, lo)
        b += 1
        if lo < g0:
            bits &= _FULL << np.uint64(g0 - lo)
        if lo + 64 > end:
            bits &= (_U1 << np.uint64(end - lo)) - _U1
        edges = bits ^ ((bits << _U1) | inside)
        inside = bits >> np.uint64(63)
        while edges != 0:
            k = lo + trailing_zeros(edges) - g0
            edges &= edges - _U1
            if begin < 0:  # closing edge
                if n < limit:
                    starts[base + n] = -begin
                    lengths[base + n] = k + 1 + begin
                n += 1
                begin = 0
            else:
                begin = -(k + 1)
    if begin < 0:  # a run reaching the mask's end
        if n < limit:
            starts[base + n] = -begin
            lengths[base + n] = end - g0 + 1 + begin
        n += 1
    return n


@njit(cache=True, nogil=True)
def _scan_f(flat, off, words, g0, h, w, starts, lengths, base, limit):  # pragma: no cover - compiled
    """Runs of the (H, W) mask ``flat[g0 : g0 + h * w]`` (row-major bytes) in column-major order."""
    cap = 256
    rs = np.empty(cap, np.int64)
    rl = np.empty(cap, np.int64)
    nr = _scan_c(flat, off, words, g0, g0 + h * w, rs, rl, 0, cap)
    if nr == 0:
        return 0
    if nr > cap:
        rs = np.empty(nr, np.int64)
        rl = np.empty(nr, np.int64)
        _scan_c(flat, off, words, g0, g0 + h * w, rs, rl, 0, nr)
    y0 = (rs[0] - 1) // w
    y1 = (rs[nr - 1] + rl[nr - 1] - 2) // w + 1
    x0, x1 = w, 0
    for r in range(nr):
        a = rs[r] - 1
        e = a + rl[r]
        if e - a >= w or a // w != (e - 1) // w:  # wraps a row end: spans every column
            x0, x1 = 0, w
            break
        x0 = min(x0, a % w)
        x1 = max(x1, (e - 1) % w + 1)
    hb = y1 - y0 + 1  # grid rows are columns x0..x1-1, each hb bytes with a zero at the end
    grid_words = ((x1 - x0) * hb + 63) // 64 * 8
    grid = np.zeros(grid_words, np.uint64).view(np.uint8)
    for r in range(nr):
        a = rs[r] - 1
        e = a + rl[r]
        while a < e:
            y = a // w
            xa = a % w
            xe = min(w, xa + e - a)
            row = (xa - x0) * hb + y - y0
            for _ in range(xa, xe):
                grid[row] = 1
                row += hb
            a += xe - xa
    ns = grid_words * 8  # the grid's runs, mapped to column-major mask positions and merged
    gs = np.empty(min(ns, max(cap, 2 * nr)), np.int64)
    gl = np.empty(gs.size, np.int64)
    ng = _scan_c(grid, 0, grid.view(np.uint64), 0, grid.size, gs, gl, 0, gs.size)
    if ng > gs.size:
        gs = np.empty(ng, np.int64)
        gl = np.empty(ng, np.int64)
        _scan_c(grid, 0, grid.view(np.uint64), 0, grid.size, gs, gl, 0, ng)
    n = 0
    last_end = -1
    for r in range(ng):
        col = (gs[r] - 1) // hb
        start = (x0 + col) * h + y0 + (gs[r] - 1) % hb + 1
        if start == last_end and n > 0:  # continues the previous run across a column end
            if n <= limit:
                lengths[base + n - 1] += gl[r]
        else:
            if n < limit:
                starts[base + n] = start
                lengths[base + n] = gl[r]
            n += 1
        last_end = start + gl[r]
    return n


@njit(cache=True, nogil=True)
def _scan(flat, off, words, g0, h, w, fortran, starts, lengths, base, limit):  # pragma: no cover
    if fortran:
        return _scan_f(flat, off, words, g0, h, w, starts, lengths, base, limit)
    return _scan_c(flat, off, words, g0, g0 + h * w, starts, lengths, base, limit)


@njit(cache=True, nogil=True)
def find_runs(masks, fortran):  # pragma: no cover - compiled
    """Runs of every mask of the C-contiguous (N, H, W) uint8 batch: (starts, lengths, run offsets)."""
    count, h, w = masks.shape
    flat = masks.reshape(masks.size)
    off, words = _aligned_words(flat)
    size = h * w
    starts = np.empty(_CAP, np.int64)
    lengths = np.empty(_CAP, np.int64)
    run_off = np.zeros(count + 1, np.int64)
    used = 0
    for i in range(count):
        room = starts.size - used
        n = _scan(flat, off, words, i * size, h, w, fortran, starts, lengths, used, room)
        if n > room:
            grown = max(2 * starts.size, used + n)
            new_starts = np.empty(grown, np.int64)
            new_lengths = np.empty(grown, np.int64)
            new_starts[:used] = starts[:used]
            new_lengths[:used] = lengths[:used]
            starts, lengths = new_starts, new_lengths
            _scan(flat, off, words, i * size, h, w, fortran, starts, lengths, used, n)
        used += n
        run_off[i + 1] = used
    return starts[:used], lengths[:used], run_off


@njit(cache=True, nogil=True)
def _ndigits(v):  # pragma: no cover - compiled
    d = 1
    while v >= 10:
        v //= 10
        d += 1
    return d


@njit(cache=True, nogil=True)
def _put_int(buf, pos, v):  # pragma: no cover - compiled
    end = pos + _ndigits(v)
    k = end
    while True:
        k -= 1
        buf[k] = 48 + v % 10
        v //= 10
        if v == 0:
            break
    return end


@njit(cache=True, nogil=True)
def _text_size(starts, lengths, r0, r1):  # pragma: no cover - compiled
    if r1 == r0:
        return 0
    size = 2 * (r1 - r0) - 1
    for r in range(r0, r1):
        size += _ndigits(starts[r]) + _ndigits(lengths[r])
    return size


@njit(cache=True, nogil=True)
def _put_text(buf, pos, starts, lengths, r0, r1):  # pragma: no cover - compiled
    for r in range(r0, r1):
        if r > r0:
            buf[pos] = 32
            pos += 1
        pos = _put_int(buf, pos, starts[r])
        buf[pos] = 32
        pos = _put_int(buf, pos + 1, lengths[r])
    return pos


@njit(cache=True, nogil=True)
def format_runs(starts, lengths, run_off):  # pragma: no cover - compiled
    """All masks' RLE text as one uint8 buffer, and the byte offsets where each mask's text starts."""
    n = run_off.size - 1
    byte_off = np.zeros(n + 1, np.int64)
    for i in range(n):
        byte_off[i + 1] = byte_off[i] + _text_size(starts, lengths, run_off[i], run_off[i + 1])
    buf = np.empty(byte_off[n], np.uint8)
    for i in range(n):
        _put_text(buf, byte_off[i], starts, lengths, run_off[i], run_off[i + 1])
    return buf, byte_off


@njit(cache=True, nogil=True)
def encode_one(mask, fortran):  # pragma: no cover - compiled
    """RLE text (uint8 bytes) of one C-contiguous (H, W) uint8 mask."""
    h, w = mask.shape
    flat = mask.reshape(mask.size)
    off, words = _aligned_words(flat)
    starts = np.empty(_CAP, np.int64)
    lengths = np.empty(_CAP, np.int64)
    n = _scan(flat, off, words, 0, h, w, fortran, starts, lengths, 0, _CAP)
    if n > _CAP:
        starts = np.empty(n, np.int64)
        lengths = np.empty(n, np.int64)
        _scan(flat, off, words, 0, h, w, fortran, starts, lengths, 0, n)
    buf = np.empty(_text_size(starts, lengths, 0, n), np.uint8)
    _put_text(buf, 0, starts, lengths, 0, n)
    return buf


@njit(cache=True, parallel=True)
def paint_runs(out, run_off, starts, lengths):  # pragma: no cover - compiled
    for i in prange(out.shape[0]):
        for r in range(run_off[i], run_off[i + 1]):
            out[i, starts[r] : starts[r] + lengths[r]] = 1


@njit(cache=True, nogil=True)
def encode_batch(masks, fortran):  # pragma: no cover - compiled
    """RLE text of every mask of the (N, H, W) uint8 batch: (uint8 text, byte offsets per mask)."""
    return format_runs(*find_runs(masks, fortran))
