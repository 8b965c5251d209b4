"""RLE encoding of masks that already live on the GPU (numba.cuda), copying back only the runs.

A run boundary is a flat position ``p`` in ``[0, H*W]`` where the pixel at ``p`` differs from
the pixel at ``p - 1`` (pixels outside the mask count as background); boundaries alternate
run start, run end. Each thread block owns a tile of ``threads * chunk`` positions of one mask:

1. ``_count_tiles`` counts the boundaries of every tile;
2. ``_scan_tiles`` turns tile counts into per-mask offsets (one thread per mask) and totals;
   the host turns the totals into the start of each mask in one compact array;
3. ``_write_tiles`` recounts, scans the per-thread counts in shared memory, and writes every
   boundary in order into the compact array.

Only the per-mask totals and the compact boundaries cross to the host, where
:func:`pipeline.rle_format.runs_to_strings` formats them. ``order="F"`` is index math in the kernels.
numba.cuda is imported on first use, never at import; under ``NUMBA_ENABLE_CUDASIM=1`` the same
code runs in the CUDA simulator on NumPy input.
"""

from __future__ import annotations

import functools
import math
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline.rle_format import check_order, runs_to_strings

__all__ = ["cuda_available", "rle_encode_cuda"]

# numba.cuda, bound by _kernels() on first use. The kernels must find it as a module global:
# the CUDA simulator swaps that global for its per-thread fake (blockIdx, threadIdx, ...).
cuda: Any = None


def cuda_available() -> bool:
    """True when numba.cuda can launch kernels (a GPU, or the simulator)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # a broken driver or toolkit means "no", not a crash
        return False


@functools.cache
def _kernels(threads: int) -> SimpleNamespace:
    """Compile-on-first-use kernels for blocks of ``threads`` threads (a shared-memory size)."""
    global cuda
    from numba import cuda

    @cuda.jit(device=True)
    def value(m, i, p, h, w, fortran):
        if p < 0 or p >= h * w:
            return False
        if fortran:
            return m[i, p % h, p // h] != 0
        return m[i, p // w, p % w] != 0

    @cuda.jit(device=True)
    def chunk_bounds(m, chunk):
        size = m.shape[1] * m.shape[2]
        p0 = (cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x) * chunk
        return p0, min(p0 + chunk, size + 1)

    @cuda.jit(device=True)
    def count_chunk(m, i, p0, p1, fortran):
        h, w = m.shape[1], m.shape[2]
        c = 0
        prev = value(m, i, p0 - 1, h, w, fortran)
        for p in range(p0, p1):
            cur = value(m, i, p, h, w, fortran)
            if cur != prev:
                c += 1
            prev = cur
        return c

    @cuda.jit
    def count_tiles(m, fortran, chunk, tile_counts):
        i, t = cuda.blockIdx.x, cuda.blockIdx.y
        p0, p1 = chunk_bounds(m, chunk)
        c = count_chunk(m, i, p0, p1, fortran)
        if c > 0:
            cuda.atomic.add(tile_counts, (i, t), c)

    @cuda.jit
    def scan_tiles(tile_counts, tile_offsets, mask_counts):
        i = cuda.grid(1)
        if i < tile_counts.shape[0]:
            acc = 0
            for t in range(tile_counts.shape[1]):
                tile_offsets[i, t] = acc
                acc += tile_counts[i, t]
            mask_counts[i] = acc

    @cuda.jit
    def write_tiles(m, fortran, chunk, tile_offsets, mask_starts, out):
        i, t, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        h, w = m.shape[1], m.shape[2]
        p0, p1 = chunk_bounds(m, chunk)
        c = count_chunk(m, i, p0, p1, fortran)
        scan = cuda.shared.array(2 * threads, np.int32)  # Hillis-Steele scan, two halves ping-pong
        scan[tid] = c
        cuda.syncthreads()
        src, step = 0, 1
        while step < threads:
            v = scan[src * threads + tid]
            if tid >= step:
                v += scan[src * threads + tid - step]
            scan[(1 - src) * threads + tid] = v
            cuda.syncthreads()
            src, step = 1 - src, step * 2
        pos = mask_starts[i] + tile_offsets[i, t] + scan[src * threads + tid] - c
        prev = value(m, i, p0 - 1, h, w, fortran)
        for p in range(p0, p1):
            cur = value(m, i, p, h, w, fortran)
            if cur != prev:
                out[pos] = p
                pos += 1
            prev = cur

    return SimpleNamespace(count=count_tiles, scan=scan_tiles, write=write_tiles)


def _device_masks(masks: Any) -> tuple[Any, Any]:
    """(N, H, W) device view of ``masks`` (torch CUDA tensor, CUDA array or host array) and a stream."""
    from numba import cuda

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(masks, torch.Tensor):
        if not masks.is_cuda:
            raise ValueError("rle_encode_cuda got a CPU tensor: use pipeline.rle.encode_masks")
        if masks.ndim < 3:
            raise ValueError(f"expected (N, H, W) or (N, C, H, W) masks, got shape {tuple(masks.shape)}")
        masks = masks.detach()
        if masks.dtype not in (torch.uint8, torch.bool):
            masks = masks != 0
        masks = masks.reshape(-1, *masks.shape[-2:])
        stream = cuda.external_stream(torch.cuda.current_stream(masks.device).cuda_stream)
        return cuda.as_cuda_array(masks), stream
    if hasattr(masks, "__cuda_array_interface__") or hasattr(masks, "copy_to_host"):
        if not hasattr(masks, "copy_to_host"):  # CuPy & co; numba (and simulator) arrays pass as they are
            masks = cuda.as_cuda_array(masks)
        if masks.ndim < 3:
            raise ValueError(f"expected (N, H, W) or (N, C, H, W) masks, got shape {masks.shape}")
        return masks.reshape(-1, *masks.shape[-2:]), cuda.default_stream()
    host = np.asarray(masks)
    if host.ndim < 3:
        raise ValueError(f"expected (N, H, W) or (N, C, H, W) masks, got shape {host.shape}")
    host = np.ascontiguousarray(host if host.dtype in (np.uint8, np.bool_) else host != 0)
    return cuda.to_device(host.reshape(-1, *host.shape[-2:])), cuda.default_stream()


def rle_encode_cuda(masks: object, order: str = "C", *, threads: int = 256, chunk: int = 16) -> list[str]:
    """Encode GPU masks shaped ``(..., H, W)``, one string per mask (leading axes in C order).

    ``masks`` is a torch CUDA tensor or any CUDA array (used in place, on torch's current stream);
    a host array is copied to the device first (for tests under the CUDA simulator). ``threads``
    and ``chunk`` set the tile of ``threads * chunk`` positions each thread block scans.
    """
    from numba import cuda

    check_order(order)
    dev, stream = _device_masks(masks)
    count, h, w = dev.shape
    if count == 0 or h * w == 0:
        return [""] * count
    k = _kernels(threads)
    tiles = math.ceil((h * w + 1) / (threads * chunk))
    fortran = order == "F"
    tile_counts = cuda.to_device(np.zeros((count, tiles), np.int32), stream=stream)
    tile_offsets = cuda.device_array((count, tiles), np.int32, stream=stream)
    mask_counts = cuda.device_array(count, np.int64, stream=stream)
    k.count[(count, tiles), threads, stream](dev, fortran, chunk, tile_counts)
    k.scan[math.ceil(count / 32), 32, stream](tile_counts, tile_offsets, mask_counts)
    totals = mask_counts.copy_to_host(stream=stream)
    stream.synchronize()
    mask_starts = np.zeros(count + 1, np.int64)
    np.cumsum(totals, out=mask_starts[1:])
    if mask_starts[-1] == 0:
        return [""] * count
    bounds = cuda.device_array(int(mask_starts[-1]), np.int32, stream=stream)
    k.write[(count, tiles), threads, stream](
        dev, fortran, chunk, tile_offsets, cuda.to_device(mask_starts[:-1], stream=stream), bounds
    )
    host = bounds.copy_to_host(stream=stream).astype(np.int64)
    stream.synchronize()
    return runs_to_strings(host[0::2] + 1, host[1::2] - host[0::2], mask_starts // 2)
