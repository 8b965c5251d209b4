"""`make report`: one self-contained HTML page of an ensemble (training curves, detector and classifier,
the OOF decisions, tuned-value curves, best and worst OOF volumes, test score, timings, environment)
at runs/ensemble/<cfg>/report/index.html; opens offline, no server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import load_config
from pipeline.paths import data_dir
from pipeline.report.page import build_report
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.report")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_ensemble.yaml", help="the ensemble config")
    parser.add_argument("--submission", default=None, help="the submission to score where test labels exist")
    parser.add_argument(
        "--set", nargs="*", default=[], help="overrides key=value, as given to make tune / cv"
    )
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config data_dir, $DATA_DIR)")
    parser.add_argument(
        "--workers", type=int, default=None, help="threads over volumes (default: cores, max 8)"
    )
    parser.add_argument(
        "--screenshot",
        action="store_true",
        help="also write report/index.png with headless Chromium (playwright)",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="ensemble")
    configure_runtime()
    root = data_dir(args.data_dir or cfg.data_dir, cfg.dataset)
    submission = Path(args.submission) if args.submission else None
    page = build_report(cfg, root, submission=submission, config_path=args.config, workers=args.workers)
    if args.screenshot:
        from pipeline.report.browser import open_page

        check = open_page(page, page.with_suffix(".png"))
        log.info("%s", check.summary())
    print(f"report: {page}")
    return page


if __name__ == "__main__":
    raise SystemExit(run_cli("report", main))
