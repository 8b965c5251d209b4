"""`make data-stats`: what a dataset folder looks like in numbers, real or phantom, beside another.

    python -m stages.data_stats --dataset lgg --data-dir ../shared/data/lgg-real-dev --compare data/lgg

Prints one row per statistic (tumour or nerve sizes, places, contrast, head size...; see
``pipeline.data.stats``) and one column per folder: ``--data-dir`` (default ``$DATA_DIR``), then
``--compare``. Nothing is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.data.stats import DataStats, dataset_stats, format_table
from pipeline.datasets import get_dataset
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.data_stats")


def main(argv: list[str] | None = None) -> list[DataStats]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default=None, help="uwmgi, lgg or nerve (default: $DATASET, else uwmgi)")
    parser.add_argument("--data-dir", default=None, help="the folder to describe (default: $DATA_DIR)")
    parser.add_argument("--compare", type=Path, default=None, help="a second folder, printed beside it")
    args = parser.parse_args(argv)
    configure_runtime()
    spec = get_dataset(args.dataset)
    roots = [data_dir(args.data_dir, spec.name), *([args.compare] if args.compare else [])]
    tables = [dataset_stats(spec, root) for root in roots]
    log.info("%s statistics of %s", spec.title, ", ".join(map(str, roots)))
    print(format_table(tables))
    return tables


if __name__ == "__main__":
    raise SystemExit(run_cli("data_stats", main))
