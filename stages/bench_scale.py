"""`make bench-scale`: every stage after training on 1/8, 1/4, 1/2 and all of the `full` synthetic set.

    python -m stages.bench_scale                                  # scales 0.125 0.25 0.5 1 of `full`
    python -m stages.bench_scale --scales 0.125 0.25 --keep       # small scales, keep runs and caches

Generates the preset's set once under --root (not timed), then at each scale runs folds, the
volume cache build, planted out-of-fold files (5 folds x 2 members + a classifier), tune, cv,
submit's post-processing + RLE + CSV on planted test predictions, and score, each in its own
process; prints seconds, peak RSS and growth exponents per stage, and the disk use per scale
(:mod:`pipeline.bench.scale`). Tables and a log-log figure go to --out.

The bench runs each stage as ``python -m stages.bench_scale stage NAME --timing FILE [args]``:
the stage module's own ``main`` (or a planted stage of :mod:`pipeline.bench.planted`), timed
after its imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from pathlib import Path

from pipeline.io import write_json
from pipeline.paths import PROJECT_ROOT, data_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.bench_scale")


def stage_main(argv: list[str]) -> int:
    """Child mode: run one stage and write ``{"work_s", ...}`` to --timing."""
    parser = argparse.ArgumentParser(prog="stages.bench_scale stage")
    parser.add_argument("name")
    parser.add_argument("--timing", type=Path, required=True)
    args, rest = parser.parse_known_args(argv)
    import torch  # noqa: F401 - every stage imports it (configure_runtime): kept out of the timing

    from pipeline.bench.scale import PLANTED, peak_rss_gib

    if args.name in PLANTED:
        from pipeline.bench import planted
        from pipeline.datasets import get_dataset, load_config

        extra = argparse.ArgumentParser(prog=f"stages.bench_scale stage {args.name}")
        extra.add_argument("--config", default="configs/scale_ensemble.yaml")
        extra.add_argument("--out", type=Path, default=None)
        opts = extra.parse_args(rest)
        configure_runtime()
        cfg = load_config(opts.config, stage="ensemble")
        start = time.perf_counter()
        spec = get_dataset(cfg.dataset)
        report = planted.run_planted(args.name, spec, data_dir(None, cfg.dataset), cfg, opts.out)
        status = 0
    else:
        module = importlib.import_module(f"stages.{args.name}")
        start = time.perf_counter()
        status = run_cli(args.name, module.main, rest)
        report = {}
    if status == 0:
        work_s = time.perf_counter() - start
        write_json(args.timing, {"work_s": work_s, "peak_gib": peak_rss_gib(), **report})
    return status


def main(argv: list[str] | None = None) -> Path:
    from pipeline.bench.scale import DEFAULT_SCALES, BenchSettings, format_result, run_bench, write_result

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(DEFAULT_SCALES),
        help="fractions of the preset's cases",
    )
    parser.add_argument("--preset", default="full", help="the set the scales are fractions of")
    parser.add_argument(
        "--root",
        type=Path,
        default=PROJECT_ROOT / "build" / "scale",
        help="data, runs and caches of every scale",
    )
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "reports" / "bench_scale", help="tables and figure"
    )
    parser.add_argument(
        "--config", default="configs/scale_ensemble.yaml", help="the ensemble tuned and submitted"
    )
    parser.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold files")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the ensemble config (tune, cv)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the preset's set")
    parser.add_argument("--keep", action="store_true", help="keep each scale's runs and caches")
    parser.add_argument("--no-disk-check", action="store_true", help="run a scale the free disk may not hold")
    args = parser.parse_args(argv)
    configure_runtime(log_level="INFO")
    settings = BenchSettings(
        root=args.root.resolve(),
        preset=args.preset,
        scales=tuple(args.scales),
        workers=args.workers,
        n_folds=args.folds,
        ensemble=args.config,
        tune_set=tuple(args.set),
        keep=args.keep,
        disk_check=not args.no_disk_check,
    )
    result = run_bench(settings)
    print(format_result(result))
    written = write_result(args.out, result)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return args.out


def entry(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stage"]:
        return stage_main(argv[1:])
    return run_cli("bench_scale", main, argv)


if __name__ == "__main__":
    raise SystemExit(entry())
