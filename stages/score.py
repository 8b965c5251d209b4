"""`make score`: score a submission against the hidden answers; the last stdout line is one JSON object.

    python -m stages.score --submission submission.csv --truth $DATA_DIR/test_labels.csv [--data-dir D]

The dataset (``--dataset``, default ``$DATASET``, else uwmgi) decides the format and the metric:
UW-Madison ``id,class,predicted`` against ``id,class,segmentation`` (0.4 Dice + 0.6 (1 - 3D
Hausdorff)); LGG ``id,predicted`` (mean per-patient volumetric Dice); Ultrasound Nerve
``img,pixels`` (mean per-image Dice, empty vs empty = 1). Image shapes come from the images under
the data dir (default ``$DATA_DIR``). Bad input exits with status 2 and one line naming the rows at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.datasets import get_dataset
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime
from stages._cli import run_cli

log = logging.getLogger("stages.score")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--submission", required=True, type=Path, help="the submission CSV")
    parser.add_argument("--truth", required=True, type=Path, help="the answers (test_labels.csv)")
    parser.add_argument("--dataset", default=None, help="uwmgi, lgg or nerve (default: $DATASET, else uwmgi)")
    parser.add_argument(
        "--data-dir", default=None, help="dataset root holding train/ and test/ (default $DATA_DIR)"
    )
    args = parser.parse_args(argv)
    configure_runtime()
    spec = get_dataset(args.dataset)
    result = spec.score_files(args.submission, args.truth, data_dir(args.data_dir, spec.name))
    log.info("scored %s against %s (%s)", args.submission, args.truth, spec.title)
    print(spec.format_score(result))
    print(json.dumps({"dataset": spec.name, **result}))
    return result


if __name__ == "__main__":
    raise SystemExit(run_cli("score", main))
