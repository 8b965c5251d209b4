"""`make train-seg`: train a segmenter per fold; writes runs/seg/<config>/fold_<k>/ (weights, metrics, OOF)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.config import load_config
from pipeline.runtime import configure_runtime
from pipeline.train.tasks import describe, parse_folds, train_segmenter

log = logging.getLogger("stages.train_seg")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_seg.yaml")
    parser.add_argument(
        "--folds", nargs="+", default=["0", "1", "2", "3", "4"], help="fold numbers, or 'all'"
    )
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. train.epochs=1")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="seg")
    folds = parse_folds(args.folds)
    configure_runtime(seed=cfg.train.seed)
    log.info("%s; folds %s", describe(cfg), " ".join(map(str, folds)))
    outs = []
    for fold in folds:
        outs.append(train_segmenter(cfg, fold))
        log.info("wrote %s (best.pt, last.pt, config.yaml, metrics.csv, oof/)", outs[-1])
    return outs


if __name__ == "__main__":
    main()
