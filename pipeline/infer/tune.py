"""Decide the ensemble's blend and post-processing on out-of-fold predictions (``make tune``).

The objective is the dataset's own metric (``DatasetSpec.volume_stats`` / ``aggregate``: for
UW-Madison 0.4 Dice + 0.6 (1 - 3D Hausdorff), for LGG the mean per-patient Dice, for the nerve
images the mean Dice with empty vs empty = 1) over the OOF volumes. The search is coordinate-wise,
each step starting from the previous one's choice and keeping it unless a candidate scores
strictly better (the current value is tried first and kept on ties):

1. ``raw``: the members blended with the config's weights, cut at 0.5, nothing else;
2. ``blend_raw``: member blend weights at those raw settings, a grid over the simplex in steps of
   ``1 / tune.blend_steps``, class by class when ``tune.per_class_blend`` (skipped with one member);
3. the post-processing steps of :mod:`pipeline.infer.steps`, in their order, class by class
   (the other classes held): ``pixel_threshold``; ``gate_threshold`` (the classifier gate, skipped
   without a classifier); ``prob_gate`` (N x t of ``tune.prob_gate_pixels`` x ``prob_gate_levels``);
   ``z_run`` (``tune.z_runs``, volumetric datasets only); ``min_component_size``;
   ``component_fraction`` (``tune.component_fractions``). A step's "off"
   value (N = 0, k = 0, f = 0) is always one of its candidates where it has one, so tuning switches it
   off where it does not help; a step whose grid leaves nothing to try is recorded as skipped;
4. ``refine``, ``refine_3``, ...: up to ``tune.sweeps - 1`` more sweeps over 3 (a row each, noted
   "converged" once nothing moves): the first sweep picks the pixel threshold before any gate
   exists, so it tends to be too high (it does the gates' work), and the next sweep corrects it;
5. ``blend``: member blend weights again, with the per-class settings held.

**Held-apart estimate.** A search tuned on the OOF it is scored on flatters itself. With
``tune.holdout = f > 0`` the OOF volume *groups* (cases, patients, subjects: never a volume apart
from its group) are split once, seeded by ``tune.holdout_seed``: a fraction ``f`` held apart, the
rest the tuning part. The whole search runs on the tuning part, and the settings it holds after
each step are scored on the held-apart volumes (``held_out``, with ``held_gain`` step over step).
The decisions that are saved come from a second search on every volume (``score``): they use all
the data, and the held-apart column says how much of each step's gain survives on volumes the
choice never saw. The two searches run in lockstep and share their passes over the OOF (a volume
the tuning part holds is scored once where both hold the same settings), so the estimate costs far
less than a second search. Nested folds would give every volume a held-apart score but cost a
search per fold. ``held_out`` and ``score`` are on different volume sets,
so their gap mixes optimism with how hard the held volumes are: compare the gains.

With several members, every member alone (weight 1 in every class) at the tuned post-processing
is scored too (rows ``alone:<member>``), so the blend's own gain shows.

**Blend guard** (``tune.blend_guard``, on by default). In-sample, a blend never scores below its
best member (the member alone is on the weight grid), so an overfitted blend is only seen held
apart. When the tuning part's blend scores below one of its members alone on the held-apart groups
(both at the tuning part's post-processing, which favours the blend), that member is kept alone:
the search runs again with its weight held at 1 in every class (its own thresholds and gates), and
those decisions are saved, with the verdict under ``oof.blend_guard``; the members-alone rows stay
those of the blend's search.

The search itself is :class:`pipeline.infer.search.Search`; the scoring with shared work between
candidates is :mod:`pipeline.infer.evaluate`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import EnsembleConfig, TuneCfg
from pipeline.datasets.base import DatasetSpec
from pipeline.infer.ensemble import OOFSet, load_oof
from pipeline.infer.evaluate import (
    default_workers,
    evaluate,
    evaluate_pooled,
    evaluate_settings,
    metric_values,
)
from pipeline.infer.postprocess import (
    BlendGain,
    BlendGuard,
    Decisions,
    Grids,
    OOFSummary,
    Weights,
    decisions_path,
    write_decisions,
)
from pipeline.infer.search import Search, Track, raw_params, simplex_grid
from pipeline.infer.steps import registry

__all__ = [
    "default_workers",
    "evaluate",
    "fold_splits",
    "holdout_splits",
    "metric_values",
    "raw_params",
    "run_tune",
    "simplex_grid",
    "split_volumes",
    "tune_ensemble",
]

log = logging.getLogger(__name__)

Split = tuple[list[str], list[str], list[str]]  # (tuning volumes, held-apart volumes, held groups)


def one_hot(n_classes: int, n_members: int, member: int) -> np.ndarray:
    """(classes, members) weights with the whole blend on one member."""
    w = np.zeros((n_classes, n_members))
    w[:, member] = 1.0
    return w


def split_volumes(oof: OOFSet, fraction: float, seed: int) -> Split:
    """(tuning volumes, held-apart volumes, held groups): ``fraction`` of the OOF groups held apart, seeded.

    At least one group on each side; nothing held apart (``[]``) when ``fraction`` is 0 or the
    OOF spans a single group.
    """
    groups = sorted({oof.groups.get(v, v) for v in oof.volumes})
    if fraction <= 0 or len(groups) < 2:
        return list(oof.volumes), [], []
    n_held = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    held = sorted(str(g) for g in np.random.default_rng(seed).permutation(groups)[:n_held])
    in_held = [oof.groups.get(v, v) in held for v in oof.volumes]
    return (
        [v for v, h in zip(oof.volumes, in_held) if not h],
        [v for v, h in zip(oof.volumes, in_held) if h],
        held,
    )


def fold_splits(oof: OOFSet, folds: int, seed: int) -> list[Split]:
    """Cross-fitting splits: the OOF groups dealt into ``folds`` folds (seeded), each split holding one apart.

    Every volume is held apart in exactly one split; fewer folds when there are fewer groups, and
    none when the OOF spans a single group.
    """
    groups = sorted({oof.groups.get(v, v) for v in oof.volumes})
    if len(groups) < 2:
        return []
    k = min(folds, len(groups))
    fold_of = {g: i % k for i, g in enumerate(np.random.default_rng(seed).permutation(groups))}
    splits = []
    for f in range(k):
        in_held = [fold_of[oof.groups.get(v, v)] == f for v in oof.volumes]
        splits.append(
            (
                [v for v, h in zip(oof.volumes, in_held) if not h],
                [v for v, h in zip(oof.volumes, in_held) if h],
                sorted(str(g) for g in groups if fold_of[g] == f),
            )
        )
    return splits


def holdout_splits(oof: OOFSet, tune: TuneCfg) -> list[Split]:
    """The held-apart design of ``tune``: ``holdout_folds`` cross-fitting splits, else one split of
    ``holdout`` (none when that holds nothing apart)."""
    if tune.holdout_folds > 1:
        return fold_splits(oof, tune.holdout_folds, tune.holdout_seed)
    split = split_volumes(oof, tune.holdout, tune.holdout_seed)
    return [split] if split[1] else []


def _step_rows(full: Track, held: list[dict] | None) -> list[dict]:
    rows: list[dict] = []
    for i, rec in enumerate(full.records):
        prev = full.records[i - 1].result["score"] if i else None
        row = {"step": rec.step, "label": rec.label, **metric_values(rec.result)}
        row["gain"] = None if prev is None else rec.result["score"] - prev
        row["held_out"] = None if held is None else held[i]["score"]
        row["held_gain"] = None if held is None or not i else held[i]["score"] - held[i - 1]["score"]
        if rec.skipped:
            row["skipped"] = rec.skipped
        rows.append(row)
    return rows


@dataclass
class _Run:
    """One tuning run: the search on every volume, its held-apart twin, and the members alone."""

    full: Track
    final: dict
    alone_all: list[dict]
    held_steps: list[dict] | None = None
    alone_held: list[dict] | None = None
    holdout: dict[str, Any] = field(default_factory=dict)


def _tune_run(
    oof: OOFSet, cfg: EnsembleConfig, splits: list[Split], fixed: np.ndarray | None, kw: dict
) -> _Run:
    """The searches in lockstep (every volume; each tuning part; weights held at ``fixed`` when given),
    then the scores of their settings."""
    names, classes = oof.member_names(), oof.spec.classes
    tags = ["tuning part: "] if len(splits) == 1 else [f"fold {f}: " for f in range(len(splits))]
    volume_sets = [("", oof.volumes)] + [(tag, split[0]) for tag, split in zip(tags, splits)]
    full, *parts = Search(oof, cfg, volume_sets, fixed=fixed, **kw).run().tracks
    blended = len(names) > 1 and fixed is None
    alone = [one_hot(len(classes), len(names), m) for m in range(len(names))] if blended else []
    final = evaluate(oof, [full.weights], full.params, per_class=True, desc="final OOF", **kw)[0]
    alone_all = evaluate_settings(
        oof, [(w, full.params) for w in alone], oof.volumes, desc="members alone", **kw
    )
    tune = cfg.tune
    design: dict[str, Any] = {"fraction": tune.holdout, "seed": tune.holdout_seed}
    if tune.holdout_folds > 1:
        design = {"folds": tune.holdout_folds, "seed": tune.holdout_seed}
    run = _Run(full, final, alone_all, holdout=design)
    if not splits:
        off = tune.holdout <= 0 and tune.holdout_folds <= 1
        run.holdout["skipped"] = "tune.holdout is 0" if off else "the OOF spans one group"
        log.info("no held-apart estimate: %s", run.holdout["skipped"])
        return run
    _score_held_apart(oof, run, parts, alone, splits, kw)
    return run


def _score_held_apart(
    oof: OOFSet, run: _Run, parts: list[Track], alone: list[np.ndarray], splits: list[Split], kw: dict
) -> None:
    """Each tuning part's settings after each step (and each member alone) on its held-apart volumes,
    pooled over the parts (one part: a plain held-apart split; several: cross-fitted)."""
    names, classes = oof.member_names(), oof.spec.classes
    # the tracks record the same steps by construction (skips depend on the config, not the data)
    pooled = [
        ([(r.weights, r.params) for r in part.records] + [(w, part.params) for w in alone], split[1])
        for part, split in zip(parts, splits)
    ]
    scored = evaluate_pooled(oof, pooled, desc="held-apart", **kw)
    n_steps = len(parts[0].records)
    run.held_steps, run.alone_held = scored[:n_steps], scored[n_steps:]
    held = [v for split in splits for v in split[1]]
    run.holdout |= {
        "groups": [g for split in splits for g in split[2]],
        "days_tuning": round(float(np.mean([len(split[0]) for split in splits]))),
        "days_held": len(held),
        "tuning_score": float(np.mean([part.records[-1].result["score"] for part in parts])),
        "held_score": run.held_steps[-1]["score"],
    }
    settings = [
        {
            "weights": _weights_json(part.weights, classes, names),
            "classes": {cls: asdict(p) for cls, p in zip(classes, part.params)},
        }
        for part in parts
    ]
    if len(parts) == 1:
        run.holdout |= settings[0]
    else:
        run.holdout["fold_groups"] = [split[2] for split in splits]
        run.holdout["fold_settings"] = settings


def _guard(tune: TuneCfg, names: list[str], run: _Run) -> tuple[int, BlendGuard] | None:
    """(member, verdict) when a member alone beats the blend held apart (None: the blend stands)."""
    if not (tune.blend_guard and run.alone_held and run.held_steps):
        return None
    best = int(np.argmax([r["score"] for r in run.alone_held]))
    blend_held, alone_held = run.held_steps[-1]["score"], run.alone_held[best]["score"]
    if blend_held >= alone_held:
        return None
    return best, BlendGuard(kept=names[best], blend_held_out=blend_held, alone_held_out=alone_held)


def _guarded_run(
    oof: OOFSet, cfg: EnsembleConfig, splits: list[Split], kw: dict
) -> tuple[_Run, _Run, BlendGuard | None]:
    """(the run whose decisions are saved, the blend's run, the guard's verdict).

    Both runs are the blend's unless the blend guard keeps a member alone: then the search runs
    again with that member's weight held at 1 in every class.
    """
    names, classes = oof.member_names(), oof.spec.classes
    blend_run = _tune_run(oof, cfg, splits, None, kw)
    verdict = _guard(cfg.tune, names, blend_run)
    if verdict is None:
        return blend_run, blend_run, None
    member, guard = verdict
    log.warning(
        "blend guard: the blend scores %.5f on the held-apart groups, %s alone %.5f: keeping %s alone "
        "(post-processing re-tuned; tune.blend_guard=false keeps the blend)",
        guard.blend_held_out,
        guard.kept,
        guard.alone_held_out,
        guard.kept,
    )
    run = _tune_run(oof, cfg, splits, one_hot(len(classes), len(names), member), kw)
    guard.blend_score = blend_run.final["score"]
    guard.blend_weights = _weights_json(blend_run.full.weights, classes, names)
    return run, blend_run, guard


def _alone_rows(blend_run: _Run, names: list[str]) -> list[dict]:
    """The steps-table rows of every member alone (none with one member: it is the blend)."""
    return [
        {
            "step": f"alone:{names[m]}",
            "label": f"{names[m]} alone (tuned post-processing)",
            **metric_values(result),
            "gain": None,
            "held_out": None if blend_run.alone_held is None else blend_run.alone_held[m]["score"],
            "held_gain": None,
        }
        for m, result in enumerate(blend_run.alone_all)
    ]


def _blend_gain(blend_run: _Run, names: list[str]) -> BlendGain | None:
    """The blend over its best member alone, in-sample and held apart (None with one member)."""
    if not blend_run.alone_all:
        return None
    best = int(np.argmax([r["score"] for r in blend_run.alone_all]))
    held_gain = None
    if blend_run.alone_held is not None and blend_run.held_steps is not None:
        held_gain = blend_run.held_steps[-1]["score"] - blend_run.alone_held[best]["score"]
    gain = BlendGain(names[best], blend_run.final["score"] - blend_run.alone_all[best]["score"], held_gain)
    log.info("blend over %s alone: %+.5f in-sample", names[best], gain.score)
    return gain


def _grids(tune: TuneCfg) -> Grids:
    steps = registry()
    candidates = {
        step.name: [list(v) if isinstance(v, tuple) else v for v in steps.candidates(step, tune)]
        for step in steps
    }
    return Grids(candidates, tune.blend_steps, tune.sweeps, tune.per_class_blend)


def tune_ensemble(
    cfg: EnsembleConfig, spec: DatasetSpec, root: Path, *, workers: int | None = None, progress: bool = True
) -> Decisions:
    """Run the search on the OOF of ``cfg``'s members (and on its tuning part) and return the decisions.

    With the blend guard on (``tune.blend_guard``), a blend that loses on the held-apart groups to one
    of its members alone (both at the tuning part's settings) is not kept: the search runs again with
    that member's weight held at 1 in every class, and its decisions are saved.
    """
    oof = load_oof(cfg, spec, root, progress)
    names, classes = oof.member_names(), oof.spec.classes
    kw = {"workers": workers or default_workers(), "progress": progress}
    splits = holdout_splits(oof, cfg.tune)
    if len(splits) == 1:
        n_held, n_all = len(splits[0][1]), len(oof.volumes)
        log.info("held apart: %d of the OOF groups (%d of %d volumes)", len(splits[0][2]), n_held, n_all)
    elif splits:
        log.info(
            "held apart: cross-fitted over %d folds of the OOF groups (each volume held once)", len(splits)
        )
    run, blend_run, guard = _guarded_run(oof, cfg, splits, kw)
    full, final = run.full, run.final
    summary = OOFSummary(
        days=len(oof.volumes),
        slices=oof.n_slices,
        metrics=metric_values(final),
        held_out=run.holdout.get("held_score"),
        blend_gain=_blend_gain(blend_run, names),
        blend_guard=guard,
        grids=_grids(cfg.tune),
    )
    return Decisions(
        classes=dict(zip(classes, full.params)),
        weights=_weights_json(full.weights, classes, names),
        members=[{"config": m.name, "folds": m.folds} for m in oof.members],
        classifier=oof.classifier,
        ensemble=cfg.name,
        steps=_alone_rows(blend_run, names) + _step_rows(full, run.held_steps),
        per_class={
            cls: {**final["per_class"][cls], **asdict(full.params[c])} for c, cls in enumerate(classes)
        },
        curves=full.curves,
        oof=summary,
        dataset=oof.spec.name,
        volumetric=oof.spec.volumetric,
        holdout=run.holdout,
    )


def _weights_json(weights: np.ndarray, classes: tuple[str, ...], names: list[str]) -> Weights:
    return {cls: {n: float(w) for n, w in zip(names, row)} for cls, row in zip(classes, weights)}


def run_tune(
    cfg: EnsembleConfig, spec: DatasetSpec, root: Path, *, workers: int | None = None, progress: bool = True
) -> Path:
    """Tune on OOF and write ``runs/ensemble/<cfg>/postprocess.json`` (atomically)."""
    decisions = tune_ensemble(cfg, spec, root, workers=workers, progress=progress)
    held = decisions.holdout.get("held_score")
    log.info(
        "tuned OOF score %.5f on every volume%s",
        decisions.oof.score,
        "" if held is None else f"; {held:.5f} on the held-apart groups (chosen on the rest)",
    )
    return write_decisions(decisions_path(cfg.name), decisions)
