"""``make report``: one self-contained HTML page per ensemble, ``runs/ensemble/<cfg>/report/index.html``.

Everything on it comes from files the stages wrote (:mod:`pipeline.report.records`), plus two
measurements made here: each OOF volume scored alone under the tuned decisions (to draw the best and
worst), and the submission scored against the hidden answers where the dataset has them. Figures are
inline (SVG or PNG ``data:`` URIs), the style is in the page, there is no script and no external
request: the file opens offline, mailed or copied anywhere. A section with nothing to show says why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import EnsembleConfig
from pipeline.datasets import get_dataset
from pipeline.errors import PipelineError
from pipeline.infer.postprocess import Decisions, read_decisions
from pipeline.io import write_text
from pipeline.report import html as h
from pipeline.report import sections as s
from pipeline.report.figures import Figure
from pipeline.report.records import EnsembleRuns, read_ensemble, relative
from pipeline.report.status import pipeline_status
from pipeline.report.timings import read_timings

log = logging.getLogger(__name__)

PAGE = "index.html"


@dataclass
class Measured:
    """What the page measures itself: per-volume OOF scores with their figure, and the test score."""

    volumes: pd.DataFrame | None = None
    overlays: Figure | None = None
    volumes_why: str = ""
    test: dict | None = None
    test_why: str = ""


def measure_volumes(
    cfg: EnsembleConfig, root: Path, decisions: Decisions, workers: int, progress: bool
) -> Measured:
    """Each OOF volume scored alone under the decisions, and the overlay of the worst and best."""
    from pipeline.infer.ensemble import load_oof
    from pipeline.report.volumes import pick_volumes, plot_volumes, score_volumes

    try:
        oof = load_oof(cfg, get_dataset(cfg.dataset), root, progress)
    except (PipelineError, ValueError) as exc:
        return Measured(volumes_why=f"the OOF could not be read: {exc}")
    tuned = sorted(m["config"] for m in decisions.members)
    if tuned != sorted(oof.member_names()):
        return Measured(volumes_why=f"postprocess.json was tuned for {tuned}: rerun make tune")
    table = score_volumes(oof, decisions, workers, progress)
    return Measured(table, plot_volumes(oof, decisions, pick_volumes(table)))


def test_score(cfg: EnsembleConfig, root: Path, submission: Path | None) -> tuple[dict | None, str]:
    """The submission against the dataset's hidden answers (the phantom's ``test_labels.csv``)."""
    spec = get_dataset(cfg.dataset)
    truth = root / spec.truth_file
    if not truth.is_file():
        return None, f"no test labels ({truth} absent: the real competitions hide them)"
    if submission is None or not submission.is_file():
        return None, f"no submission to score ({submission}): run make submit"
    try:
        return spec.score_files(submission, truth, root), ""
    except (PipelineError, ValueError) as exc:
        return None, f"{submission} could not be scored: {exc}"


def _decisions(cfg: EnsembleConfig) -> tuple[Decisions | None, str]:
    try:
        return read_decisions(cfg.name), ""
    except PipelineError as exc:
        return None, str(exc)


def _facts(runs: EnsembleRuns, decisions: Decisions | None, test: dict | None) -> list[str]:
    facts = [f"dataset {runs.cfg.dataset}", f"members: {', '.join(m.name for m in runs.members)}"]
    if runs.classifier is not None:
        facts.append(f"classifier: {runs.classifier.name}")
    if decisions is not None and decisions.oof.score is not None:
        held = decisions.oof.held_out
        facts.append(
            f"OOF score {decisions.oof.score:.4f}" + (f" (held apart {held:.4f})" if held is not None else "")
        )
    if test is not None:
        facts.append(f"test score {test['score']:.4f}")
    facts.append(f"written {time.strftime('%Y-%m-%d %H:%M')}")
    return facts


def status_section(cfg: EnsembleConfig, root: Path, submission: Path | None, config_path: str) -> str:
    status = pipeline_status(cfg, root, submission or Path("submission.csv"), config_path)
    shown = [r for r in status.rows if r[0] != "report"]  # this page, being written
    rows = pd.DataFrame(shown, columns=["what", "state", "detail"])
    body = [h.table(rows, id="status-table", text_columns=("what", "state", "detail"))]
    command = status.next_command or ""
    if command and not command.startswith(("make report", "make cv")):
        body.append(h.paragraph(f"next: {command} ({status.why})"))
    return h.section("status", "Pipeline state (make status)", body)


def build_report(
    cfg: EnsembleConfig,
    root: Path,
    *,
    submission: Path | None = None,
    config_path: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``runs/ensemble/<cfg>/report/index.html`` from the ensemble's runs; returns its path."""
    from pipeline.infer.evaluate import default_workers

    runs = read_ensemble(cfg, root)
    spec = get_dataset(cfg.dataset)
    decisions, why = _decisions(cfg)
    measured = Measured(volumes_why=why)
    if decisions is not None:
        measured = measure_volumes(cfg, root, decisions, workers or default_workers(), progress)
    measured.test, measured.test_why = test_score(cfg, root, submission)
    parts = [
        ("status", "State", status_section(cfg, root, submission, config_path or f"configs/{cfg.name}.yaml")),
        ("training", "Training", s.training_section(runs)),
        ("detector", "Detector", s.detector_section(runs.detector)),
        ("classifier", "Classifier", s.classifier_section(runs, spec.classes)),
        ("decisions", "Decisions", s.decisions_section(decisions, why)),
        ("curves", "Tuned values", s.curves_section(decisions, spec.classes, why)),
        (
            "volumes",
            "OOF volumes",
            s.volumes_section(measured.volumes, measured.overlays, measured.volumes_why),
        ),
        ("test", "Test score", s.test_section(measured.test, measured.test_why, spec.metric_keys)),
        ("timings", "Timings", s.timings_section(runs, read_timings())),
        ("environment", "Environment", s.environment_section(runs, s.run_configs(runs))),
    ]
    title = f"{cfg.name}: {spec.title} ensemble report"
    out = write_text(runs.report_dir / PAGE, h.page(title, _facts(runs, decisions, measured.test), parts))
    log.info("wrote %s (%.1f MB)", relative(out), out.stat().st_size / 1e6)
    attach_to_tracker(runs, out)
    return out


def attach_to_tracker(runs: EnsembleRuns, page: Path) -> int:
    """Add the page to the tracker run of every fold trained with ``train.tracker`` on; how many took it."""
    from pipeline.train.tracker import attach

    done = 0
    for m in runs.trained():
        train = getattr(m.config, "train", None)
        if train is not None and train.tracker != "none":
            done += sum(attach(train, f.dir, [page]) for f in m.folds.values())
    return done
