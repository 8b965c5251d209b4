"""`make folds`: group-disjoint (case, patient, subject), stratified folds written once to $DATA_DIR/folds.csv."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.data.folds import fold_numbers, make_folds, read_folds
from pipeline.datasets import get_dataset, load_config
from pipeline.io import write_csv
from pipeline.paths import data_dir, folds_path
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.folds")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/folds.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="overrides key=value")
    parser.add_argument("--force", action="store_true", help="rewrite an existing folds.csv")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, stage="folds")
    configure_runtime(seed=cfg.seed)
    spec = get_dataset(cfg.dataset)
    root = data_dir(cfg.data_dir, cfg.dataset)
    out = folds_path(root)
    if out.exists() and not args.force:
        present = fold_numbers(read_folds(root))
        if len(present) != cfg.n_folds:
            raise SystemExit(
                f"{out} holds {len(present)} folds but {args.config} asks for {cfg.n_folds}; "
                "keep the file (and that config's fold count), or rewrite it with --force "
                "(`make folds FORCE=1`) and retrain every stage"
            )
        log.info(
            "%s exists: keeping its %d folds (folds are written once; --force rewrites)", out, len(present)
        )
        return out
    catalog = spec.load_split(root, "train")
    has_label = spec.presence(catalog).loc[catalog["id"]].to_numpy(bool).any(axis=1)
    folds = make_folds(catalog, has_label, cfg.n_folds, cfg.seed, cfg.exclude_volumes)
    write_csv(out, folds)
    summary = (
        folds[folds["fold"] >= 0]
        .groupby("fold")
        .agg(
            groups=("group", "nunique"),
            volumes=("volume_id", "nunique"),
            slices=("id", "size"),
            labelled=("has_label", "mean"),
        )
    )
    log.info("wrote %s\n%s", out, summary.to_string())
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli("folds", main))
