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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from pipeline.errors import PipelineError
from pipeline.rle_format import as_uint8, check_order, runs_to_strings, split_text
from pipeline.rle_numba import encode_batch, encode_one, paint_runs
from pipeline.runtime import available_cores

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

_TOKENS = re.compile(r"-?[0-9]+(?:\s+-?[0-9]+)*")
_TOKEN = re.compile(r"-?[0-9]+")


class RLEError(PipelineError, ValueError):
    """A run-length string that cannot be decoded onto the given mask shape."""


def _np_order(order: str) -> Literal["C", "F"]:
    """An order :func:`check_order` accepted, as NumPy's type stubs spell it."""
    return "F" if order == "F" else "C"


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
    flat = np.asarray(mask).ravel(order=_np_order(order)) != 0
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    edges[1::2] -= edges[::2]
    edges[::2] += 1
    return " ".join(map(str, edges.tolist()))


# ---------------------------------------------------------------- numba kernels
# Kernels (pipeline.rle_numba) see masks as uint8 (bool viewed as uint8, other dtypes as ``!= 0``).
# Row-major scans read 64 bytes at a time and skip zero spans at memory speed; column-major scans
# transpose only the bounding box of the row-major runs. Runs are formatted into one uint8 text
# buffer per call, decoded once and sliced per mask. Batches over ``_PARALLEL_BYTES`` are cut
# into one slice per core, encoded on threads (the kernels release the GIL, and numba's own
# threading layer slows down badly once torch is imported).

# ---------------------------------------------------------------- encoding API


def rle_encode(mask: np.ndarray, order: str = "C") -> str:
    """Encode one 2-D mask (non-zero = foreground); an empty mask gives ``""``."""
    check_order(order)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    if mask.size == 0:
        return ""
    return encode_one(as_uint8(mask), order == "F").tobytes().decode("ascii")


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
    masks = as_uint8(masks).reshape(count, h, w)
    fortran = order == "F"
    parts = _chunks(masks)
    if len(parts) == 1:
        return split_text(*encode_batch(masks, fortran))
    futures = [_pool().submit(encode_batch, part, fortran) for part in parts[1:]]
    out = split_text(*encode_batch(parts[0], fortran))  # this thread takes the first slice
    for future in futures:
        out += split_text(*future.result())
    return out


_PARALLEL_BYTES = 8 << 20  # batches this large are split across threads (the kernels release the GIL)
_executor: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _executor:
        _executor.append(ThreadPoolExecutor(available_cores() - 1, thread_name_prefix="rle"))
    return _executor[0]


def _chunks(masks: np.ndarray) -> list[np.ndarray]:
    """The batch cut into one contiguous slice per core, or whole when small or on one core."""
    cores = min(available_cores(), len(masks))
    if cores < 2 or masks.nbytes < _PARALLEL_BYTES:
        return [masks]
    bounds = np.linspace(0, len(masks), cores + 1).astype(int)
    return [masks[a:b] for a, b in itertools.pairwise(bounds.tolist())]


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


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
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
    return np.ascontiguousarray(flat.reshape((h, w), order=_np_order(order)))


def rle_decode_batch(
    rles: Iterable[object], shape: tuple[int, int], order: str = "C", *, where: str = ""
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
        paint_runs(flat, run_off, starts, lengths)
    if order == "C":
        return flat.reshape(-1, h, w)
    return np.ascontiguousarray(flat.reshape(-1, w, h).transpose(0, 2, 1))
