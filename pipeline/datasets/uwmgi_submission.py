"""UW-Madison submissions: the rows to predict, the writer, and scoring a file against the labels.

A submission has exactly the ``id, class`` rows of ``sample_submission.csv`` in its order, with a
row-major RLE (or blank) in ``predicted``. The writer validates the file it wrote before renaming
it into place, so a failed run leaves any previous file untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.data.volumes import Volume
from pipeline.datasets.base import Encoder, SubmissionWriter
from pipeline.datasets.common import decode_rle
from pipeline.datasets.uwmgi_files import CLASSES, ID_RE, read_labels, scan_split
from pipeline.datasets.uwmgi_metric import aggregate, first_items, volume_stats
from pipeline.errors import DataError, SubmissionError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("id", "class", "predicted")
TRUTH_COLUMNS = ("id", "class", "segmentation")
_RLE_SYNTAX = r"\s*(?:\d+\s+\d+(?:\s+\d+\s+\d+)*)?\s*"


def _keys(frame: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([frame["id"].astype(str), frame["class"].astype(str)])


def _row_names(frame: pd.DataFrame, mask: np.ndarray) -> list[str]:
    rows = np.flatnonzero(mask)
    return [f"row {r} ({frame['id'].iloc[r]}, {frame['class'].iloc[r]})" for r in rows]


def validate_submission(
    sub: pd.DataFrame, truth: pd.DataFrame, shapes: Mapping[str, tuple[int, int]] | None = None
) -> None:
    """Raise :class:`SubmissionError` unless ``sub`` holds exactly the (id, class) rows of ``truth``.

    Checks the columns, duplicated rows, missing and extra (id, class) pairs and the RLE syntax;
    with ``shapes`` ({id: (H, W)}) also that every run fits in its slice. Rows are 0-based
    positions in ``sub`` (CSV line = row + 2).
    """
    missing = [c for c in SUBMISSION_COLUMNS if c not in sub.columns]
    extra = [c for c in sub.columns if c not in SUBMISSION_COLUMNS]
    if missing or extra:
        raise SubmissionError(
            f"submission columns {list(sub.columns)}: missing {missing}, unexpected {extra}; "
            f"expected exactly {','.join(SUBMISSION_COLUMNS)}"
        )
    missing_truth = [c for c in TRUTH_COLUMNS if c not in truth.columns]
    if missing_truth:
        raise DataError(f"truth lacks columns {missing_truth} (expected {','.join(TRUTH_COLUMNS)})")
    dup_truth = truth.duplicated(["id", "class"], keep="first").to_numpy()
    if dup_truth.any():
        raise DataError(f"truth has duplicated (id, class) rows: {first_items(_row_names(truth, dup_truth))}")
    dup = sub.duplicated(["id", "class"], keep="first").to_numpy()
    if dup.any():
        raise SubmissionError(
            f"submission has {dup.sum()} duplicated (id, class) rows: {first_items(_row_names(sub, dup))}"
        )
    sub_keys, truth_keys = _keys(sub), _keys(truth)
    absent = truth_keys.difference(sub_keys, sort=False)
    if len(absent):
        raise SubmissionError(
            f"submission lacks {len(absent)} (id, class) rows of the truth: {first_items(list(absent))}; "
            "every id and class of the truth needs a row (an empty 'predicted' for no mask)"
        )
    unknown = ~sub_keys.isin(truth_keys)
    if unknown.any():
        raise SubmissionError(
            f"submission has {unknown.sum()} (id, class) rows not in the truth: {first_items(_row_names(sub, unknown))}"
        )
    predicted = sub["predicted"].fillna("")
    bad = ~predicted.map(lambda v: isinstance(v, str)).to_numpy()
    bad |= ~predicted.astype(str).str.fullmatch(_RLE_SYNTAX).to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise SubmissionError(
            f"malformed RLE in {_row_names(sub, bad)[0]}: {str(predicted.iloc[r])[:60]!r}; expected "
            f"'start length' pairs of positive integers ({bad.sum()} bad rows in all)"
        )
    if shapes is not None:
        for r, (slice_id, name, rle) in enumerate(zip(sub["id"], sub["class"], predicted)):
            if rle:
                if slice_id not in shapes:
                    raise DataError(f"no slice shape for {slice_id} (submission row {r})")
                decode_rle(
                    rle, shapes[slice_id], "C", f"submission row {r} ({slice_id}, {name})", SubmissionError
                )


def slice_shapes(truth: pd.DataFrame, data_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """{id: (H, W)} from ``image_height``/``image_width`` columns, else from the image files.

    Images are looked up under ``data_dir/train`` and ``data_dir/test`` (Kaggle file names
    ``slice_NNNN_W_H_PX_PY.png``). Raises :class:`DataError` naming the ids without a shape.
    """
    ids = pd.unique(truth["id"].astype(str))
    if {"image_height", "image_width"} <= set(truth.columns):
        sizes = truth.drop_duplicates("id")
        height = pd.to_numeric(sizes["image_height"], errors="coerce")
        width = pd.to_numeric(sizes["image_width"], errors="coerce")
        bad = ~((height > 0) & (width > 0)).to_numpy()
        if bad.any():
            raise DataError(
                f"truth: image_height/image_width missing or not positive for ids {first_items(list(sizes['id'][bad]))}"
            )
        return dict(
            zip(sizes["id"].astype(str), zip(height.astype(int).tolist(), width.astype(int).tolist()))
        )
    if data_dir is None:
        raise DataError(
            "truth has no image_height/image_width columns and no data dir was given to find the images"
        )
    data_dir = Path(data_dir)
    catalog = pd.concat([scan_split(data_dir, split) for split in ("train", "test")], ignore_index=True)
    catalog = catalog.drop_duplicates("id") if not catalog.empty else catalog
    found = (
        {}
        if catalog.empty
        else dict(zip(catalog["id"], zip(catalog["height"].tolist(), catalog["width"].tolist())))
    )
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(
            f"{len(missing)} ids of the truth have no slice image under {data_dir / 'train'} or "
            f"{data_dir / 'test'}: {first_items(missing)} (expected <split>/caseN/caseN_dayD/scans/slice_NNNN_W_H_PX_PY.png, "
            "or add image_height/image_width columns to the truth)"
        )
    return {i: found[i] for i in ids}


def score_submission(
    sub: pd.DataFrame,
    truth: pd.DataFrame,
    shapes: Mapping[str, tuple[int, int]],
    per_class: bool = True,
    progress: bool = False,
) -> dict:
    """Score a Kaggle submission (id, class, predicted) against labels (id, class, segmentation).

    Validates ``sub`` first, then decodes and scores one day-volume at a time (slices stacked by
    the slice number of their id), so memory stays at one volume.
    """
    validate_submission(sub, truth)
    sub = sub.reset_index(drop=True).assign(row=lambda f: np.arange(len(f)))
    table = truth[list(TRUTH_COLUMNS)].merge(sub, on=["id", "class"], how="left", validate="one_to_one")
    parts = table["id"].astype(str).str.extract(ID_RE.pattern)
    if parts.isna().any().any():
        bad = table["id"][parts.isna().any(axis=1)].tolist()
        raise DataError(f"truth ids not of the form case{{N}}_day{{D}}_slice_{{NNNN}}: {first_items(bad)}")
    class_idx = table["class"].map({name: c for c, name in enumerate(CLASSES)})
    if class_idx.isna().any():
        raise DataError(
            f"truth classes must be {CLASSES}; found {first_items(sorted(set(table['class'][class_idx.isna()])))}"
        )
    table = table.assign(
        case=parts["case"].astype(int),
        day=parts["day"].astype(int),
        slice=parts["slice"].astype(int),
        c=class_idx.astype(int),
    ).sort_values(["case", "day", "slice", "c"], kind="stable")
    table[["segmentation", "predicted"]] = table[["segmentation", "predicted"]].fillna("")
    missing = sorted(set(table["id"]) - set(shapes))
    if missing:
        raise DataError(f"no slice shape for {len(missing)} ids: {first_items(missing)}")
    groups = table.groupby(["case", "day"], sort=False)
    stats = [
        volume_stats(*_day_masks(f"case{case}_day{day}", rows, shapes), per_class)
        for (case, day), rows in tqdm(groups, desc="score", unit="day", disable=not progress)
    ]
    return aggregate(stats, CLASSES)


def _day_masks(
    case_day: str, rows: pd.DataFrame, shapes: Mapping[str, tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(S, 3, H, W) prediction and truth masks of one day from its rows."""
    sizes = {(int(shapes[i][0]), int(shapes[i][1])) for i in rows["id"].unique()}
    if len(sizes) != 1:
        raise DataError(f"{case_day}: slices of one day-volume have different shapes {sorted(sizes)}")
    shape = sizes.pop()
    slices = np.unique(rows["slice"].to_numpy())
    s_idx = np.searchsorted(slices, rows["slice"].to_numpy())
    pred = np.zeros((len(slices), len(CLASSES), *shape), np.uint8)
    truth = np.zeros_like(pred)
    for s, c, slice_id, name, seg, rle, row in zip(
        s_idx, rows["c"], rows["id"], rows["class"], rows["segmentation"], rows["predicted"], rows["row"]
    ):
        if seg:
            truth[s, c] = decode_rle(seg, shape, "C", f"truth ({slice_id}, {name})", DataError)
        if rle:
            pred[s, c] = decode_rle(
                rle, shape, "C", f"submission row {row} ({slice_id}, {name})", SubmissionError
            )
    return pred, truth


def read_submission(path: Path) -> pd.DataFrame:
    """A submission CSV as strings (blank 'predicted' = ""); :class:`SubmissionError` when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"submission file not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SubmissionError(f"{path}: not a readable CSV ({err})") from None


def read_truth(path: Path) -> pd.DataFrame:
    """Labels (``train.csv`` layout, validated by ``read_labels``) plus image_height/width when present."""
    labels = read_labels(path)
    header = pd.read_csv(path, nrows=0).columns
    if {"image_height", "image_width"} <= set(header):
        sizes = pd.read_csv(path, usecols=["id", "image_height", "image_width"], dtype={"id": str})
        labels = labels.join(sizes.drop_duplicates("id").set_index("id"), on="id")
    return labels


# --------------------------------------------------------------------------- writing


def _rows_of(catalog: pd.DataFrame) -> pd.DataFrame:
    ids = np.repeat(catalog["id"].to_numpy(), len(CLASSES))
    return pd.DataFrame({"id": ids, "class": np.tile(CLASSES, len(catalog))})


def expected_rows(root: Path, catalog: pd.DataFrame, debug: bool = False) -> pd.DataFrame:
    """The ``id, class`` rows the file must have, in order: sample_submission.csv's, else one per slice and class."""
    sample_path = Path(root) / "sample_submission.csv"
    if debug or not sample_path.is_file():
        if not debug:
            log.warning("%s not found: writing one row per test slice and class", sample_path)
        return _rows_of(catalog)
    sample = pd.read_csv(sample_path, dtype=str, keep_default_na=False)
    missing = {"id", "class"} - set(sample.columns)
    if missing:
        raise DataError(f"{sample_path}: missing columns {sorted(missing)} (expected id,class,predicted)")
    return sample[["id", "class"]].reset_index(drop=True)


def test_catalog(root: Path) -> pd.DataFrame:
    """The test slices that sample_submission.csv asks for."""
    root = Path(root)
    catalog = scan_split(root, "test")
    if catalog.empty:
        return catalog
    rows = expected_rows(root, catalog)
    no_image = sorted(set(rows["id"]) - set(catalog["id"]))
    if no_image:
        log.warning(
            "%d sample_submission ids have no test image (first %s): left empty", len(no_image), no_image[0]
        )
    return catalog[catalog["id"].isin(set(rows["id"]))].reset_index(drop=True)


def validate_rows(
    frame: pd.DataFrame, rows: pd.DataFrame, where: str, shapes: dict[str, tuple[int, int]] | None = None
) -> None:
    """The written file has the expected rows in order, then the metric's format and bounds checks."""
    if list(frame.columns) != list(SUBMISSION_COLUMNS):
        raise SubmissionError(f"{where}: columns {list(frame.columns)}, expected {list(SUBMISSION_COLUMNS)}")
    if (
        len(frame) != len(rows)
        or not (frame[["id", "class"]].to_numpy() == rows[["id", "class"]].to_numpy()).all()
    ):
        raise SubmissionError(
            f"{where}: rows differ from the expected (id, class) rows of sample_submission.csv"
        )
    validate_submission(frame, rows.assign(segmentation=""), shapes)


def write_submission(
    frame: pd.DataFrame, rows: pd.DataFrame, out: Path, shapes: dict[str, tuple[int, int]] | None = None
) -> Path:
    """Write atomically: to a temporary file, read back and validated, then renamed over ``out``."""
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, columns=list(SUBMISSION_COLUMNS))
        written = pd.read_csv(tmp, dtype=str, keep_default_na=False)
        validate_rows(written, rows, str(out), shapes)
    return Path(out)


class UWSubmissionWriter(SubmissionWriter):
    """``id,class,predicted`` in the rows and order of sample_submission.csv (blank = no mask)."""

    def __init__(self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder) -> None:
        debug = "debug" in catalog.columns
        self.rows = (
            expected_rows(root, catalog, debug) if not (catalog.empty and debug) else _rows_of(catalog)
        )
        self.out, self.encode = Path(out), encode
        self.predicted: dict[tuple[str, str], str] = {}
        self.shapes = {
            i: (int(h), int(w)) for i, h, w in zip(catalog["id"], catalog["height"], catalog["width"])
        }

    def add(self, volume: Volume, masks: np.ndarray) -> None:
        keys = [(slice_id, cls) for slice_id in volume.ids for cls in CLASSES]
        flat = masks.reshape(-1, *masks.shape[2:])
        self.predicted.update(zip(keys, self.encode(flat, "C")))

    def finish(self) -> Path:
        frame = self.rows.copy()
        frame["predicted"] = [self.predicted.get(key, "") for key in zip(frame["id"], frame["class"])]
        write_submission(frame, self.rows, self.out, self.shapes)
        log.info("%s: %d rows, %d non-empty", self.out, len(frame), int((frame["predicted"] != "").sum()))
        return self.out


def score_files(submission: Path, truth: Path, root: Path) -> dict:
    """``stages.score``: a submission CSV against ``test_labels.csv`` (shapes from the images under ``root``)."""
    sub = read_submission(submission)
    labels = read_truth(truth)
    return score_submission(sub, labels, slice_shapes(labels, root), progress=True)
