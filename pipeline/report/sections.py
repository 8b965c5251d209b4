"""The sections of the report page, each from the records one stage wrote; each says so when it has
nothing to show (a dataset without a detector, an ensemble not tuned yet, no test labels).

The decision table and the curves iterate the step registry (:data:`pipeline.infer.steps.REGISTRY`)
and the rows ``make tune`` wrote: no step is named here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from pipeline.infer.postprocess import Decisions
from pipeline.infer.report import cv_tables, plot_curves, plot_steps, summary_lines
from pipeline.infer.steps import registry
from pipeline.paths import run_dir
from pipeline.report import html as h
from pipeline.report.environment import (
    RunConfig,
    device_summary,
    git_commit,
    machine_line,
    package_versions,
    read_run_config,
)
from pipeline.report.figures import Figure, classifier_auc, detector_curves, score_bars, training_curves
from pipeline.report.records import DetectorRun, EnsembleRuns, MemberRuns, relative
from pipeline.report.timings import StageTime, latest

# the stages of a run, in order (``run_cli`` names); the timings table shows these
PIPELINE = (
    "make_data",
    "folds",
    "train_det",
    "train_cls",
    "train_seg",
    "tune",
    "cv",
    "submit",
    "score",
    "report",
)

# --------------------------------------------------------------------------- training


def fold_table(member: MemberRuns) -> pd.DataFrame:
    rows = []
    for f in member.folds.values():
        epoch, score = f.best()
        m = f.metrics
        seconds = float(m["seconds"].sum()) if m is not None and "seconds" in m else None
        train_s = float(m["train_seconds"].sum()) if m is not None and "train_seconds" in m else None
        rows.append(
            {
                "fold": f.fold,
                "state": f.state,
                "epochs": f"{f.epochs_done}/{f.epochs_planned or '?'}",
                "best epoch": epoch,
                "best score": score,
                "OOF files": f"{f.oof_written}/{len(f.oof_expected)}" if f.oof_expected else "",
                "train s": train_s,
                "validation s": None if seconds is None or train_s is None else seconds - train_s,
            }
        )
    return pd.DataFrame(rows)


def training_section(runs: EnsembleRuns) -> str:
    body = []
    for m in runs.trained():
        body.append(f"<h3>{h.esc(m.stage)} {h.esc(m.name)}</h3>")
        if not m.folds:
            body.append(h.empty(f"not trained yet: no run folder {relative(run_dir(m.stage, m.name))}"))
            continue
        body.append(h.figure(training_curves(m), f"{m.name}: no metrics.csv in any fold yet"))
        seconds = {"train s": 1, "validation s": 1}
        body.append(
            h.table(fold_table(m), text_columns=("fold", "state", "epochs", "OOF files"), digits=seconds)
        )
    return h.section("training", "Training curves per member and fold", body or [h.empty("no members")])


def detector_section(det: DetectorRun | None) -> str:
    if det is None:
        return h.section("detector", "Detector", [h.empty("this ensemble crops with no detector")])
    if not det.trained:
        return h.section(
            "detector",
            f"Detector {det.name}",
            [h.empty(f"not trained: {relative(det.dir)} has no weights.pt")],
        )
    numbers = {k: v for k, v in det.metrics.items() if isinstance(v, (int, float))}
    frame = pd.DataFrame([{"figure": k, "value": v} for k, v in numbers.items()])
    body = [h.figure(detector_curves(det.dir / "train" / "results.csv"), "no per-epoch results.csv")]
    boxes = det.dir / "boxes.png"
    if boxes.is_file():
        body.append(h.figure(Figure.from_file(boxes, "the detector's boxes on a few volumes")))
    body.append(h.table(frame, text_columns=("figure",)))
    return h.section("detector", f"Detector {det.name}", body)


def classifier_section(runs: EnsembleRuns, classes: tuple[str, ...]) -> str:
    m = runs.classifier
    if m is None:
        return h.section("classifier", "Classifier", [h.empty("this ensemble has no classifier gate")])
    fig, table = classifier_auc(m, classes)
    body = [
        h.figure(fig, "no per-class AUC in the classifier's metrics.csv"),
        h.table(table, text_columns=("fold",)),
    ]
    return h.section("classifier", f"Classifier {m.name}: AUC per class (best epoch of each fold)", body)


# --------------------------------------------------------------------------- decisions


def _png(draw, *args) -> Figure:
    """A figure of :mod:`pipeline.infer.report` (it writes PNG files) read back as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = draw(Path(tmp) / "figure.png", *args)
        return Figure.from_file(path)


def decision_rows(decisions: Decisions) -> pd.DataFrame:
    """The steps as tuning wrote them: in-sample score and gain, held-apart score and gain, note."""
    rows = []
    for s in decisions.steps:
        rows.append(
            {
                "step": s.get("step"),
                "what": s.get("label"),
                "score (in-sample)": s.get("score"),
                "gain": s.get("gain"),
                "held apart": s.get("held_out"),
                "held-apart gain": s.get("held_gain"),
                "note": s.get("skipped", ""),
            }
        )
    return pd.DataFrame(rows)


def chosen_values(decisions: Decisions) -> pd.DataFrame:
    """One row per post-processing step of the registry, one column per class: the tuned value in words."""
    rows = []
    for step in registry():
        row = {"step": step.name, "what": step.title}
        for cls, params in decisions.classes.items():
            row[cls] = step.describe(step.get(params))
        rows.append(row)
    return pd.DataFrame(rows)


def decisions_section(decisions: Decisions | None, why: str) -> str:
    if decisions is None:
        return h.section("decisions", "OOF decisions", [h.empty(why)])
    frame = decision_rows(decisions)
    classes = ["skipped" if note else "" for note in frame["note"]]
    attrs = [{"data-step": str(step)} for step in frame["step"]]
    body = ["<h3>Each step's gain, in-sample and held apart</h3>"]
    body.append(
        h.table(
            frame,
            id="decision-table",
            text_columns=("step", "what", "note"),
            row_attrs=attrs,
            classes=classes,
        )
    )
    if decisions.holdout.get("groups"):
        ho = decisions.holdout
        body.append(
            h.paragraph(
                f"held apart: groups {', '.join(map(str, ho['groups']))} ({ho.get('days_held')} volumes); tuned on {ho.get('days_tuning')}"
            )
        )
    body.append("<h3>Chosen values per class</h3>")
    body.append(
        h.table(
            chosen_values(decisions), id="chosen-table", text_columns=("step", "what", *decisions.classes)
        )
    )
    weights = pd.DataFrame([{"class": c, **w} for c, w in decisions.weights.items()])
    body.append("<h3>Blend weights per class</h3>")
    body.append(h.table(weights, id="weights-table", text_columns=("class",)))
    lines = summary_lines(decisions)
    guard = decisions.oof.blend_guard
    if guard is None and len(decisions.members) > 1:
        lines.append(
            "blend guard: the blend stands (it does not lose to a member alone on the held-apart groups)"
        )
    for line in lines:
        body.append(
            h.paragraph(
                line, "verdict" if guard is not None and line.startswith("blend guard") else "verdict ok"
            )
        )
    steps = (
        cv_tables({"per_class": decisions.per_class, **decisions.oof.metrics}, decisions)[1]
        if decisions.steps
        else pd.DataFrame()
    )
    if not steps.empty:
        fig = _png(plot_steps, steps)
        body.append(
            h.figure(Figure(fig.data, fig.mime, "OOF score after each step, in-sample and held apart"))
        )
    return h.section("decisions", "OOF decisions (make tune)", body)


def curves_section(decisions: Decisions | None, classes: tuple[str, ...], why: str) -> str:
    if decisions is None:
        return h.section("curves", "Score against each tuned value", [h.empty(why)])
    skipped = {s["step"]: s.get("skipped", "") for s in decisions.steps}
    body = []
    for step in registry():
        curves = decisions.curves.get(step.name)
        if curves:
            fig = _png(plot_curves, step, curves, classes)
            body.append(h.figure(Figure(fig.data, fig.mime, f"{step.title}: OOF score per class")))
        else:
            body.append(
                h.paragraph(f"{step.title}: not tuned ({skipped.get(step.name) or 'no curve'})", "empty")
            )
    return h.section("curves", "Score against each tuned value, per class", body)


# --------------------------------------------------------------------------- volumes, test, timings


def volumes_section(table: pd.DataFrame | None, fig: Figure | None, why: str) -> str:
    if table is None:
        return h.section("volumes", "Best and worst OOF volumes", [h.empty(why)])
    shown = table if len(table) <= 10 else pd.concat([table.head(5), table.tail(5)])
    body = [
        h.figure(fig, "no volume to draw"),
        h.paragraph(f"{len(table)} OOF volumes scored alone; the 5 worst and 5 best:"),
    ]
    body.append(h.table(shown, id="volume-table", text_columns=("volume_id", "group")))
    return h.section("volumes", "Best and worst OOF volumes (truth filled, prediction outlined)", body)


def test_section(result: dict | None, why: str, metric_keys: tuple[str, ...]) -> str:
    if result is None:
        return h.section("test", "Test score", [h.empty(why)])
    per_class = result.get("per_class") or {}
    rows = [
        {"class": c, **{k: v for k, v in row.items() if isinstance(v, (int, float))}}
        for c, row in per_class.items()
    ]
    rows.append(
        {"class": "all", **{k: result[k] for k in metric_keys if isinstance(result.get(k), (int, float))}}
    )
    frame = pd.DataFrame(rows)
    body = [h.figure(score_bars(frame[frame["class"] != "all"][["class", "score"]], "test score per class"))]
    body.append(h.table(frame, id="test-table", text_columns=("class",)))
    return h.section("test", "Test score per class (the phantom's hidden answers)", body)


def timings_section(runs: EnsembleRuns, timings: list[StageTime]) -> str:
    names = {runs.cfg.name, *(m.name for m in runs.trained())}
    if runs.detector is not None:
        names.add(runs.detector.name)
    last = [
        t
        for (stage, cfg), t in latest(timings).items()
        if stage in PIPELINE and (cfg is None or cfg in names)
    ]
    last.sort(key=lambda t: (PIPELINE.index(t.stage), t.finished))
    body = []
    if last:
        frame = pd.DataFrame(
            [
                {
                    "stage": t.stage,
                    "config": t.config_name or "",
                    "seconds": t.seconds,
                    "finished": t.finished,
                }
                for t in last
            ]
        )
        table = h.table(
            frame, id="timings-table", text_columns=("stage", "config", "finished"), digits={"seconds": 1}
        )
        body += ["<h3>Last run of each stage</h3>", table]
    else:
        body.append(
            h.empty("no stage timings recorded (runs/timings.jsonl: written by each stage run through make)")
        )
    rows = []
    if runs.detector is not None:
        rows += [
            {"run": f"det {runs.detector.name}", "part": k.removeprefix("seconds_"), "seconds": v}
            for k, v in runs.detector.metrics.items()
            if k.startswith("seconds_")
        ]
    for m in runs.trained():
        for f in m.folds.values():
            if f.metrics is not None and "seconds" in f.metrics:
                rows.append(
                    {
                        "run": f"{m.stage} {m.name}",
                        "part": f"fold {f.fold} ({f.epochs_done} epochs)",
                        "seconds": float(f.metrics["seconds"].sum()),
                    }
                )
    body.append("<h3>Training time per run folder (from metrics.csv / metrics.json)</h3>")
    body.append(h.table(pd.DataFrame(rows), text_columns=("run", "part"), digits={"seconds": 1}))
    return h.section("timings", "Timings per stage", body)


def environment_section(runs: EnsembleRuns, configs: list[RunConfig]) -> str:
    versions = pd.DataFrame([{"package": k, "version": v} for k, v in package_versions().items()])
    body = [
        h.paragraph(f"device: {device_summary()}"),
        h.paragraph(f"git commit: {git_commit()}"),
        h.table(versions, text_columns=("package", "version")),
        "<h3>Machines the runs were made on (config.yaml's machine: block)</h3>",
    ]
    machines = pd.DataFrame(
        [{"run": c.label, "machine": machine_line(c.machine)} for c in configs if c.machine]
    )
    body.append(
        h.table(machines, text_columns=("run", "machine"))
        if not machines.empty
        else h.empty("no run folder carries a machine: block")
    )
    body.append("<h3>Resolved configs</h3>")
    for c in configs:
        body.append(h.details(f"{c.label}: {relative(c.path)}", c.text))
    if configs and configs[0].machine:
        import yaml

        body.append(
            h.details(
                "machine: block of the first run folder", yaml.safe_dump(configs[0].machine, sort_keys=False)
            )
        )
    return h.section("environment", "Environment", body)


def run_configs(runs: EnsembleRuns) -> list[RunConfig]:
    """Every run folder's config.yaml: the ensemble's, the detector's, each fold of each member."""
    found = [read_run_config(f"ensemble {runs.cfg.name}", runs.dir / "config.yaml")]
    if runs.detector is not None:
        found.append(read_run_config(f"det {runs.detector.name}", runs.detector.dir / "config.yaml"))
    for m in runs.trained():
        found += [
            read_run_config(f"{m.stage} {m.name} fold {f.fold}", f.dir / "config.yaml")
            for f in m.folds.values()
        ]
    return [c for c in found if c is not None]
