"""`make submit`: predict the test volumes with the tuned ensemble and write the submission in the dataset's format."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.datasets import get_dataset, load_config
from pipeline.infer.submit import run_submit
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.submit")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo_ensemble.yaml")
    parser.add_argument("--out", default="submission.csv")
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. tta.vflip=true")
    parser.add_argument("--data-dir", default=None, help="dataset root (default: config data_dir, $DATA_DIR)")
    parser.add_argument(
        "--debug-train-volumes",
        type=int,
        default=0,
        help="run over the first N train volumes instead of test",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (default: the config's device)")
    parser.add_argument(
        "--force", action="store_true", help="write a submission the dataset's sanity checks refuse"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="ensemble")
    configure_runtime()
    root = data_dir(args.data_dir or cfg.data_dir, cfg.dataset)
    out = run_submit(
        cfg,
        get_dataset(cfg.dataset),
        root,
        Path(args.out),
        debug_train_volumes=args.debug_train_volumes,
        device=args.device,
        force=args.force,
    )
    log.info("wrote %s", out)
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli("submit", main))
