"""The members of an ensemble: their run folders, their out-of-fold predictions, and the blend.

A member is a trained segmenter config (``runs/seg/<name>/fold_<k>/``): a 2.5D or a 3D network,
the same to this module; its folds are the ones listed in the ensemble config or, when none are,
every ``fold_<k>`` found. Out-of-fold files (``oof/<volume_id>.npz``: ``probs`` uint8 (S, classes,
H, W), ``ids``) are decoded once into a ``.npy`` cache under ``$CACHE_DIR/oof/`` holding only their
non-zero box (:mod:`pipeline.infer.oof_cache`) and memory-mapped afterwards, so the many passes of
tuning neither re-decode nor hold the whole set in memory; :meth:`OOFSet.view` cuts a volume to the
box of every member's and the truth's voxels.

A member is named by its run: ``config: demo_seg`` (or ``configs/demo_seg.yaml``) is the run folder
``runs/seg/demo_seg/`` that ``make train-seg CONFIG=configs/demo_seg.yaml`` writes (:func:`run_name`);
what a member was trained with is the resolved ``config.yaml`` in that folder (read where it is
needed, by :func:`pipeline.infer.predict.load_member`), never the YAML in ``configs/``, which may
have changed since.

The blend is a weighted mean of the members' uint8 probabilities with one weight vector per class
(:func:`blend_uint8` with a (classes, members) matrix): a 3D member may be better on one organ and
the 2.5D one on another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numba import njit
from tqdm.auto import tqdm

from pipeline.config import ConfigError, EnsembleConfig, MemberCfg, TTACfg, config_from_text
from pipeline.data.volumes import Volume, VolumeStore
from pipeline.datasets.base import DatasetSpec
from pipeline.errors import DataError
from pipeline.infer.oof_cache import Box, OOFEntry, oof_entry, union_box, volume_box
from pipeline.models.predict import tta_views
from pipeline.paths import run_dir
from pipeline.train.checkpoint import train_command

log = logging.getLogger(__name__)

OOF_DIR = "oof"
CLS_OOF_FILE = "oof.csv"


def run_name(config: str) -> str:
    """The run folder a member reference names: ``demo_seg`` and ``configs/demo_seg.yaml`` are ``demo_seg``.

    A config's name is its file stem, so this is the folder its training wrote; nothing is read
    from ``configs/`` (what the member was trained with is its run's ``config.yaml``).
    """
    return Path(config).stem


def find_folds(stage: str, name: str, needs: str, folds: tuple[int, ...] | None = None) -> list[int]:
    """Folds of ``runs/<stage>/<name>`` that hold ``needs`` (a file or folder); the listed ones must."""
    base = run_dir(stage, name)
    if folds is not None:
        missing = [k for k in folds if not (run_dir(stage, name, k) / needs).exists()]
        if missing:
            raise DataError(
                f"{base}: fold(s) {missing} have no {needs}; train them first "
                f"(`{train_command(stage, name, missing)}`) or drop them from the ensemble config"
            )
        return sorted(int(k) for k in folds)
    found = []
    for path in sorted(base.glob("fold_*")) if base.is_dir() else []:
        suffix = path.name.removeprefix("fold_")
        if suffix.isdigit() and (path / needs).exists():
            found.append(int(suffix))
    if not found:
        raise DataError(f"no trained fold with {needs} under {base}; run `{train_command(stage, name)}`")
    return sorted(found)


def check_members(cfg: EnsembleConfig) -> list[MemberCfg]:
    if not cfg.members:
        raise ConfigError(f"ensemble config '{cfg.name}' lists no members (members: [{{config: ...}}])")
    names = [run_name(m.config) for m in cfg.members]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"ensemble config '{cfg.name}': member(s) {dup} listed twice")
    return list(cfg.members)


def start_weights(members: tuple[MemberCfg, ...]) -> np.ndarray:
    """The members' configured weights normalised to sum 1 (equal when they are all 0)."""
    w = np.array([m.weight for m in members], dtype=np.float64)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


# --------------------------------------------------------------------------- blending


def class_weights(weights: np.ndarray | list, n_members: int, n_classes: int) -> np.ndarray:
    """Blend weights as a float32 (classes, members) matrix, each row normalised to sum 1 (0 stays 0).

    ``weights`` is one vector for every class, (members,), or one row per class, (classes, members).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = np.broadcast_to(w, (n_classes, len(w)))
    if w.shape != (n_classes, n_members):
        raise ValueError(
            f"blend weights of shape {np.shape(weights)} for {n_members} members and {n_classes} classes"
        )
    if (w < 0).any():
        raise ValueError(f"negative blend weights: {w.tolist()}")
    sums = w.sum(axis=1, keepdims=True)
    return np.where(sums > 0, w / np.where(sums > 0, sums, 1.0), 0.0).astype(np.float32)


def _blend_plan(
    probs: list[np.ndarray], weights: np.ndarray | list
) -> tuple[list[np.ndarray], np.ndarray, tuple[int, ...]]:
    """(used member arrays viewed as (A, C, N), their (C, used) weights, the output shape).

    One weight vector blends the arrays as a whole (C = 1); a (classes, members) matrix blends
    along axis 1 of (S, C, H, W) arrays. Members without weight in any class are never read.
    """
    shape = np.shape(probs[0])
    per_class = np.ndim(weights) == 2
    n_classes = shape[1] if per_class and len(shape) > 1 else 1
    w = class_weights(weights, len(probs), n_classes)
    used = [m for m in range(len(probs)) if (w[:, m] > 0).any()]
    if any(np.shape(probs[m]) != shape for m in used):
        raise ValueError(f"blend: member shapes differ: {[np.shape(probs[m]) for m in used]}")
    view = (shape[0], n_classes, -1) if per_class else (1, 1, -1)
    arrays = [np.ascontiguousarray(probs[m], dtype=np.uint8).reshape(view) for m in used]
    return arrays, np.ascontiguousarray(w[:, used]), shape


def blend_uint8(probs: list[np.ndarray], weights: np.ndarray | list) -> np.ndarray:
    """Weighted mean of uint8 probability arrays, rounded back to uint8; per class with a (C, M) matrix.

    ``weights``: (members,) for the whole array, or (classes, members) along axis 1 of (S, C, H, W)
    arrays; each class's row is normalised to sum 1 (an all-zero row gives zeros). One fused pass
    (numba) instead of a float32 temporary per member: tuning blends every OOF volume once per
    candidate. Bit-identical to :func:`blend_uint8_numpy`.
    """
    arrays, w, shape = _blend_plan(probs, weights)
    if len(arrays) == 1 and (w == 1.0).all():  # one member in every class: itself
        return arrays[0].reshape(shape)
    out = np.empty(shape, dtype=np.uint8)
    if not arrays:
        out[...] = 0
        return out
    _blend_kernel(tuple(arrays), w, out.reshape(arrays[0].shape))
    return out


def blend_uint8_numpy(probs: list[np.ndarray], weights: np.ndarray | list) -> np.ndarray:
    """Plain NumPy twin of :func:`blend_uint8` (float32 accumulation in member order, then rint)."""
    arrays, w, shape = _blend_plan(probs, weights)
    acc = np.zeros(arrays[0].shape if arrays else shape, dtype=np.float32)
    for m, p in enumerate(arrays):
        acc += w[:, m][None, :, None] * p.astype(np.float32)
    return np.rint(acc, out=acc).astype(np.uint8).reshape(shape)


@njit(cache=True, nogil=True)
def _blend_kernel(members, weights, out):  # pragma: no cover - compiled
    """out[a, c, i] = rint(sum_m weights[c, m] * members[m][a, c, i]) in float32, members in order."""
    n_a, n_c, n_i = out.shape
    for a in range(n_a):
        for c in range(n_c):
            for i in range(n_i):
                acc = np.float32(0.0)
                for m in range(len(members)):
                    acc += weights[c, m] * np.float32(members[m][a, c, i])
                out[a, c, i] = np.uint8(np.rint(acc))


# --------------------------------------------------------------------------- out-of-fold files


@dataclass
class OOFMember:
    """One member's out-of-fold files: {volume_id: npz path} over its folds."""

    name: str
    folds: list[int]
    files: dict[str, Path]


def find_member_oof(member: MemberCfg) -> OOFMember:
    name = run_name(member.config)
    folds = find_folds("seg", name, OOF_DIR, member.folds)
    files: dict[str, Path] = {}
    for fold in folds:
        for path in sorted((run_dir("seg", name, fold) / OOF_DIR).glob("*.npz")):
            if path.stem in files:
                raise DataError(
                    f"{path.stem} is out-of-fold in two folds of {name}: {files[path.stem]} and {path}"
                )
            files[path.stem] = path
    if not files:
        raise DataError(
            f"{run_dir('seg', name)}: folds {folds} have no oof/*.npz files; retrain or rerun their OOF"
        )
    return OOFMember(name, folds, files)


def warn_views(member: OOFMember, tta: TTACfg) -> None:
    """Say when a member's OOF was predicted with other views than the ``tta`` submit averages: the
    thresholds tuned on it would then be applied to maps of another softness."""
    for fold in member.folds:
        path = run_dir("seg", member.name, fold) / "config.yaml"
        if not path.is_file():
            continue
        views = config_from_text(path.read_text(), source=str(path), stage="seg").oof_tta
        if tta_views(views) != tta_views(tta):
            log.warning(
                "%s fold %d: OOF predicted with views %s but submit averages %s; the tuned thresholds "
                "fit the OOF's maps: set oof_tta to the ensemble's tta in its config and retrain",
                member.name, fold, tta_views(views), tta_views(tta),
            )  # fmt: skip
            return


def read_cls_oof(
    name: str, classes: tuple[str, ...], folds: tuple[int, ...] | None = None
) -> tuple[pd.DataFrame, list[int]]:
    """Classifier OOF of every fold: a frame indexed by slice id with one probability column per class."""
    used = find_folds("cls", name, CLS_OOF_FILE, folds)
    frames = []
    for fold in used:
        path = run_dir("cls", name, fold) / CLS_OOF_FILE
        frame = pd.read_csv(path)
        missing = {"id", *classes} - set(frame.columns)
        if missing:
            raise DataError(
                f"{path}: missing columns {sorted(missing)} (expected id, volume_id, {', '.join(classes)}); "
                "was the classifier trained on another dataset?"
            )
        frames.append(frame[["id", *classes]].astype({"id": str}))
    table = pd.concat(frames).groupby("id", sort=False)[list(classes)].mean()
    return table.astype(np.float32), used


@dataclass(frozen=True)
class VolumeView:
    """One OOF volume as tuning scores it: members, gate and truth cut to the same (S, H, W) box.

    The box holds every member's non-zero probability and the truth, so every mask the
    post-processing can make from a blend lies inside it (a threshold above 0 keeps no voxel
    outside); ``grid`` is the uncut (S, H, W) that the metric scales by.
    """

    volume: str
    probs: list[np.ndarray]  # per member (s, classes, h, w) uint8, C-contiguous
    gate: np.ndarray | None  # (s, classes) classifier probabilities
    truth: np.ndarray  # (s, classes, h, w) uint8 masks
    grid: tuple[int, int, int]


@dataclass
class OOFSet:
    """Everything tuning reads: member probabilities, gate probabilities and truth, per volume."""

    volumes: list[str]
    members: list[OOFMember]
    truth: VolumeStore
    spec: DatasetSpec
    gates: dict[str, np.ndarray] | None  # volume_id -> (S, classes) float32 classifier probabilities
    classifier: dict | None = None  # {"config": name, "folds": [...]}
    n_slices: int = 0
    ids: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # volume_id -> group (case, patient, subject)
    entries: dict[str, list[OOFEntry]] = field(default_factory=dict)  # volume_id -> one per member
    boxes: dict[str, Box] = field(
        default_factory=dict
    )  # volume_id -> box of every member's and the truth's voxels

    def member_probs(self, volume: str) -> list[np.ndarray]:
        return [e.full() for e in self.entries[volume]]

    def view(self, volume: str, cut: bool = True) -> VolumeView:
        """The volume cut to its box (where the dataset's metric allows it and ``cut``), else whole."""
        entries, truth = self.entries[volume], self.truth_mask(volume)
        n_s, _, n_h, n_w = truth.shape
        whole = (slice(0, n_s), slice(0, n_h), slice(0, n_w))
        box = self.boxes[volume] if cut and self.spec.cuts_to_box else whole
        gate = self.gate(volume)
        return VolumeView(
            volume,
            [e.cut(box) for e in entries],
            None if gate is None else np.ascontiguousarray(gate[box[0]]),
            np.ascontiguousarray(truth[box[0], :, box[1], box[2]]),
            (n_s, n_h, n_w),
        )

    def gate(self, volume: str) -> np.ndarray | None:
        return None if self.gates is None else self.gates[volume]

    def truth_mask(self, volume: str) -> np.ndarray:
        return labels_of(self.truth[volume])

    def blend(self, volume: str, weights: np.ndarray) -> np.ndarray:
        """The volume's blended (S, classes, H, W) uint8 probabilities: weights (members,) or (classes, members)."""
        return blend_uint8(self.member_probs(volume), weights)

    def member_names(self) -> list[str]:
        return [m.name for m in self.members]


def labels_of(volume: Volume) -> np.ndarray:
    """The (S, classes, H, W) truth of a train volume (an error when it was read without labels)."""
    if volume.mask is None:
        raise DataError(
            f"{volume.volume_id} has no masks: out-of-fold scoring needs the train split's labels"
        )
    return volume.mask


def _common_volumes(
    members: list[OOFMember], store: VolumeStore, cfg: EnsembleConfig, root: Path
) -> list[str]:
    """The train volumes every member has OOF for, in the store's order (others are left out, with a word)."""
    order = {v: i for i, v in enumerate(store.volume_ids)}
    common = set.intersection(*(set(m.files) for m in members))
    unknown = sorted(common - set(order))
    if unknown:
        raise DataError(
            f"OOF volumes {unknown[:5]} are not train volumes of {root}; were the members trained on another DATA_DIR?"
        )
    for m in members:
        extra = sorted(set(m.files) - common)
        if extra:
            log.warning(
                "%s: %d OOF volumes not covered by every member are left out (%s ...)",
                m.name,
                len(extra),
                extra[0],
            )
    volumes = sorted(common, key=order.__getitem__)
    if not volumes:
        raise DataError(
            f"the members of '{cfg.name}' share no out-of-fold volume; train them on the same folds"
        )
    return volumes


def _check_entries(members: list[OOFMember], volume: Volume, root: Path) -> list[OOFEntry]:
    """The decoded OOF of every member for one volume, which must cover its slices."""
    entries = [oof_entry(m.files[volume.volume_id]) for m in members]
    shape = labels_of(volume).shape
    for m, entry in zip(members, entries):
        if entry.ids != volume.ids or entry.shape != shape:
            raise DataError(
                f"{m.files[volume.volume_id]}: covers {len(entry.ids)} slices of shape {entry.shape[2:]}, but "
                f"{volume.volume_id} has {len(volume.ids)} slices of shape {shape[2:]} in {root}; "
                f"rerun the OOF of {m.name}"
            )
    return entries


def _volume_gate(
    table: pd.DataFrame, classifier: str, volume: Volume, classes: tuple[str, ...]
) -> np.ndarray:
    """(S, classes) classifier OOF probabilities of a volume's slices."""
    missing = [i for i in volume.ids if i not in table.index]
    if missing:
        raise DataError(
            f"classifier OOF of '{classifier}' lacks {len(missing)} slices of {volume.volume_id} "
            f"(first {missing[0]}); train the classifier on the same folds as the segmenters"
        )
    return table.loc[volume.ids, list(classes)].to_numpy(np.float32)


def load_oof(cfg: EnsembleConfig, spec: DatasetSpec, root: Path, progress: bool = True) -> OOFSet:
    """Find, check and cache the OOF of every member (and the classifier) on the volumes all of them cover."""
    members = [find_member_oof(m) for m in check_members(cfg)]
    for member in members:
        warn_views(member, cfg.tta)
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    volumes = _common_volumes(members, store, cfg, root)
    table, cls_info, cls_name = None, None, ""
    if cfg.classifier:
        cls_name = run_name(cfg.classifier)
        table, cls_folds = read_cls_oof(cls_name, spec.classes)
        cls_info = {"config": cls_name, "folds": cls_folds}
    oof = OOFSet(volumes, members, store, spec, None if table is None else {}, cls_info)
    for volume_id in tqdm(volumes, desc="check OOF", unit="vol", disable=not progress):
        volume = store[volume_id]
        oof.entries[volume_id] = _check_entries(members, volume, root)
        if spec.cuts_to_box:
            truth = labels_of(volume)
            boxes = [e.box for e in oof.entries[volume_id]] + [volume_box(truth)]
            oof.boxes[volume_id] = union_box(boxes, truth.shape)
        if oof.gates is not None and table is not None:
            oof.gates[volume_id] = _volume_gate(table, cls_name, volume, spec.classes)
        oof.ids[volume_id] = volume.ids
    oof.n_slices = sum(len(v) for v in oof.ids.values())
    log.info("OOF: %d volumes, %d slices, members %s", len(volumes), oof.n_slices, oof.member_names())
    oof.groups = store.catalog.groupby("volume_id", sort=False)["group"].first().astype(str).to_dict()
    return oof
