"""`make bench-gpu`: the GPU figures in one run (pipeline/bench/gpu.py): CUDA RLE masks/s, AMP training
images/s per full config, `make submit`'s slices/s with and without TTA, 3D sliding-window volumes/s, and
DDP with one process against plain. Prints a table and writes the figures as JSON (--out).

    python -m stages.bench_gpu                      # on a CUDA machine: the full configs
    python -m stages.bench_gpu --cpu-tiny           # the same code on the demo configs at toy sizes
                                                    # (automatic when no CUDA GPU is visible)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch

from pipeline.bench.gpu import FULL, TINY, format_table, run_bench
from pipeline.device import resolve_device
from pipeline.io import write_json
from pipeline.paths import PROJECT_ROOT
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.bench_gpu")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-tiny", action="store_true", help="demo configs at toy sizes (the tests' mode)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:<i> or cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (after a warm-up)")
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "reports" / "bench_gpu.json", help="the figures as JSON"
    )
    args = parser.parse_args(argv)
    configure_runtime(seed=0)
    device = resolve_device(args.device)
    tiny = args.cpu_tiny or device.type != "cuda"
    if tiny and not args.cpu_tiny:
        log.warning("no CUDA GPU visible: tiny CPU mode (demo configs at toy sizes; not GPU figures)")
    plan = TINY if tiny else FULL
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    if tiny:
        torch.backends.cudnn.benchmark = False
    result = run_bench(device, plan)
    print(format_table(result))
    write_json(args.out, result)
    log.info("wrote %s", args.out)
    return result


if __name__ == "__main__":
    raise SystemExit(run_cli("bench_gpu", main))
