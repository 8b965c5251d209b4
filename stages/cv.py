"""`make cv`: the out-of-fold score of the tuned ensemble, per class and per step (each member alone,
the blend, each post-processing option; in-sample and held apart), with figures; ends with the HTML report
page of `make report` (runs/ensemble/<cfg>/report/index.html)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import get_dataset, load_config
from pipeline.infer.report import run_report
from pipeline.paths import data_dir
from pipeline.report.page import build_report
from pipeline.runtime import configure_runtime, machine_summary
from stages._cli import run_cli

log = logging.getLogger("stages.cv")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_ensemble.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. report_slices=12")
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config data_dir, $DATA_DIR)")
    parser.add_argument(
        "--workers", type=int, default=None, help="threads over volumes (default: cores, max 8)"
    )
    parser.add_argument(
        "--submission", default=None, help="scored on the report page where test labels exist"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="ensemble")
    configure_runtime()
    root = data_dir(args.data_dir or cfg.data_dir, cfg.dataset)
    report = run_report(cfg, get_dataset(cfg.dataset), root, workers=args.workers)
    print(report.format())
    print(f"machine: {machine_summary()}")  # scores differ between CPUs: docs/REPRODUCIBILITY.md
    submission = Path(args.submission) if args.submission else None
    page = build_report(cfg, root, submission=submission, config_path=args.config, workers=args.workers)
    print(f"report: {page}")
    return report.dir


if __name__ == "__main__":
    raise SystemExit(run_cli("cv", main))
