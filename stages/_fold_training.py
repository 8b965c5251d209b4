"""The command line shared by `make train-cls` and `make train-seg`: config, folds, jobs, overrides.

Started by torchrun (`GPUS=n`), every process runs this: they join one process group for the
whole stage and train each fold together (DDP), rank 0 writing the files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.config import ClsConfig, ConfigError, SegConfig
from pipeline.datasets import load_config
from pipeline.models.registry import check_model
from pipeline.runtime import configure_runtime
from pipeline.train import distributed
from pipeline.train.fold_data import every_fold, parse_folds, train_store
from pipeline.train.parallel import resolve_jobs, run_folds
from pipeline.train.tasks import describe


def run_stage(
    argv: list[str] | None,
    *,
    stage: str,
    default_config: str,
    train: Callable[..., Path],
    outputs: str,
    description: str,
) -> list[Path]:
    """Parse the arguments, train every asked fold (``--jobs`` at a time), log each run folder."""
    log = logging.getLogger(f"stages.train_{stage}")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config)
    parser.add_argument(
        "--folds", nargs="+", help="fold numbers, or 'all' (default: every fold of $DATA_DIR/folds.csv)"
    )
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value, e.g. train.epochs=1")
    parser.add_argument(
        "--jobs",
        default="auto",
        help="folds trained at once, one process each (pinned to its own GPU on a multi-GPU machine); "
        "auto: one per GPU, else one per core; 1 under torchrun",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage=stage)
    if not isinstance(cfg, SegConfig | ClsConfig):  # load_config checked the stage: seg or cls
        raise ConfigError(f"{args.config}: a '{cfg.stage}' config; train-{stage} trains seg and cls configs")
    try:
        check_model(cfg.model, stage)  # names of architecture and encoder, before any data is read
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    folds = parse_folds(args.folds) if args.folds else every_fold(cfg)
    configure_runtime(seed=cfg.train.seed)
    with distributed.session(cfg.train.device):  # torchrun: one process group, rank 0 logs and writes
        log.info("%s; folds %s", describe(cfg), " ".join(map(str, folds)))
        jobs = resolve_jobs(args.jobs, len(folds), distributed.world_size())
        if jobs > 1 or distributed.is_distributed():
            # decode the volumes once, here (on rank 0), not in several processes at the same time
            if distributed.is_main():
                train_store(cfg)
            distributed.barrier()
        outs = run_folds(train, cfg, folds, jobs, desc=f"train-{stage} {cfg.name}")
    for out in outs:
        log.info("wrote %s (best.pt, last.pt, config.yaml, metrics.csv, %s)", out, outputs)
    return outs
