"""Which slices of a volume to train on, and which (slice, class) labels are missing rather than empty.

UW-Madison's annotators sometimes stopped before the organs did: the slices after the last
labelled slice of a volume (and, sometimes, unlabelled slices between labelled ones) show bowel
with an empty mask. ``data.missing_labels`` chooses how training treats that region:

- ``empty``: trust it as empty (the plain reading of the labels);
- ``drop``: leave those slices out of training (the 1st place's "notail");
- ``ignore``: keep the slices, but ``data.missing_classes`` (every class when empty) contribute no
  loss there (nnU-Net's ignore label): their targets are set to :data:`IGNORE`.

A slice is *labelled* when any class has a positive pixel in it; the missing region of a volume is
the slices after its last labelled one (at most ``data.missing_tail`` of them) plus, with
``data.missing_gaps``, the unlabelled slices between its first and last labelled one. A volume
without any labelled slice is missing throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import ConfigError, DataCfg

IGNORE = -1.0  # target value of a missing label: the loss skips these elements


@dataclass(frozen=True)
class LabelPlan:
    """Of one volume: the slices to train on and the (slice, class) labels to ignore."""

    keep: np.ndarray  # (S,) bool
    ignore: np.ndarray  # (S, C) bool: the loss skips class c on slice s


def missing_slices(labelled: np.ndarray, tail: int | None = None, gaps: bool = False) -> np.ndarray:
    """(S,) bool: the slices whose labels count as missing (see the module doc)."""
    labelled = np.asarray(labelled, dtype=bool)
    hits = np.flatnonzero(labelled)
    missing = np.zeros(labelled.shape, dtype=bool)
    if hits.size == 0:
        missing[:] = True
        return missing
    first, last = int(hits[0]), int(hits[-1])
    end = len(labelled) if tail is None else min(len(labelled), last + 1 + tail)
    missing[last + 1 : end] = True
    if gaps:
        missing[first:last] |= ~labelled[first:last]
    return missing


def class_indices(names: tuple[str, ...], classes: tuple[str, ...]) -> list[int]:
    """Positions of ``names`` among the dataset's ``classes`` (all of them when ``names`` is empty)."""
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ConfigError(
            f"'data.missing_classes' names {unknown}, which are not classes of this dataset "
            f"(valid: {', '.join(classes)})"
        )
    return [classes.index(n) for n in names] if names else list(range(len(classes)))


def label_plan(present: np.ndarray, data_cfg: DataCfg, classes: tuple[str, ...]) -> LabelPlan:
    """What to train on in a volume whose per-slice class presence is ``present`` (S, C) bool.

    ``keep``: ``data.train_on`` (every slice, or the labelled ones), less the missing slices under
    ``drop``. ``ignore``: under ``ignore``, the missing slices x ``data.missing_classes``; it is never
    set on a labelled slice, so with ``train_on: labelled`` the three options train alike.
    """
    present = np.asarray(present, dtype=bool)
    if present.ndim != 2 or present.shape[1] != len(classes):
        raise ValueError(
            f"present must be (slices, {len(classes)}) for classes {classes}, got {present.shape}"
        )
    cols = class_indices(data_cfg.missing_classes, classes)  # a misspelt class fails whatever the mode
    labelled = np.asarray(present.any(axis=1), dtype=bool)
    keep = labelled.copy() if data_cfg.train_on == "labelled" else np.ones_like(labelled)
    ignore = np.zeros(present.shape, dtype=bool)
    if data_cfg.missing_labels == "empty":
        return LabelPlan(keep, ignore)
    missing = missing_slices(labelled, data_cfg.missing_tail, data_cfg.missing_gaps)
    if data_cfg.missing_labels == "drop":
        keep &= ~missing
    else:  # "ignore" (the values are checked when the config is loaded)
        ignore[np.ix_(missing, np.asarray(cols, dtype=np.intp))] = True
    return LabelPlan(keep, ignore)
