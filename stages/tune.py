"""`make tune`: choose per-class blend weights and post-processing on out-of-fold predictions.

Also scores every step's choice, made on part of the OOF groups, on the groups held apart (tune.holdout).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config import dump_config
from pipeline.datasets import get_dataset, load_config
from pipeline.infer.tune import run_tune
from pipeline.io import write_text
from pipeline.paths import data_dir, run_dir
from pipeline.runtime import configure_runtime, record_machine
from stages._cli import run_cli

log = logging.getLogger("stages.tune")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_ensemble.yaml")
    parser.add_argument(
        "--set", nargs="*", default=[], help="overrides key=value, e.g. tune.blend_steps=10 tune.holdout=0"
    )
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config data_dir, $DATA_DIR)")
    parser.add_argument(
        "--workers", type=int, default=None, help="threads over volumes (default: cores, max 8)"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="ensemble")
    configure_runtime()
    root = data_dir(args.data_dir or cfg.data_dir, cfg.dataset)
    out = run_tune(cfg, get_dataset(cfg.dataset), root, workers=args.workers)
    write_text(run_dir("ensemble", cfg.name) / "config.yaml", record_machine(dump_config(cfg)))
    log.info("wrote %s (and config.yaml with this machine's fingerprint)", out)
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli("tune", main))
