"""`make download DATASET=...`: the dataset's real data from Kaggle (the official kaggle CLI and its
credentials, ~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY) into --out (default $DATA_DIR, else
data/<dataset>), unpacked safely and read by the dataset's own scanner; ends with a one-screen summary.
A folder that already holds the data is not fetched again (--force fetches it anyway).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.datasets import get_dataset
from pipeline.kaggle.download import download_dataset, format_summary
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.download")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default=None, help="uwmgi, lgg or nerve (default: $DATASET, else uwmgi)")
    parser.add_argument("--out", default=None, help="data folder (default: $DATA_DIR, else data/<dataset>)")
    parser.add_argument(
        "--force", action="store_true", help="fetch again even when the folder holds the data"
    )
    args = parser.parse_args(argv)
    configure_runtime()
    spec = get_dataset(args.dataset)
    out = data_dir(args.out, spec.name)
    info, fetched = download_dataset(spec, out, force=args.force, echo=sys.stderr.write)
    print(format_summary(info))
    log.info("%s %s (%s %s)", "fetched into" if fetched else "kept", out, *spec.kaggle_source)
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli("download", main))
