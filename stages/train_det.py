"""`make train-det`: train the YOLO body detector and write one crop box per train volume."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import load_config
from pipeline.models.detector_run import train_detector
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.train_det")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_det.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. det.epochs=1")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="det")
    configure_runtime(seed=cfg.det.seed)
    out = train_detector(cfg)
    log.info("wrote %s (weights.pt, boxes_train.csv, metrics.json, boxes.png)", out)
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli("train_det", main))
