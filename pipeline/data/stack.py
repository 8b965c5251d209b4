"""2.5D input: neighbouring slices as channels.

For slice ``i`` of a volume of ``n`` slices the channels are
``[i - k*s, ..., i - s, i, i + s, ..., i + k*s]``, each index clamped to ``[0, n - 1]``.
"""

from __future__ import annotations

import numpy as np


def neighbour_indices(n: int, k: int, stride: int) -> np.ndarray:
    """(n, 2k+1) slice indices of every slice's 2.5D stack, clamped at the volume ends."""
    if n < 1 or k < 0 or stride < 1:
        raise ValueError(f"need n >= 1, k >= 0, stride >= 1; got n={n}, k={k}, stride={stride}")
    offsets = np.arange(-k, k + 1) * stride
    return np.clip(np.arange(n)[:, None] + offsets[None, :], 0, n - 1)
