"""`python -m stages.score`: score a submission against labels; the last stdout line is one JSON object.

    python -m stages.score --submission submission.csv --truth $DATA_DIR/test_labels.csv [--data-dir D]

Slice shapes come from ``image_height``/``image_width`` columns of the truth when present, else
from the image file names under the data dir (default ``$DATA_DIR``). Bad input exits non-zero
with the message naming the rows at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.config import CLASSES
from pipeline.data.catalog import DataError
from pipeline.metric import SubmissionError, read_submission, read_truth, score_submission, slice_shapes
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime

log = logging.getLogger("stages.score")


def format_table(result: dict) -> str:
    """A short human table: one line per class and the overall score."""

    def cell(value: float | None) -> str:
        return "      -" if value is None else f"{value:7.4f}"

    lines = [f"{'':12s} {'dice':>7s} {'hausd.':>7s} {'score':>7s}"]
    for name in CLASSES:
        row = result["per_class"][name]
        lines.append(f"{name:12s} {cell(row['dice'])} {cell(row['hausdorff'])} {cell(row['score'])}")
    lines.append(f"{'all':12s} {cell(result['dice'])} {cell(result['hausdorff'])} {cell(result['score'])}")
    lines.append(f"({result['n_rows']} Dice rows, {result['n_volumes']} volumes in the Hausdorff mean)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--submission", required=True, type=Path, help="CSV with id,class,predicted")
    parser.add_argument("--truth", required=True, type=Path, help="CSV with id,class,segmentation")
    parser.add_argument(
        "--data-dir", default=None, help="dataset root holding train/ and test/ (default $DATA_DIR)"
    )
    args = parser.parse_args(argv)
    configure_runtime()
    try:
        sub = read_submission(args.submission)
        truth = read_truth(args.truth)
        shapes = slice_shapes(truth, data_dir(args.data_dir))
        result = score_submission(sub, truth, shapes, progress=True)
    except (SubmissionError, DataError) as err:
        raise SystemExit(f"score: error: {err}") from None
    log.info("scored %s against %s", args.submission, args.truth)
    print(format_table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
