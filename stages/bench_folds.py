"""`python -m stages.bench_folds`: folds one after another with every core, against folds side by side.

    python -m stages.bench_folds                         # demo segmenter, folds 0 1, 2 epochs
    python -m stages.bench_folds --config demo_cls --folds 0 1 2 3

Trains the same folds twice into a temporary runs folder: once with ``--jobs 1`` (in this
process, every core), once with ``--jobs`` workers (one process per running fold, the cores
shared, :mod:`pipeline.train.parallel`), and prints both wall times, the ratio, and the mean
validation score of each run (they agree up to thread-count rounding). The crop is switched
off (``data.crop=false``) so that no detector run is needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipeline.config import ClsConfig, SegConfig
from pipeline.datasets import load_config
from pipeline.runtime import available_cores, configure_runtime
from pipeline.train.fold_data import parse_folds, train_store
from pipeline.train.parallel import resolve_jobs, run_folds
from pipeline.train.tasks import train_classifier, train_segmenter


def _mean_score(outs: list[Path]) -> float:
    scores = [pd.read_csv(out / "metrics.csv")["score"].dropna().iloc[-1] for out in outs]
    return float(sum(scores) / len(scores))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo_seg.yaml", help="a seg or cls config")
    parser.add_argument("--folds", nargs="+", default=["0", "1"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--jobs", default="auto", help="workers of the side-by-side run (auto: one per core)")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides key=value")
    args = parser.parse_args(argv)
    configure_runtime(seed=0, log_level="WARNING")
    overrides = [f"train.epochs={args.epochs}", "data.crop=false", *args.set]
    cfg = load_config(args.config, overrides)
    if not isinstance(cfg, SegConfig | ClsConfig):
        raise SystemExit(f"{args.config} is a '{cfg.stage}' config; bench_folds times seg or cls training")
    train = train_segmenter if cfg.stage == "seg" else train_classifier
    folds = parse_folds(args.folds)
    jobs = resolve_jobs(args.jobs, len(folds))
    if jobs < 2:
        raise SystemExit(f"--jobs resolves to {jobs} here (a GPU, or one core or fold): nothing to compare")
    train_store(cfg, progress=False)  # decode the cache before timing
    print(
        f"{cfg.stage} '{cfg.name}', folds {' '.join(map(str, folds))}, {args.epochs} epochs, "
        f"{available_cores()} cores"
    )
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_folds_") as tmp:
        for label, n in (("sequential", 1), ("parallel", jobs)):
            os.environ["RUNS_DIR"] = str(Path(tmp) / label)  # the workers inherit it
            start = time.perf_counter()
            outs = run_folds(train, cfg, folds, n, desc=label)
            result[label] = time.perf_counter() - start
            result[f"{label}_score"] = _mean_score(outs)
            print(
                f"  {label:10s} --jobs {n}: {result[label]:7.1f} s  "
                f"(mean validation score {result[f'{label}_score']:.4f})",
                flush=True,
            )
    result["speedup"] = result["sequential"] / result["parallel"]
    print(f"  side by side is {result['speedup']:.2f}x the speed of one after another")
    return result


if __name__ == "__main__":
    main()
