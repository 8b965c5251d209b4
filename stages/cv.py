"""`make cv`: the out-of-fold score of the tuned ensemble, per class and per step (each member alone,
the blend, each post-processing option; in-sample and held apart), with figures."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import load_config
from pipeline.infer.report import run_report
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.cv")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_ensemble.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. report_slices=12")
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config data_dir, $DATA_DIR)")
    parser.add_argument(
        "--workers", type=int, default=None, help="threads over day-volumes (default: cores, max 8)"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="ensemble")
    configure_runtime()
    report = run_report(cfg, data_dir(args.data_dir or cfg.data_dir, cfg.dataset), workers=args.workers)
    print(report.format())
    return report.dir


if __name__ == "__main__":
    raise SystemExit(run_cli("cv", main))
