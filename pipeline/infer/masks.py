"""Mask kernels of the post-processing steps: uint8 probabilities, thresholds, slice gates, z-runs, components.

Pure functions of arrays (no parameters record, no registry): the step records of
:mod:`pipeline.infer.steps` call them, and tests compare them with hand-computed volumes.
Probabilities travel as uint8 (``round(p * 255)``, the out-of-fold format), so what was tuned on
OOF files is applied bit for bit the same way at submission time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

Box3 = tuple[slice, slice, slice]  # (S, H, W) slices of a volume

_STRUCTURE_26 = ndimage.generate_binary_structure(3, 3)
_STRUCTURE_2D = np.zeros((3, 3, 3), bool)
_STRUCTURE_2D[1] = True  # 8-connected in-plane, never across slices


# --------------------------------------------------------------------------- probabilities


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p * 255)`` (the OOF format)."""
    out = np.asarray(probs, dtype=np.float32) * 255.0
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out, out=out).astype(np.uint8)


def prob_level(threshold: float) -> int:
    """The uint8 level of a probability threshold: a pixel is foreground when ``q >= level``."""
    return int(np.clip(round(threshold * 255.0), 0, 256))


def threshold_probs(probs_u8: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of uint8 probabilities at a threshold in [0, 1]."""
    if probs_u8.dtype != np.uint8:
        raise TypeError(f"threshold_probs expects uint8 probabilities (round(p*255)), got {probs_u8.dtype}")
    return probs_u8 >= prob_level(threshold)


def gate_keep(gate_probs: np.ndarray | None, gate_threshold: float, n_slices: int) -> np.ndarray | None:
    """(S,) the slices whose classifier probability reaches the threshold; None (all) when off."""
    if gate_probs is None or gate_threshold <= 0.0:
        return None
    gate_probs = np.asarray(gate_probs)
    if gate_probs.shape != (n_slices,):
        raise ValueError(f"gate probabilities {gate_probs.shape} do not match the {n_slices} slices")
    return gate_probs >= gate_threshold


def gate_slices(mask: np.ndarray, gate_probs: np.ndarray | None, gate_threshold: float) -> np.ndarray:
    """Empty (in place) the slices of a (S, H, W) mask whose gate probability is below the threshold."""
    return empty_slices(mask, gate_keep(gate_probs, gate_threshold, len(mask)))


def prob_gate_keep(probs_u8: np.ndarray, pixels: int, level: float) -> np.ndarray | None:
    """(S,) the slices of (S, H, W) uint8 probabilities with more than ``pixels`` pixels at ``q >= level``.

    None (every slice) when the gate is off (``pixels <= 0``).
    """
    if pixels <= 0:
        return None
    hits = threshold_probs(probs_u8, level).reshape(len(probs_u8), -1)
    return np.count_nonzero(hits, axis=1) > pixels


def z_range(positive: npt.ArrayLike, run: int) -> tuple[int, int] | None:
    """[first, last] (inclusive) of a (S,) bool slice vector by runs of >= ``run`` consecutive Trues.

    ``first`` starts the first such run, ``last`` ends the last one; None when no run is that long.
    """
    padded = np.concatenate([[0], np.asarray(positive, dtype=np.int8), [0]])
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # runs are [start, end)
    long = np.flatnonzero(ends - starts >= max(1, run))
    if long.size == 0:
        return None
    return int(starts[long[0]]), int(ends[long[-1]] - 1)


def z_keep(mask: np.ndarray, run: int) -> np.ndarray | None:
    """(S,) the slices of a (S, H, W) mask that z-continuity keeps; None (all) when ``run <= 1``."""
    if run <= 1:
        return None
    keep = np.zeros(len(mask), dtype=bool)
    span = z_range(mask.reshape(len(mask), -1).any(axis=1), run)
    if span is not None:
        keep[span[0] : span[1] + 1] = True
    return keep


def empty_slices(mask: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Empty (in place) the slices of a (S, H, W) mask that ``keep`` (S,) does not keep."""
    if keep is not None:
        mask[~keep] = False
    return mask


def foreground_box(mask: npt.ArrayLike) -> Box3 | None:
    """The smallest box (one slice per axis) of a (S, H, W) mask holding its foreground; None when empty."""
    m = np.asarray(mask)
    hits_s = np.flatnonzero(m.reshape(len(m), -1).any(axis=1))
    if hits_s.size == 0:
        return None
    plane = np.asarray(m[hits_s[0] : hits_s[-1] + 1].any(axis=0))
    hits_h, hits_w = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    s, h, w = (slice(int(hits[0]), int(hits[-1]) + 1) for hits in (hits_s, hits_h, hits_w))
    return s, h, w


@dataclass(frozen=True)
class Components:
    """26-connected 3D components of a (S, H, W) mask, labelled inside its foreground box only.

    Labelling the box instead of the whole volume gives the same components (nothing lies
    outside it) several times faster, which matters when tuning re-labels every candidate.
    """

    shape: tuple[int, ...]
    box: tuple[slice, ...] | None  # None: empty mask
    labels: np.ndarray  # int32 labels inside ``box``
    sizes: np.ndarray  # voxel count per label, [0] = 0

    @classmethod
    def of(cls, mask: np.ndarray, volumetric: bool = True) -> Components:
        """Components of a (S, H, W) mask: 3D 26-connected, or per slice 8-connected (``volumetric=False``)."""
        mask = np.asarray(mask, dtype=bool)
        box = foreground_box(mask)
        if box is None:
            return cls(mask.shape, None, np.zeros((0,) * mask.ndim, np.int32), np.zeros(1, np.int64))
        structure = _STRUCTURE_26 if volumetric else _STRUCTURE_2D
        labels, n = ndimage.label(mask[box], structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        return cls(mask.shape, box, labels, sizes)

    def n_kept(self, min_size: int) -> int:
        """How many components :meth:`keep` keeps: equal counts mean equal masks (sizes only rise)."""
        return int(np.count_nonzero(self.sizes >= max(1, min_size)))

    def kept_min_size(self, min_size: int) -> np.ndarray:
        """(labels,) bool: the components with at least ``min_size`` voxels."""
        keep = self.sizes >= max(1, min_size)
        keep[0] = False
        return keep

    def keep(self, min_size: int) -> np.ndarray:
        """The full-size mask of the components with at least ``min_size`` voxels."""
        return self.keep_labels(self.kept_min_size(min_size))

    def reference_sizes(self, volumetric: bool = True) -> np.ndarray:
        """Per label, the size of the largest component it is compared with: the volume's largest
        (``volumetric``) or the largest of its own slice (2D images). [0] = 0."""
        ref = np.zeros_like(self.sizes)
        if self.box is None or len(self.sizes) < 2:
            return ref
        if volumetric:
            ref[1:] = self.sizes[1:].max()
            return ref
        first = np.asarray([s[0].start if s is not None else 0 for s in ndimage.find_objects(self.labels)])
        largest = np.zeros(first.max() + 1, dtype=self.sizes.dtype)
        np.maximum.at(largest, first, self.sizes[1:])
        ref[1:] = largest[first]
        return ref

    def kept_relative(self, fraction: float, volumetric: bool = True) -> np.ndarray:
        """(labels,) bool: components of at least ``fraction`` x the largest (see :meth:`reference_sizes`)."""
        keep = self.sizes >= fraction * self.reference_sizes(volumetric)
        keep[0] = False
        keep &= self.sizes > 0
        return keep

    def keep_labels(self, keep: np.ndarray) -> np.ndarray:
        """The full-size mask of the labels marked in ``keep``."""
        out = np.zeros(self.shape, dtype=bool)
        if self.box is not None:
            out[self.box] = keep[self.labels]
        return out


def keep_large_components(mask: np.ndarray, fraction: float, volumetric: bool = True) -> np.ndarray:
    """Drop connected components smaller than ``fraction`` x the largest: in the volume (3D, 26-connected),
    or in its own image (2D, ``volumetric=False``). ``fraction`` 1 keeps the largest only; 0 = off."""
    mask = np.asarray(mask, dtype=bool)
    if fraction <= 0 or not mask.any():
        return mask
    components = Components.of(mask, volumetric)
    return components.keep_labels(components.kept_relative(fraction, volumetric))


def remove_small_components(mask: np.ndarray, min_size: int, volumetric: bool = True) -> np.ndarray:
    """Drop connected components of a (S, H, W) mask smaller than ``min_size`` voxels (see :class:`Components`)."""
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask
    return Components.of(mask, volumetric).keep(min_size)
