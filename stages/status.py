"""`make status`: the pipeline's state for DATASET / DATA_DIR / RUNS_DIR and one ensemble, and the next
`make` command to run. Reads file listings, metrics.csv and YAML only: no model, no image."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import load_config
from pipeline.paths import data_dir
from pipeline.report.status import Status, pipeline_status
from stages._cli import run_cli

log = logging.getLogger("stages.status")


def main(argv: list[str] | None = None) -> Status:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_ensemble.yaml", help="the ensemble config")
    parser.add_argument(
        "--submission", default="submission.csv", help="the submission file make submit writes"
    )
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config data_dir, $DATA_DIR)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, stage="ensemble")
    root = data_dir(args.data_dir or cfg.data_dir, cfg.dataset)
    status = pipeline_status(cfg, root, Path(args.submission), args.config)
    print(status.format())
    return status


if __name__ == "__main__":
    raise SystemExit(run_cli("status", main, timed=False))
