"""What the CPU (:mod:`pipeline.rle`) and GPU (:mod:`pipeline.rle_cuda`) encoders share.

The flattening-order check, the one coercion of a mask to uint8 (also used by
:mod:`pipeline.datasets.uwmgi_metric`), and the formatting of 1-indexed runs into RLE strings. It sits below
both encoders so neither imports the other.
"""

from __future__ import annotations

import itertools

import numpy as np

from pipeline.rle_numba import format_runs

__all__ = ["ORDERS", "as_uint8", "check_order", "runs_to_strings", "split_text"]

ORDERS = ("C", "F")


def check_order(order: str) -> None:
    """Raise ValueError unless ``order`` is "C" (row-major) or "F" (column-major)."""
    if order not in ORDERS:
        raise ValueError(f"order must be 'C' (row-major, UW-Madison) or 'F' (column-major), got {order!r}")


def as_uint8(mask: object) -> np.ndarray:
    """C-contiguous uint8 mask(s) where non-zero means foreground: a view for bool/uint8 input.

    Other dtypes (and non-contiguous input) are copied; any non-zero value becomes 1.
    """
    arr = np.asarray(mask)
    if arr.dtype == np.uint8 or arr.dtype == np.bool_:
        return np.ascontiguousarray(arr).view(np.uint8)
    return (arr != 0).view(np.uint8)


def runs_to_strings(starts: np.ndarray, lengths: np.ndarray, run_offsets: np.ndarray) -> list[str]:
    """Format 1-indexed runs into RLE strings; mask ``i`` owns runs ``run_offsets[i]:run_offsets[i+1]``."""
    buf, byte_off = format_runs(
        np.ascontiguousarray(starts, np.int64),
        np.ascontiguousarray(lengths, np.int64),
        np.ascontiguousarray(run_offsets, np.int64),
    )
    return split_text(buf, byte_off)


def split_text(buf: np.ndarray, byte_off: np.ndarray) -> list[str]:
    """The strings of a uint8 text buffer: string ``i`` is ``buf[byte_off[i]:byte_off[i+1]]``."""
    text = buf.tobytes().decode("ascii")
    return [text[a:b] for a, b in itertools.pairwise(byte_off.tolist())]
