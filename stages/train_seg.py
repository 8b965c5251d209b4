"""`make train-seg`: train a segmenter per fold; writes runs/seg/<config>/fold_<k>/ (weights, metrics, OOF)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config import load_config
from pipeline.runtime import configure_runtime
from pipeline.train.parallel import resolve_jobs, run_folds
from pipeline.train.tasks import describe, every_fold, parse_folds, train_segmenter, train_store

log = logging.getLogger("stages.train_seg")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_seg.yaml")
    parser.add_argument(
        "--folds", nargs="+", help="fold numbers, or 'all' (default: every fold of $DATA_DIR/folds.csv)"
    )
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. train.epochs=1")
    parser.add_argument(
        "--jobs",
        default="auto",
        help="folds trained at once (CPU: one process each); auto: 1 on a GPU, else one per core",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="seg")
    folds = parse_folds(args.folds) if args.folds else every_fold(cfg)
    configure_runtime(seed=cfg.train.seed)
    log.info("%s; folds %s", describe(cfg), " ".join(map(str, folds)))
    jobs = resolve_jobs(args.jobs, len(folds))
    train_store(cfg)  # decode the volumes once, before any worker needs them
    outs = run_folds(train_segmenter, cfg, folds, jobs, desc=f"train-seg {cfg.name}")
    for out in outs:
        log.info("wrote %s (best.pt, last.pt, config.yaml, metrics.csv, oof/)", out)
    return outs


if __name__ == "__main__":
    main()
