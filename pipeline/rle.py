"""Run-length encoding of binary masks (Kaggle format): 1-indexed ``start length`` pairs.

UW-Madison GI Tract flattens masks row-major (``order="C"``); Ultrasound Nerve Segmentation
flattens them column-major (``order="F"``). Any non-zero mask value counts as foreground.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import sys

import numpy as np
from numba import njit, prange

__all__ = [
    "RLEError",
    "encode_masks",
    "rle_decode",
    "rle_decode_batch",
    "rle_encode",
    "rle_encode_batch",
    "rle_encode_numpy",
    "runs_to_strings",
]

log = logging.getLogger(__name__)

_ORDERS = ("C", "F")
_TOKENS = re.compile(r"-?[0-9]+(?:\s+-?[0-9]+)*")
_TOKEN = re.compile(r"-?[0-9]+")


class RLEError(ValueError):
    """A run-length string that cannot be decoded onto the given mask shape."""


def check_order(order: str) -> None:
    """Raise ValueError unless ``order`` is "C" (row-major) or "F" (column-major)."""
    if order not in _ORDERS:
        raise ValueError(f"order must be 'C' (row-major, UW-Madison) or 'F' (column-major), got {order!r}")


def _is_empty(rle: object) -> bool:
    if rle is None:
        return True
    if isinstance(rle, str):
        return not rle.strip()
    if isinstance(rle, float | np.floating):
        return math.isnan(rle)
    pandas = sys.modules.get("pandas")  # pd.NA can only come from an imported pandas
    return pandas is not None and rle is pandas.NA


def rle_encode_numpy(mask: np.ndarray, order: str = "C") -> str:
    """Plain NumPy reference encoder: the twin the fast paths are tested against."""
    check_order(order)
    flat = np.asarray(mask).ravel(order=order) != 0
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    edges[1::2] -= edges[::2]
    edges[::2] += 1
    return " ".join(map(str, edges.tolist()))


# ---------------------------------------------------------------- numba kernels
# Kernels see masks as uint8 (bool viewed as uint8, other dtypes as ``!= 0``). A scan returns the
# number of runs of one mask and stores the first ``limit`` of them (1-indexed start, length) at
# ``base``; a batch scans once into ``cap`` slots per mask and rescans only the rare mask with
# more runs. Row-major scans read the batch buffer 8 bytes at a time (``words``) and skip whole
# words that cannot hold a boundary; column-major scans walk occupied columns in the occupied
# row span only.

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
def _find_runs(masks, fortran):  # pragma: no cover - compiled
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
def _format_runs(starts, lengths, run_off):  # pragma: no cover - compiled
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
def _encode_one(mask, fortran):  # pragma: no cover - compiled
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
def _paint_runs(out, run_off, starts, lengths):  # pragma: no cover - compiled
    for i in prange(out.shape[0]):
        for r in range(run_off[i], run_off[i + 1]):
            out[i, starts[r] : starts[r] + lengths[r]] = 1


# ---------------------------------------------------------------- encoding API


def _as_uint8(masks: np.ndarray) -> np.ndarray:
    """C-contiguous uint8 masks where non-zero means foreground (a view where possible)."""
    if masks.dtype == np.uint8 or masks.dtype == np.bool_:
        return np.ascontiguousarray(masks).view(np.uint8)
    return (masks != 0).view(np.uint8)


def runs_to_strings(starts: np.ndarray, lengths: np.ndarray, run_offsets: np.ndarray) -> list[str]:
    """Format 1-indexed runs into RLE strings; mask ``i`` owns runs ``run_offsets[i]:run_offsets[i+1]``."""
    buf, byte_off = _format_runs(
        np.ascontiguousarray(starts, np.int64),
        np.ascontiguousarray(lengths, np.int64),
        np.ascontiguousarray(run_offsets, np.int64),
    )
    text = buf.tobytes().decode("ascii")
    offs = byte_off.tolist()
    return [text[a:b] for a, b in itertools.pairwise(offs)]


def rle_encode(mask: np.ndarray, order: str = "C") -> str:
    """Encode one 2-D mask (non-zero = foreground); an empty mask gives ``""``."""
    check_order(order)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    if mask.size == 0:
        return ""
    return _encode_one(_as_uint8(mask), order == "F").tobytes().decode("ascii")


def rle_encode_batch(masks: np.ndarray, order: str = "C") -> list[str]:
    """Encode masks shaped ``(..., H, W)``: one string per mask, leading axes flattened in C order."""
    check_order(order)
    masks = np.asarray(masks)
    if masks.ndim < 3:
        raise ValueError(f"rle_encode_batch expects (N, H, W) or (N, C, H, W) masks, got shape {masks.shape}")
    h, w = masks.shape[-2:]
    count = math.prod(masks.shape[:-2])
    if count == 0 or h * w == 0:
        return [""] * count
    return runs_to_strings(*_find_runs(_as_uint8(masks).reshape(count, h, w), order == "F"))


def encode_masks(masks: object, order: str = "C") -> list[str]:
    """Encode a batch ``(..., H, W)`` on the GPU when given a CUDA tensor, else with numba on the CPU.

    Accepts NumPy arrays and torch tensors (CPU or CUDA); a CUDA tensor is encoded in place and
    only its runs are copied to the host.
    """
    torch = sys.modules.get("torch")  # a torch tensor implies torch is already imported
    if torch is not None and isinstance(masks, torch.Tensor):
        if masks.is_cuda:
            from pipeline import rle_cuda

            if rle_cuda.cuda_available():
                return rle_cuda.rle_encode_cuda(masks, order)
            log.warning("numba.cuda is not usable: encoding CUDA masks on the CPU")
        masks = masks.detach().cpu().numpy()
    return rle_encode_batch(np.asarray(masks), order)


# ---------------------------------------------------------------- decoding API


def _parse_runs(rle: object, size: int, shape: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed starts and lengths of one RLE string (empty arrays when empty)."""
    pfx = f"{where}: " if where else ""
    if _is_empty(rle):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if not isinstance(rle, str):
        raise RLEError(f"{pfx}RLE must be a string, got {type(rle).__name__} {rle!r}")
    text = rle.strip()
    tokens = text.split()
    if not _TOKENS.fullmatch(text):
        bad = next((k, t) for k, t in enumerate(tokens) if not _TOKEN.fullmatch(t))
        raise RLEError(
            f"{pfx}RLE token {bad[0]} ({bad[1]!r}) is not an integer; expected 'start length' pairs"
        )
    if len(tokens) % 2:
        raise RLEError(f"{pfx}RLE has an odd number of tokens ({len(tokens)}); expected 'start length' pairs")
    try:
        values = np.fromiter(map(int, tokens), np.int64, count=len(tokens))
    except OverflowError:
        raise RLEError(f"{pfx}RLE holds an integer too large for a {shape[0]}x{shape[1]} mask") from None
    starts, lengths = values[::2], values[1::2]
    _check_runs(starts, lengths, size, shape, pfx)
    return starts - 1, lengths


def _check_runs(starts: np.ndarray, lengths: np.ndarray, size: int, shape: tuple[int, int], pfx: str) -> None:
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        r = bad[0]
        raise RLEError(f"{pfx}RLE run {r} has start {starts[r]} < 1; starts are 1-indexed pixel positions")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        r = bad[0]
        raise RLEError(f"{pfx}RLE run {r} (start {starts[r]}) has length {lengths[r]}; lengths must be >= 1")
    bad = np.flatnonzero((starts > size) | (lengths > size - starts + 1))
    if bad.size:
        r = bad[0]
        raise RLEError(
            f"{pfx}RLE run {r} (start {starts[r]}, length {lengths[r]}) is out of bounds: it ends at pixel "
            f"{starts[r] + lengths[r] - 1} but the {shape[0]}x{shape[1]} mask has {size} pixels "
            "(wrong image shape?)"
        )
    bad = np.flatnonzero(starts[1:] < starts[:-1] + lengths[:-1])
    if bad.size:
        r = bad[0] + 1
        raise RLEError(
            f"{pfx}RLE run {r} (start {starts[r]}) begins before the previous run "
            f"(start {starts[r - 1]}, length {lengths[r - 1]}) ends: runs must be sorted and must not overlap"
        )


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or any(int(s) != s or s < 0 for s in shape):
        raise ValueError(f"shape must be (height, width) with non-negative integers, got {shape!r}")
    return int(shape[0]), int(shape[1])


def rle_decode(rle: str, shape: tuple[int, int], order: str = "C", *, where: str = "") -> np.ndarray:
    """Decode one RLE string into a ``shape`` uint8 0/1 mask; ``where`` prefixes error messages.

    An empty string, whitespace, None or NaN decode to an empty mask. Malformed strings raise
    :class:`RLEError`.
    """
    check_order(order)
    h, w = _check_shape(tuple(shape))
    starts, lengths = _parse_runs(rle, h * w, (h, w), where)
    flat = np.zeros(h * w, np.uint8)
    for s, n in zip(starts.tolist(), lengths.tolist()):
        flat[s : s + n] = 1
    return np.ascontiguousarray(flat.reshape((h, w), order=order))


def rle_decode_batch(
    rles: object, shape: tuple[int, int], order: str = "C", *, where: str = ""
) -> np.ndarray:
    """Decode a sequence of RLE strings into an ``(N, H, W)`` uint8 0/1 array, validating each.

    Errors name the item: ``"<where> item 3: RLE run ..."``.
    """
    check_order(order)
    h, w = _check_shape(tuple(shape))
    parsed = []
    for i, rle in enumerate(rles):
        try:
            parsed.append(_parse_runs(rle, h * w, (h, w), ""))
        except RLEError as err:
            raise RLEError(f"{where + ' ' if where else ''}item {i}: {err}") from None
    counts = np.array([len(s) for s, _ in parsed], np.int64)
    run_off = np.zeros(len(parsed) + 1, np.int64)
    np.cumsum(counts, out=run_off[1:])
    flat = np.zeros((len(parsed), h * w), np.uint8)
    if run_off[-1]:
        starts = np.concatenate([s for s, _ in parsed])
        lengths = np.concatenate([n for _, n in parsed])
        _paint_runs(flat, run_off, starts, lengths)
    if order == "C":
        return flat.reshape(-1, h, w)
    return np.ascontiguousarray(flat.reshape(-1, w, h).transpose(0, 2, 1))
