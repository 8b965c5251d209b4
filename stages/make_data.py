"""`make data`: write the dataset's synthetic phantom (its exact Kaggle layout) under --out.

A folder that already holds the dataset's real data (`make download`, or a Kaggle download its scanner
reads) is left alone, so `make demo DATA_DIR=<a real download>` runs every stage on it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pipeline.datasets import get_dataset
from pipeline.kaggle.download import holds_dataset
from pipeline.paths import data_dir
from pipeline.phantoms.common import SyntheticDataError
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.make_data")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default=None, help="uwmgi, lgg or nerve (default: $DATASET, else uwmgi)")
    parser.add_argument("--out", default=None, help="output folder (default: $DATA_DIR, else data/<dataset>)")
    parser.add_argument("--preset", default="demo", help="tiny, demo or full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering the phantom in parallel")
    parser.add_argument(
        "--force", action="store_true", help="replace a synthetic set made with other settings"
    )
    args = parser.parse_args(argv)
    configure_runtime(seed=args.seed)
    spec = get_dataset(args.dataset)
    phantom = spec.phantom()
    if args.preset not in phantom.PRESETS:
        parser.exit(
            2,
            f"make_data: unknown preset '{args.preset}' for {spec.name}; valid: {', '.join(phantom.PRESETS)}\n",
        )
    out = data_dir(args.out, spec.name)
    if holds_dataset(spec, out):
        log.info("%s holds %s data (not the phantom): left alone", out, spec.title)
        return out
    start = time.perf_counter()
    try:
        stats = phantom.generate(out, args.preset, seed=args.seed, workers=args.workers, force=args.force)
    except SyntheticDataError as exc:
        parser.exit(2, f"make_data: {exc}\n")
    log.info("%s (%s preset, seed %d) in %.1f s\n%s", out, args.preset, args.seed, time.perf_counter() - start,
             phantom.format_stats(stats))  # fmt: skip
    if (out / "preview.png").is_file():
        log.info("preview: %s", out / "preview.png")
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli("make_data", main))
