"""``make status``: where the pipeline stands for one ensemble, and the next ``make`` command to run.

One table: the data (counts), ``folds.csv`` (folds, groups), each configured stage and member (folds
trained / planned, epochs done / planned, best validation score, OOF written), ``postprocess.json``,
the report and the submission, each fresh or stale; then every fold of every member, and the next
command. Built from file listings, ``metrics.csv``, YAML and file times only (:mod:`pipeline.report.records`):
no model is loaded and no image decoded, so it answers in about a second on the demo.

Stale means older than what it was made from: ``postprocess.json`` older than a member's (or the
classifier's) OOF, or than the ensemble config; the submission and the report older than
``postprocess.json`` (the submission also than a member's ``best.pt``; the report than the submission).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import EnsembleConfig
from pipeline.datasets import get_dataset
from pipeline.errors import PipelineError
from pipeline.report.records import (
    EnsembleRuns,
    MemberRuns,
    finite,
    mtime,
    read_ensemble,
    read_run_config,
    relative,
)

Row = tuple[str, ...]  # (what, state, detail)


@dataclass
class Status:
    """The table's rows, the per-fold rows, notes, and the next command (None: all up to date)."""

    header: str
    rows: list[Row]
    folds: list[tuple[str, ...]]
    next_command: str | None
    why: str = ""
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [self.header, "", *table(("what", "state", "detail"), self.rows)]
        if self.folds:
            head = ("member", "fold", "state", "epochs", "best score (epoch)", "OOF")
            lines += ["", *table(head, self.folds)]
        lines += ["", *(f"note: {n}" for n in self.notes)]
        if self.next_command:
            lines.append(f"next: {self.next_command}    ({self.why})")
        else:
            lines.append(f"next: nothing to run: {self.why}")
        return "\n".join(lines)


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Plain left-aligned columns, the header underlined."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(head), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]


# --------------------------------------------------------------------------- rows


def _data_row(root: Path, spec_name: str, runs: EnsembleRuns) -> tuple[list[Row], bool]:
    spec = get_dataset(spec_name)
    train = root / spec.train_folder
    if not train.is_dir():
        return [("data", "missing", f"{root}: no {spec.train_folder}/ folder")], False
    detail = f"{root}"
    if runs.folds is not None:
        c = runs.folds.counts()
        detail += f"; train: {c['images']} images, {c['volumes']} volumes, {c['groups']} groups"
    try:
        test = spec.scan(root, "test")  # file names and image headers: nothing decoded
        detail += f"; test: {len(test)} images, {test['volume_id'].nunique()} volumes"
    except PipelineError as exc:
        detail += f"; test: unreadable ({exc})"
    if (root / spec.truth_file).is_file():
        detail += f"; test labels: {spec.truth_file}"
    rows: list[Row] = [("data", "present", detail)]
    if runs.folds is None:
        rows.append(("folds.csv", "missing", f"{root / 'folds.csv'}"))
    else:
        c = runs.folds.counts()
        rows.append(
            (
                "folds.csv",
                "present",
                f"{c['folds']} folds over {c['groups']} groups ({c['volumes']} volumes, "
                f"{c['excluded volumes']} excluded)",
            )
        )
    return rows, True


def _member_row(m: MemberRuns) -> Row:
    planned = len(m.planned)
    done = [m.folds[f] for f in m.planned if f in m.folds]
    epochs = sum(f.epochs_done for f in done)
    planned_epochs = sum(f.epochs_planned or 0 for f in done)
    scores = [s for f in done if (s := f.best()[1]) is not None]
    oof = sum(f.oof_written for f in done), sum(len(f.oof_expected) for f in done)
    state = "trained" if m.complete else ("training" if any(f.running for f in done) else "incomplete")
    if not any(f.epochs_done or f.has_last for f in done):
        state = "not started"
    best = f"best score {sum(scores) / len(scores):.4f} (fold mean)" if scores else "no validation score yet"
    detail = (
        f"{m.folds_trained}/{planned} folds, {epochs}/{planned_epochs} epochs, {best}, OOF {oof[0]}/{oof[1]}"
    )
    return (f"{m.stage} {m.name}", state, detail)


def _fold_rows(m: MemberRuns) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for fold, f in m.folds.items():
        epoch, score = f.best()
        best = "" if score is None else f"{score:.4f} ({epoch})"
        state = f.state + (f" ({f.running})" if f.running else "")
        if fold not in m.planned:
            state += " (not planned)"
        oof = f"{f.oof_written}/{len(f.oof_expected)}" if f.oof_expected else "-"
        rows.append(
            (f"{m.stage} {m.name}", fold, state, f"{f.epochs_done}/{f.epochs_planned or '?'}", best, oof)
        )
    return rows


def _tune_state(runs: EnsembleRuns, ensemble_file: Path | None) -> tuple[str, str]:
    """(missing | fresh | stale, detail) of postprocess.json."""
    path = runs.postprocess
    when = mtime(path)
    if when is None:
        return "missing", relative(path)
    newer = [m.name for m in runs.trained() if (t := m.oof_mtime()) is not None and t > when]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "stale", f"{relative(path)} is unreadable"
    tuned = sorted(m.get("config", "") for m in data.get("members", []))
    wanted = sorted(m.name for m in runs.members)
    oof = data.get("oof") or {}
    score, held = finite(oof.get("score")), finite(oof.get("held_out"))
    detail = "OOF score " + (f"{score:.4f}" if score is not None else "?")
    detail += f" (held apart {held:.4f})" if held is not None else ""
    if tuned != wanted:
        return "stale", f"tuned for {tuned}, the config lists {wanted}"
    if newer:
        return "stale", f"older than the OOF of {', '.join(newer)}; {detail}"
    changed = _ensemble_changed(runs.cfg, runs.dir, ensemble_file, when)
    if changed:
        return "stale", f"{changed}; {detail}"
    return "fresh", detail


def _ensemble_changed(cfg: EnsembleConfig, folder: Path, file: Path | None, tuned_at: float) -> str:
    """Why the ensemble config no longer matches its tuning ("" when it does).

    ``make tune`` writes the resolved config beside postprocess.json: its members, classifier and
    grids are compared. Runs tuned before that file existed fall back to the config file's time.
    """
    saved = read_run_config(folder, "ensemble")
    if saved is not None:
        keys = ("members", "classifier", "tune")
        moved = [k for k in keys if getattr(saved, k) != getattr(cfg, k)]
        return f"the config's {', '.join(moved)} changed since make tune" if moved else ""
    changed = file is not None and (t := mtime(file)) is not None and t > tuned_at
    return f"{relative(file)} is newer than postprocess.json" if changed else ""


# --------------------------------------------------------------------------- the whole


def _existing(path: str) -> Path | None:
    from pipeline.config import resolve_config_path

    try:
        return resolve_config_path(path)
    except PipelineError:
        return None


@dataclass(frozen=True)
class Commands:
    """How the next command is spelled: the Makefile variables this status was asked with."""

    ensemble: str
    submission: str
    dataset: str

    def make(self, target: str, **variables: str) -> str:
        words = ["make", target]
        if self.dataset != "uwmgi":
            words.append(f"DATASET={self.dataset}")
        words += [f"{k}={v}" for k, v in variables.items() if v]
        return " ".join(words)


def _detector(rows: list[Row], runs: EnsembleRuns, cmd: Commands) -> list[tuple[str, str]]:
    det = runs.detector
    if det is None:
        return []
    m = det.metrics
    detail = ", ".join(f"{k} {m[k]:.3f}" for k in ("mAP50", "mAP50-95") if finite(m.get(k)) is not None)
    rows.append((f"det {det.name}", "trained" if det.trained else "missing", detail or relative(det.dir)))
    if det.trained:
        return []
    return [(cmd.make("train-det", CONFIG_DET=relative(det.config_file)), "no detector weights")]


def _trained(
    rows: list[Row], runs: EnsembleRuns, cmd: Commands
) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    """The classifier's and the members' rows, their folds' rows, and the training commands still due."""
    folds: list[tuple[str, ...]] = []
    steps: list[tuple[str, str]] = []
    targets: list[tuple[MemberRuns | None, str, str]] = [(runs.classifier, "CONFIG_CLS", "train-cls")]
    targets += [(m, "CONFIG", "train-seg") for m in runs.members]
    for member, var, target in targets:
        if member is None:
            continue
        rows.append(_member_row(member))
        folds += _fold_rows(member)
        missing = member.missing_folds()
        if missing and any(member.folds[f].running for f in missing):
            steps.append(("", f"{member.name} is training now; wait for it"))
        elif missing:
            only = "" if len(missing) == len(member.planned) else " ".join(missing)
            resumes = any(member.folds[f].has_last for f in missing)
            why = f"{member.name}: folds {' '.join(missing)} not trained" + (
                " (a stopped fold resumes from last.pt)" if resumes else ""
            )
            steps.append((cmd.make(target, **{var: relative(member.config_file)}, FOLDS=only), why))
    return folds, steps


def pipeline_status(cfg: EnsembleConfig, root: Path, submission: Path, ensemble_path: str) -> Status:
    """The state of every stage ``cfg`` needs, read from the files under ``root`` and ``$RUNS_DIR``."""
    from pipeline.paths import runs_dir

    runs = read_ensemble(cfg, root)
    cmd = Commands(ensemble_path, str(submission), cfg.dataset)
    header = f"status of {ensemble_path} (dataset {cfg.dataset}): DATA_DIR={root} RUNS_DIR={runs_dir()}"
    rows, have_data = _data_row(root, cfg.dataset, runs)
    steps: list[tuple[str, str]] = []  # (command, why) in pipeline order, the first one is next
    if not have_data:
        steps.append((cmd.make("data"), "no data: the phantom (or `make download` for the real data)"))
    elif runs.folds is None:
        steps.append((cmd.make("folds"), "no folds.csv"))
    steps += _detector(rows, runs, cmd)
    folds, trained_steps = _trained(rows, runs, cmd)
    steps += trained_steps
    tune_state, tune_detail = _tune_state(runs, _existing(ensemble_path))
    rows.append(("tune (postprocess.json)", tune_state, tune_detail))
    if tune_state != "fresh":
        steps.append((cmd.make("tune", ENSEMBLE=ensemble_path), f"postprocess.json {tune_state}"))
    tuned_at = mtime(runs.postprocess)
    steps += _submission(rows, runs, root, submission, tuned_at, cmd)
    steps += _report(rows, runs, submission, tuned_at, cmd)
    notes = [
        f"{relative(m.config_file)} differs from what {m.name} was trained with"
        for m in runs.trained()
        if m.config_changed
    ]
    if not steps:
        return Status(header, rows, folds, None, "every stage is up to date", notes)
    command, why = steps[0]
    return Status(header, rows, folds, command or None, why, notes)


def _submission(
    rows: list[Row], runs: EnsembleRuns, root: Path, submission: Path, tuned_at: float | None, cmd: Commands
) -> list[tuple[str, str]]:
    spec = get_dataset(runs.cfg.dataset)
    test = root / "test"
    has_test = test.is_dir() and any(test.iterdir())
    when = mtime(submission)
    bests = [t for m in runs.members if (t := m.best_mtime()) is not None]
    if when is None:
        rows.append(("submission", "missing" if has_test else "no test images", relative(submission)))
        return (
            [(cmd.make("submit", ENSEMBLE=cmd.ensemble, SUBMISSION=cmd.submission), "no submission")]
            if has_test
            else []
        )
    stale = (tuned_at is not None and when < tuned_at) or any(when < t for t in bests)
    detail = relative(submission) + (
        f"; test labels in {spec.truth_file}: `make score`" if (root / spec.truth_file).is_file() else ""
    )
    rows.append(("submission", "stale" if stale else "fresh", detail))
    if stale:
        why = "the submission is older than postprocess.json or a member's best.pt"
        return [(cmd.make("submit", ENSEMBLE=cmd.ensemble, SUBMISSION=cmd.submission), why)]
    return []


def _report(
    rows: list[Row], runs: EnsembleRuns, submission: Path, tuned_at: float | None, cmd: Commands
) -> list[tuple[str, str]]:
    page = runs.report_dir / "index.html"
    when = mtime(page)
    if tuned_at is None:
        rows.append(("report", "missing" if when is None else "stale", relative(page)))
        return []
    if not (runs.report_dir / "cv_table.csv").is_file():
        rows.append(("report", "missing", f"{relative(runs.report_dir)}: no cv_table.csv"))
        return [(cmd.make("cv", ENSEMBLE=cmd.ensemble), "no cv report (make cv writes it and the page)")]
    if when is None:
        rows.append(("report", "missing", relative(page)))
        return [(cmd.make("report", ENSEMBLE=cmd.ensemble, SUBMISSION=cmd.submission), "no report page")]
    sub = mtime(submission)
    stale = when < tuned_at or (sub is not None and when < sub)
    rows.append(("report", "stale" if stale else "fresh", relative(page)))
    if stale:
        why = "the page is older than postprocess.json or the submission"
        return [(cmd.make("report", ENSEMBLE=cmd.ensemble, SUBMISSION=cmd.submission), why)]
    return []
