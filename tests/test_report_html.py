"""The report page (`make report`, and the end of `make cv`) on a tiny ensemble tuned for real on planted
OOF, read as HTML and opened in headless Chromium: no console error, no failed or outside request,
every figure drawn, the decision table holding the rows tuning wrote, a screenshot written.
The browser tests skip only where no Chromium is installed (CI installs Debian's package)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layout import write_dataset, write_day

from pipeline.config import ClsConfig, EnsembleConfig, MemberCfg, SegConfig, TrainCfg, dump_config
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.infer.postprocess import read_decisions
from pipeline.infer.steps import registry
from pipeline.io import write_with
from pipeline.paths import run_dir
from pipeline.report.browser import chromium_path, open_page
from pipeline.report.page import build_report
from stages import cv, tune

SPEC = get_dataset("uwmgi")
FOLD_OF_CASE = {1: 0, 2: 0, 3: 1, 4: 1}
EPOCHS = 3
SECTIONS = [
    "status",
    "training",
    "detector",
    "classifier",
    "decisions",
    "curves",
    "volumes",
    "test",
    "timings",
    "environment",
]
needs_chromium = pytest.mark.skipif(
    chromium_path() is None, reason="no Chromium installed (apt-get install chromium)"
)


def _metrics(extra: dict) -> pd.DataFrame:
    epochs = np.arange(1, EPOCHS + 1)
    frame = pd.DataFrame(
        {"epoch": epochs, "train_loss": 1.0 / epochs, "lr": 1e-3 / epochs, "images_per_s": 50.0 + epochs}
    )
    frame["train_seconds"], frame["seconds"] = 2.0, 2.5
    for key, values in extra.items():
        frame[key] = values
    return frame


def _write_members(root: Path) -> None:
    """Two segmenters ('good' near the truth, 'bad' noise) and a classifier, in two folds, as training leaves them."""
    store = VolumeStore(root, SPEC.load_split(root, "train"), "train", SPEC)
    rng = np.random.default_rng(0)
    cls_rows: dict[int, list[dict]] = {0: [], 1: []}
    for volume_id in store.volume_ids:
        volume = store[volume_id]
        fold = FOLD_OF_CASE[int(volume_id.split("_")[0][4:])]
        truth = np.asarray(volume.mask, bool)
        noise = (rng.random(truth.shape) < 0.02) & ~truth
        good = np.where(truth, 180, np.where(noise, 150, 0)).astype(np.uint8)
        bad = rng.integers(0, 256, truth.shape).astype(np.uint8)
        for name, probs in (("good", good), ("bad", bad)):
            path = run_dir("seg", name, fold) / "oof" / f"{volume_id}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            ids = np.array(volume.ids)
            write_with(path, lambda p, probs=probs, ids=ids: np.savez_compressed(p, probs=probs, ids=ids))
        present = truth.reshape(len(truth), truth.shape[1], -1).any(axis=2)
        for s, slice_id in enumerate(volume.ids):
            probs = {c: 0.9 if present[s, k] else 0.1 for k, c in enumerate(SPEC.classes)}
            cls_rows[fold].append({"id": slice_id, "volume_id": volume_id, **probs})
    for fold in (0, 1):
        for name in ("good", "bad"):
            out = run_dir("seg", name, fold)
            (out / "config.yaml").write_text(dump_config(SegConfig(name=name, train=TrainCfg(epochs=EPOCHS))))
            _metrics({"score": [0.5, 0.7 + 0.1 * fold, 0.65]}).to_csv(out / "metrics.csv", index=False)
            (out / "best.pt").write_bytes(b"x")
        out = run_dir("cls", "tiny_cls", fold)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(
            dump_config(ClsConfig(name="tiny_cls", train=TrainCfg(epochs=EPOCHS)))
        )
        auc = {f"auc_{c}": [0.6, 0.8, 0.9 - 0.05 * k] for k, c in enumerate(SPEC.classes)}
        _metrics({**auc, "score": [0.6, 0.8, 0.85]}).to_csv(out / "metrics.csv", index=False)
        (out / "best.pt").write_bytes(b"x")
        pd.DataFrame(cls_rows[fold]).to_csv(out / "oof.csv", index=False)


def _write_detector() -> None:
    det = run_dir("det", "tiny_det")
    (det / "train").mkdir(parents=True)
    (det / "weights.pt").write_bytes(b"x")
    (det / "metrics.json").write_text(json.dumps({"mAP50": 0.9, "mAP50-95": 0.6, "seconds_train": 12.0}))
    results = pd.DataFrame(
        {"epoch": [1, 2, 3], "metrics/mAP50(B)": [0.2, 0.6, 0.9], "metrics/mAP50-95(B)": [0.1, 0.4, 0.6]}
    )
    results.to_csv(det / "train" / "results.csv", index=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tuned tiny ensemble with a classifier gate, a detector, test labels and a perfect submission."""
    base = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUNS_DIR", str(base / "runs"))
        mp.setenv("CACHE_DIR", str(base / "cache"))
        root = write_dataset(base / "data", {c: [0] for c in FOLD_OF_CASE}, n_slices=5)
        mp.setenv("DATA_DIR", str(root))
        rows = [dict(r, fold=FOLD_OF_CASE[int(r["volume_id"][4])]) for r in _folds_rows(root)]
        pd.DataFrame(rows).to_csv(root / "folds.csv", index=False)
        truth = pd.DataFrame(write_day(root, 9, 0, 4, split="test"))
        truth.to_csv(root / "test_labels.csv", index=False)
        submission = base / "submission.csv"
        truth.rename(columns={"segmentation": "predicted"}).to_csv(submission, index=False)
        _write_members(root)
        _write_detector()
        config = base / "tiny_ensemble.yaml"
        config.write_text(
            "stage: ensemble\nmembers: [{config: good}, {config: bad}]\nclassifier: tiny_cls\ndet_config: tiny_det\n"
            "tune: {pixel_thresholds: [0.5, 0.65], gate_thresholds: [0.0, 0.3], min_component_sizes: [0, 5],"
            " blend_steps: 2, prob_gate_pixels: [0, 2], z_runs: [0, 2]}\n"
        )
        tune.main(["--config", str(config), "--workers", "2"])
        cv.main(["--config", str(config), "--workers", "2", "--submission", str(submission)])
        page = run_dir("ensemble", "tiny_ensemble") / "report" / "index.html"
        yield {"page": page, "decisions": read_decisions("tiny_ensemble"), "root": root, "config": config}


def _folds_rows(root: Path) -> list[dict]:
    catalog = SPEC.load_split(root, "train")
    return [
        {"id": r.id, "group": r.group, "volume_id": r.volume_id, "slice": r.slice, "has_label": True}
        for r in catalog.itertuples()
    ]


def test_make_cv_writes_a_self_contained_page(tiny: dict) -> None:
    text = tiny["page"].read_text()
    assert re.findall(r'<section id="([a-z]+)"', text) == SECTIONS
    sources = re.findall(r'(?:src|href)="([^"#]*)"', text)
    assert sources and all(s.startswith("data:") for s in sources)  # no file, no CDN, no server
    assert "<script" not in text
    steps = [s["step"] for s in tiny["decisions"].steps]
    assert re.findall(r'data-step="([^"]+)"', text) == steps
    for step in registry():  # every step's chosen value is in the table, one cell per class
        assert f'<td class="text">{step.name}</td>' in text
    assert "test score 1.0000" in text  # the perfect submission, scored against the hidden answers
    assert "good alone" in text and "blend guard" in text


@needs_chromium
def test_page_in_headless_chromium(tiny: dict) -> None:
    shot = tiny["page"].with_suffix(".png")
    check = open_page(tiny["page"], shot)
    assert check.console_errors == [] and check.failed_requests == [] and check.outside_requests == []
    assert check.sections == SECTIONS
    alts = [f["alt"] for f in check.figures]
    assert len(alts) >= 9 and check.empty_figures() == [], (
        alts
    )  # 3 runs + AUC + detector + steps + curves + volumes + test
    assert check.decision_rows == [s["step"] for s in tiny["decisions"].steps]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(check.summary())


@needs_chromium
def test_a_page_with_nothing_to_show_says_so(isolated_dirs: Path) -> None:
    cfg = EnsembleConfig(name="untrained", members=(MemberCfg(config="never"),))
    page = build_report(cfg, isolated_dirs / "no_data", progress=False)
    text = page.read_text()
    assert "not trained yet" in text and "postprocess.json" in text and "no test labels" in text
    check = open_page(page)
    assert check.console_errors == [] and check.failed_requests == [] and check.sections == SECTIONS
    assert check.decision_rows == []
