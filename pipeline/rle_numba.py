"""Numba kernels of the RLE encoder: run finding (row- and column-major) and digit formatting.

Arrays in, arrays out; :mod:`pipeline.rle` wraps them and its NumPy twin ``rle_encode_numpy``
is what the tests compare them with.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, prange

_CAP = 256  # run slots per mask in a batch before a mask is rescanned into exact storage
_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_ZERO = np.uint64(0)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_GATHER = np.uint64(0x0102040810204080)  # moves bit 7 of byte i to bit 56 + i
_BITPOS = np.zeros(256, np.int64)  # bit index of a power of two below 256
_BITPOS[1 << np.arange(8)] = np.arange(8)
_LITTLE = sys.byteorder == "little"  # word bit tricks assume byte i is the i-th lowest byte


@njit(cache=True, nogil=True)
def _close(starts, lengths, base, n, begin, end, limit):  # pragma: no cover - compiled
    if n < limit:
        starts[base + n] = begin + 1
        lengths[base + n] = end - begin
    return n + 1


@njit(cache=True, nogil=True)
def _scan_bytes(flat, lo, hi, g0, n, begin, inside, starts, lengths, base, limit):  # pragma: no cover
    for k in range(lo, hi):
        if (flat[k] != 0) != inside:
            if inside:
                n = _close(starts, lengths, base, n, begin, k - g0, limit)
            else:
                begin = k - g0
            inside = not inside
    return n, begin, inside


@njit(cache=True, nogil=True)
def _scan_word(v, p, n, begin, inside, starts, lengths, base, limit):  # pragma: no cover - compiled
    """Boundaries inside one 8-byte word ``v`` whose first byte is mask position ``p``."""
    nonzero = (((v & _LOW7) + _LOW7) | v) & _HIGH  # bit 7 of each non-zero byte
    bits = ((nonzero >> np.uint64(7)) * _GATHER) >> np.uint64(56)  # bit i: byte i is non-zero
    edges = (bits ^ ((bits << np.uint64(1)) | np.uint64(inside))) & np.uint64(0xFF)
    while edges != 0:
        low = edges & (~edges + np.uint64(1))
        k = p + _BITPOS[low]
        if inside:
            n = _close(starts, lengths, base, n, begin, k, limit)
        else:
            begin = k
        inside = not inside
        edges ^= low
    return n, begin, inside


@njit(cache=True, nogil=True)
def _skip_zeros(words, wi, w1, span):  # pragma: no cover - compiled
    """First index from ``wi`` (in steps of ``span``) whose next ``span`` words are not all zero."""
    while wi + span <= w1:
        acc = _ZERO
        for k in range(span):
            acc |= words[wi + k]
        if acc != 0:
            break
        wi += span
    return wi


@njit(cache=True, nogil=True)
def _scan_c(flat, words, g0, size, starts, lengths, base, limit):  # pragma: no cover - compiled
    """Runs of ``flat[g0 : g0 + size]``; ``words`` is the uint64 view of ``flat``'s whole words."""
    end = g0 + size
    w0 = (g0 + 7) // 8  # whole words [w0, w1) lie inside the mask, bytes around them are scanned
    w1 = max(w0, end // 8)
    head = min(end, w0 * 8)
    n, begin, inside = _scan_bytes(flat, g0, head, g0, 0, 0, False, starts, lengths, base, limit)
    wi = w0
    while wi < w1:
        if inside:  # skip words without a zero byte: the run goes on
            while wi < w1 and ((words[wi] - _ONES) & ~words[wi] & _HIGH) == 0:
                wi += 1
        else:  # skip zero words: 256, then 32 bytes at a time, then word by word
            wi = _skip_zeros(words, _skip_zeros(words, wi, w1, 32), w1, 4)
            while wi < w1 and words[wi] == 0:
                wi += 1
        if wi < w1:
            if _LITTLE:
                n, begin, inside = _scan_word(
                    words[wi], wi * 8 - g0, n, begin, inside, starts, lengths, base, limit
                )
            else:
                n, begin, inside = _scan_bytes(
                    flat, wi * 8, wi * 8 + 8, g0, n, begin, inside, starts, lengths, base, limit
                )
            wi += 1
    n, begin, inside = _scan_bytes(
        flat, max(head, w1 * 8), end, g0, n, begin, inside, starts, lengths, base, limit
    )
    if inside:
        n = _close(starts, lengths, base, n, begin, size, limit)
    return n


@njit(cache=True, nogil=True)
def _scan_f(m, starts, lengths, base, limit):  # pragma: no cover - compiled
    """Runs of the (H, W) mask ``m`` flattened column-major."""
    h, w = m.shape
    rows = np.zeros(h, np.uint8)
    cols = np.zeros(w, np.uint8)
    for y in range(h):
        r = np.uint8(0)
        for x in range(w):
            v = m[y, x]
            cols[x] |= v
            r |= v
        rows[y] = r
    y0, y1 = h, 0
    for y in range(h):
        if rows[y]:
            y0 = min(y0, y)
            y1 = y + 1
    n, begin, inside = 0, 0, False
    for x in range(w):
        p0 = x * h
        if inside and (cols[x] == 0 or y0 > 0):
            n = _close(starts, lengths, base, n, begin, p0, limit)
            inside = False
        if cols[x] == 0:
            continue
        for y in range(y0, y1):
            if (m[y, x] != 0) != inside:
                if inside:
                    n = _close(starts, lengths, base, n, begin, p0 + y, limit)
                else:
                    begin = p0 + y
                inside = not inside
        if inside and y1 < h:
            n = _close(starts, lengths, base, n, begin, p0 + y1, limit)
            inside = False
    if inside:
        n = _close(starts, lengths, base, n, begin, h * w, limit)
    return n


@njit(cache=True, nogil=True)
def _words(masks):  # pragma: no cover - compiled
    """The batch's bytes and the uint64 view of its whole 8-byte words."""
    flat = masks.reshape(masks.size)
    if flat.ctypes.data % 8:  # keep the uint64 view aligned
        flat = flat.copy()
    return flat, flat[: flat.size // 8 * 8].view(np.uint64)


@njit(cache=True, nogil=True)
def _scan(masks, flat, words, i, fortran, starts, lengths, base, limit):  # pragma: no cover - compiled
    if fortran:
        return _scan_f(masks[i], starts, lengths, base, limit)
    size = masks.shape[1] * masks.shape[2]
    return _scan_c(flat, words, i * size, size, starts, lengths, base, limit)


@njit(cache=True, parallel=True)
def find_runs(masks, fortran):  # pragma: no cover - compiled
    """Runs of every mask of the (N, H, W) batch: (starts, lengths, run offsets)."""
    flat, words = _words(masks)
    count = masks.shape[0]
    slot_starts = np.empty(count * _CAP, np.int64)
    slot_lengths = np.empty(count * _CAP, np.int64)
    counts = np.empty(count, np.int64)
    for i in prange(count):
        counts[i] = _scan(masks, flat, words, i, fortran, slot_starts, slot_lengths, i * _CAP, _CAP)
    run_off = np.zeros(count + 1, np.int64)
    for i in range(count):
        run_off[i + 1] = run_off[i] + counts[i]
    starts = np.empty(run_off[count], np.int64)
    lengths = np.empty(run_off[count], np.int64)
    for i in prange(count):
        if counts[i] > _CAP:
            _scan(masks, flat, words, i, fortran, starts, lengths, run_off[i], counts[i])
        else:
            for r in range(counts[i]):
                starts[run_off[i] + r] = slot_starts[i * _CAP + r]
                lengths[run_off[i] + r] = slot_lengths[i * _CAP + r]
    return starts, lengths, run_off


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


@njit(cache=True, parallel=True)
def format_runs(starts, lengths, run_off):  # pragma: no cover - compiled
    n = run_off.size - 1
    byte_off = np.zeros(n + 1, np.int64)
    for i in prange(n):
        byte_off[i + 1] = _text_size(starts, lengths, run_off[i], run_off[i + 1])
    for i in range(n):
        byte_off[i + 1] += byte_off[i]
    buf = np.empty(byte_off[n], np.uint8)
    for i in prange(n):
        _put_text(buf, byte_off[i], starts, lengths, run_off[i], run_off[i + 1])
    return buf, byte_off


@njit(cache=True, nogil=True)
def encode_one(mask, fortran):  # pragma: no cover - compiled
    """RLE text (uint8 bytes) of one (H, W) mask."""
    masks = mask.reshape((1, mask.shape[0], mask.shape[1]))
    flat, words = _words(masks)
    starts = np.empty(_CAP, np.int64)
    lengths = np.empty(_CAP, np.int64)
    n = _scan(masks, flat, words, 0, fortran, starts, lengths, 0, _CAP)
    if n > _CAP:
        starts = np.empty(n, np.int64)
        lengths = np.empty(n, np.int64)
        _scan(masks, flat, words, 0, fortran, starts, lengths, 0, n)
    buf = np.empty(_text_size(starts, lengths, 0, n), np.uint8)
    _put_text(buf, 0, starts, lengths, 0, n)
    return buf


@njit(cache=True, parallel=True)
def paint_runs(out, run_off, starts, lengths):  # pragma: no cover - compiled
    for i in prange(out.shape[0]):
        for r in range(run_off[i], run_off[i + 1]):
            out[i, starts[r] : starts[r] + lengths[r]] = 1
