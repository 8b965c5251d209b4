"""`python -m stages.bench_rle`: masks/s of the RLE encoders on organ-like masks.

Compares the plain NumPy reference, numba on the CPU (one call per mask, and one call per
batch) and, where CUDA is available, the numba.cuda path on masks already on the GPU. Each
figure is the median over ``--repeats`` timed runs after a warm-up run (JIT compilation).
"""

from __future__ import annotations

import argparse
import logging

import numba
import numpy as np

from pipeline.bench.timing import median_seconds
from pipeline.rle import encode_masks, rle_encode, rle_encode_batch, rle_encode_numpy
from pipeline.runtime import configure_runtime

log = logging.getLogger("stages.bench_rle")

SHAPES = ((266, 266), (276, 276), (310, 360), (384, 384))


def organ_masks(n: int, shape: tuple[int, int], rng: np.random.Generator, empty: float) -> np.ndarray:
    """``n`` bool masks: a share ``empty`` empty, the rest 1-3 wobbly ellipses covering about
    450-5,700 pixels at 276x276 (scaled with the image area), like the real organ labels."""
    h, w = shape
    scale = h * w / 276**2
    masks = np.zeros((n, h, w), bool)
    for i in np.flatnonzero(rng.random(n) >= empty):
        blobs = rng.integers(1, 4)
        for area in rng.uniform(450, 5700) * scale * rng.dirichlet(np.ones(blobs)):
            ratio = rng.uniform(0.4, 1.0)
            a = np.sqrt(area / (np.pi * ratio))  # semi-axes a, a * ratio
            r = int(np.ceil(a * 1.3)) + 1
            cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
            yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
            t = rng.uniform(0, np.pi)
            u = (xx * np.cos(t) + yy * np.sin(t)) / a
            v = (yy * np.cos(t) - xx * np.sin(t)) / (a * ratio)
            wobble = 1 + 0.2 * np.sin(rng.integers(2, 6) * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
            masks[i, cy - r : cy + r + 1, cx - r : cx + r + 1] |= u * u + v * v < wobble**2
    return masks


def cuda_tensor(masks: np.ndarray) -> object | None:
    """The masks as a CUDA uint8 tensor, or None without torch/CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.from_numpy(masks.view(np.uint8)).cuda()


def bench(masks: np.ndarray, order: str, repeats: int) -> dict[str, float]:
    """masks/s per encoder; every encoder must agree with the NumPy reference."""
    ref = [rle_encode_numpy(m, order) for m in masks]
    if rle_encode_batch(masks, order) != ref or [rle_encode(m, order) for m in masks] != ref:
        raise AssertionError("numba encoder disagrees with the NumPy reference")
    runs = {
        "numpy": lambda: [rle_encode_numpy(m, order) for m in masks],
        "numba_single": lambda: [rle_encode(m, order) for m in masks],
        "numba_batch": lambda: rle_encode_batch(masks, order),
    }
    gpu = cuda_tensor(masks)
    if gpu is not None:
        if encode_masks(gpu, order) != ref:
            raise AssertionError("CUDA encoder disagrees with the NumPy reference")
        runs["cuda"] = lambda: encode_masks(gpu, order)
    return {name: len(masks) / median_seconds(fn, repeats) for name, fn in runs.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="masks per image size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--orders", nargs="+", default=["C", "F"], choices=["C", "F"])
    parser.add_argument("--empty", type=float, default=0.58, help="share of empty masks (real: ~0.58)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="numba threads (0: all cores)")
    args = parser.parse_args(argv)
    configure_runtime(seed=args.seed)
    if args.threads:
        numba.set_num_threads(args.threads)
    log.info("numba threads: %d", numba.get_num_threads())
    rng = np.random.default_rng(args.seed)
    sets = {f"{h}x{w}": organ_masks(args.n, (h, w), rng, args.empty) for h, w in SHAPES}
    results = {}
    for order in args.orders:
        for name, masks in sets.items():
            rates = bench(masks, order, args.repeats)
            results[f"{order} {name}"] = rates
            cells = "  ".join(f"{k} {v:9.0f}/s" for k, v in rates.items())
            print(
                f"order={order} {name:>7} ({args.n} masks, {masks.sum((1, 2)).mean():5.0f} px mean)  {cells}  "
                f"numba/numpy: single {rates['numba_single'] / rates['numpy']:.1f}x "
                f"batch {rates['numba_batch'] / rates['numpy']:.1f}x"
                + (f" cuda {rates['cuda'] / rates['numpy']:.1f}x" if "cuda" in rates else "")
            )
    return results


if __name__ == "__main__":
    main()
