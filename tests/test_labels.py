"""The missing-label plan (pipeline/data/labels.py) on volumes small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, DataCfg
from pipeline.data.labels import LabelPlan, class_indices, label_plan, missing_slices

CLASSES = ("large_bowel", "small_bowel", "stomach")


def slices(*positions: int, n: int = 10) -> np.ndarray:
    out = np.zeros(n, bool)
    out[list(positions)] = True
    return out


def volume() -> np.ndarray:
    """10 slices: stomach on 1-2, large bowel on 2-3 and 6, nothing on 0, 4-5 and 7-9."""
    present = np.zeros((10, 3), bool)
    present[[1, 2], 2] = True
    present[[2, 3, 6], 0] = True
    return present


@pytest.mark.parametrize(
    ("labelled", "tail", "gaps", "missing"),
    [
        (slices(2, 3, 6), None, False, slices(7, 8, 9)),  # the tail, to the end
        (slices(2, 3, 6), 2, False, slices(7, 8)),  # at most 2 slices after the last labelled one
        (slices(2, 3, 6), 5, False, slices(7, 8, 9)),  # a limit past the end stops at the end
        (slices(2, 3, 6), None, True, slices(4, 5, 7, 8, 9)),  # + the unlabelled slices in between
        (slices(2, 3, 6), 1, True, slices(4, 5, 7)),
        (slices(0, 9), None, True, slices(*range(1, 9))),  # nothing after the last: only the gap
        (slices(9), None, True, slices()),  # the head (before the first labelled slice) is never missing
        (slices(), None, False, slices(*range(10))),  # no labelled slice: missing throughout
        (slices(), 2, True, slices(*range(10))),
    ],
)
def test_missing_slices_by_hand(
    labelled: np.ndarray, tail: int | None, gaps: bool, missing: np.ndarray
) -> None:
    np.testing.assert_array_equal(missing_slices(labelled, tail, gaps), missing)


def plan(**data: object) -> LabelPlan:
    return label_plan(volume(), DataCfg(**data), CLASSES)


def test_empty_keeps_train_on_and_ignores_nothing() -> None:
    every = plan(train_on="all", missing_labels="empty")
    np.testing.assert_array_equal(every.keep, np.ones(10, bool))
    assert not every.ignore.any()
    labelled = plan(train_on="labelled", missing_labels="empty")
    np.testing.assert_array_equal(labelled.keep, slices(1, 2, 3, 6))


def test_drop_removes_the_missing_slices() -> None:
    np.testing.assert_array_equal(plan(train_on="all", missing_labels="drop").keep, slices(*range(7)))
    np.testing.assert_array_equal(
        plan(train_on="all", missing_labels="drop", missing_tail=1, missing_gaps=True).keep,
        slices(0, 1, 2, 3, 6, 8, 9),
    )
    dropped = plan(train_on="all", missing_labels="drop", missing_classes=("stomach",))
    assert not dropped.ignore.any()  # drop takes whole slices out, whatever missing_classes says


def test_ignore_keeps_the_slices_and_marks_the_chosen_classes() -> None:
    every = plan(train_on="all", missing_labels="ignore")  # () = every class
    np.testing.assert_array_equal(every.keep, np.ones(10, bool))
    want = np.zeros((10, 3), bool)
    want[7:] = True
    np.testing.assert_array_equal(every.ignore, want)
    bowel = plan(train_on="all", missing_labels="ignore", missing_classes=("small_bowel", "large_bowel"))
    want = np.zeros((10, 3), bool)
    want[7:, :2] = True  # stomach stays a trusted empty label there
    np.testing.assert_array_equal(bowel.ignore, want)
    gaps = plan(
        train_on="all",
        missing_labels="ignore",
        missing_classes=("large_bowel",),
        missing_gaps=True,
        missing_tail=2,
    )
    want = np.zeros((10, 3), bool)
    want[[4, 5, 7, 8], 0] = True
    np.testing.assert_array_equal(gaps.ignore, want)


def test_nothing_is_missing_among_labelled_slices() -> None:
    """Missing slices are unlabelled ones, so with train_on: labelled the three options train alike."""
    for mode in ("empty", "drop", "ignore"):
        p = plan(train_on="labelled", missing_labels=mode, missing_gaps=True)
        np.testing.assert_array_equal(p.keep, slices(1, 2, 3, 6))
        assert not p.ignore[p.keep].any()


def test_volume_without_labels() -> None:
    none = np.zeros((4, 3), bool)
    assert not label_plan(none, DataCfg(train_on="all", missing_labels="drop"), CLASSES).keep.any()
    ignored = label_plan(
        none, DataCfg(train_on="all", missing_labels="ignore", missing_classes=("stomach",)), CLASSES
    )
    assert ignored.keep.all() and ignored.ignore[:, 2].all() and not ignored.ignore[:, :2].any()
    assert label_plan(none, DataCfg(train_on="all"), CLASSES).keep.all()  # empty: trusted as empty


def test_unknown_class_fails_naming_the_key_whatever_the_mode() -> None:
    assert class_indices((), CLASSES) == [0, 1, 2]
    assert class_indices(("stomach", "large_bowel"), CLASSES) == [2, 0]
    for mode in ("empty", "drop", "ignore"):
        with pytest.raises(
            ConfigError, match=r"'data.missing_classes' names \['bowel'\].*valid: large_bowel"
        ):
            plan(missing_labels=mode, missing_classes=("bowel",))
    with pytest.raises(ValueError, match=r"\(slices, 3\)"):
        label_plan(np.zeros((4, 2), bool), DataCfg(), CLASSES)
