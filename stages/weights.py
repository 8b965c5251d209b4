"""`make weights`: fetch, once and on a machine with internet, the pretrained weights the configs start
from (smp / timm ImageNet encoders, ultralytics' COCO detector) into the local cache ($WEIGHTS_DIR,
default weights/) with its manifest; every other stage reads only that cache.

    python -m stages.weights configs/full_ensemble.yaml [configs/full_seg_unet_effb7.yaml ...] [--force]

An ensemble config brings its members, classifier and detector; a seg or cls config that crops brings
its detector config. Entries already cached and intact are kept (--force fetches them again).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.models.fetch_weights import allow_downloads, expand_configs, fetch_weights
from pipeline.models.weights import MANIFEST, weights_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.weights")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("configs", nargs="+", help="config files or names (seg, cls, det or ensemble)")
    parser.add_argument("--force", action="store_true", help="fetch again what the cache already holds")
    args = parser.parse_args(argv)
    allow_downloads()  # before configure_runtime and any library import: this stage is the one that fetches
    configure_runtime()
    configs = expand_configs(args.configs)
    rows = fetch_weights(configs, force=args.force)
    root = weights_dir()
    if not rows:
        log.info("none of the %d configs starts from pretrained weights: nothing to fetch", len(configs))
    for row in rows:
        print(f"{row['status']:>8s}  {row['key']:<42s} {row['size'] / 2**20:8.1f} MiB  {row['source']}")
    log.info("%s: %d entries for %d configs (%s)", root / MANIFEST, len(rows), len(configs),
             ", ".join(c.name for c in configs))  # fmt: skip
    return root


if __name__ == "__main__":
    raise SystemExit(run_cli("weights", main))
