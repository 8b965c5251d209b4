"""`make submit` on toy members: row order, valid RLE, atomic writes, Kaggle behaviours."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from layout import write_dataset, write_day

from pipeline.config import (
    ClsConfig,
    DataCfg,
    EnsembleConfig,
    MemberCfg,
    ModelCfg,
    SegConfig,
    TTACfg,
    dump_config,
)
from pipeline.datasets import get_dataset
from pipeline.datasets.uwmgi_files import CLASSES
from pipeline.errors import SubmissionError
from pipeline.infer.postprocess import (
    ClassParams,
    Decisions,
    DecisionsError,
    decisions_path,
    read_decisions,
    write_decisions,
)
from pipeline.infer.submit import run_submit
from pipeline.io import write_text
from pipeline.models.segmenter import build_segmenter
from pipeline.paths import run_dir
from pipeline.rle import rle_decode, rle_encode

SEG = SegConfig(
    name="toy_seg",
    data=DataCfg(k=0, img_size=(32, 32), crop=False),
    model=ModelCfg(arch="Unet", encoder="tu-resnet10t", kwargs={"decoder_channels": [16, 16, 8, 8, 8]}),
)


@pytest.fixture
def toy(isolated_dirs: Path) -> tuple[EnsembleConfig, Path]:
    root = write_dataset(isolated_dirs / "data", {1: [0], 2: [0]}, n_slices=3)
    rows = []
    for case in (7, 8):
        rows += write_day(root, case, 0, n_slices=4, split="test")
    test = pd.DataFrame(rows)
    test.to_csv(root / "test_labels.csv", index=False)
    sample = test[["id", "class"]].assign(predicted="").sample(frac=1.0, random_state=0)  # any order
    sample.to_csv(root / "sample_submission.csv", index=False)
    torch.manual_seed(0)
    model = build_segmenter(SEG.model, in_channels=1)
    folder = run_dir("seg", SEG.name, 0)
    write_text(folder / "config.yaml", dump_config(SEG))
    torch.save({"model": model.state_dict(), "epoch": 1, "score": 0.0}, folder / "best.pt")
    cfg = EnsembleConfig(name="toy_ens", members=(MemberCfg(config="toy_seg"),), tta=TTACfg(hflip=True))
    decisions = Decisions(
        classes=dict.fromkeys(CLASSES, ClassParams(0.5, 0.0, 0)),
        weights={"toy_seg": 1.0},
        members=[{"config": "toy_seg", "folds": [0]}],
        ensemble="toy_ens",
    )
    write_decisions(decisions_path("toy_ens"), decisions)
    return cfg, root


def test_submission_has_sample_rows_in_order(toy, tmp_path: Path) -> None:
    cfg, root = toy
    out = run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "submission.csv", device="cpu")
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "class", "predicted"]
    assert sub[["id", "class"]].equals(sample[["id", "class"]])
    assert (sub["predicted"] != "").any()  # an untrained net at threshold 0.5 predicts something
    for rle in sub["predicted"]:
        rle_decode(rle, (24, 32))


def test_submission_equals_direct_prediction(toy, tmp_path: Path) -> None:
    """Every row is the RLE of predict_volume (TTA) -> uint8 -> post-processing of its own slice and class."""
    from pipeline.data.geometry import full_box
    from pipeline.datasets.uwmgi_files import scan_split
    from pipeline.infer.postprocess import apply_postprocess, to_uint8
    from pipeline.infer.predict import load_member
    from pipeline.models.predict import predict_volume

    cfg, root = toy
    params = {
        "large_bowel": ClassParams(0.5, 0.0, 0),
        "small_bowel": ClassParams(0.4, 0.0, 3),
        "stomach": ClassParams(0.6, 0.0, 0),
    }
    write_decisions(
        decisions_path("toy_ens"),
        Decisions(classes=params, weights={"toy_seg": 1.0}, members=[{"config": "toy_seg", "folds": [0]}]),
    )
    sub = pd.read_csv(
        run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "s.csv", device="cpu"),
        dtype=str,
        keep_default_na=False,
    )
    got = dict(zip(zip(sub["id"], sub["class"]), sub["predicted"]))
    model, member = load_member(run_dir("seg", "toy_seg", 0), "cpu")
    expected = {}
    for _, rows in scan_split(root, "test").groupby("volume_id"):
        volume = get_dataset("uwmgi").read_volume(rows, False)
        probs = predict_volume(
            model, member, volume.image, full_box(volume.image.shape[1:]), tta=cfg.tta, amp=False
        )
        masks = apply_postprocess(to_uint8(probs), None, params)
        for s, slice_id in enumerate(volume.ids):
            for c, cls in enumerate(CLASSES):
                expected[(slice_id, cls)] = rle_encode(masks[s, c])
    assert got == expected and any(expected.values())


def test_per_class_weights_and_unused_members(toy, tmp_path: Path) -> None:
    """Each class blends the members with its own weights (float mean, then uint8, then the tuned
    post-processing with the probability gate and z-continuity); a member with weight 0 in every
    class is never loaded (its run folder does not even exist)."""
    from pipeline.data.geometry import full_box
    from pipeline.datasets.uwmgi_files import scan_split
    from pipeline.infer.postprocess import apply_postprocess, to_uint8
    from pipeline.infer.predict import load_member
    from pipeline.models.predict import predict_volume

    cfg, root = toy
    torch.manual_seed(1)
    folder = run_dir("seg", "toy_seg_b", 0)
    write_text(folder / "config.yaml", dump_config(replace(SEG, name="toy_seg_b")))
    model_b = build_segmenter(SEG.model, in_channels=1)
    torch.save({"model": model_b.state_dict(), "epoch": 1, "score": 0.0}, folder / "best.pt")
    names = ("toy_seg", "toy_seg_b", "ghost")
    cfg = replace(cfg, members=tuple(MemberCfg(config=n) for n in names))
    weights = {
        "large_bowel": {"toy_seg": 1.0, "toy_seg_b": 0.0, "ghost": 0.0},
        "small_bowel": {"toy_seg": 0.0, "toy_seg_b": 1.0, "ghost": 0.0},
        "stomach": {"toy_seg": 0.25, "toy_seg_b": 0.75, "ghost": 0.0},
    }
    params = {
        "large_bowel": ClassParams(0.5, 0.0, 0, prob_gate_pixels=3, prob_gate_level=0.55),
        "small_bowel": ClassParams(0.45, 0.0, 0, z_run=2),
        "stomach": ClassParams(0.5, 0.0, 2),
    }
    decisions = Decisions(
        classes=params,
        weights=weights,
        members=[{"config": n, "folds": [0]} for n in names],
        ensemble="toy_ens",
    )
    write_decisions(decisions_path("toy_ens"), decisions)
    sub = pd.read_csv(
        run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "pc.csv", device="cpu"),
        dtype=str,
        keep_default_na=False,
    )
    got = dict(zip(zip(sub["id"], sub["class"]), sub["predicted"]))
    nets = [load_member(run_dir("seg", n, 0), "cpu") for n in names[:2]]
    matrix = decisions.weight_matrix(list(names[:2])).astype("float32")
    expected = {}
    for _, rows in scan_split(root, "test").groupby("volume_id"):
        volume = get_dataset("uwmgi").read_volume(rows, False)
        box = full_box(volume.image.shape[1:])
        total = 0
        for j, (model, member) in enumerate(nets):
            probs = predict_volume(model, member, volume.image, box, tta=cfg.tta, amp=False)
            total = total + matrix[:, j][None, :, None, None] * probs
        masks = apply_postprocess(to_uint8(total), None, params)
        for s, slice_id in enumerate(volume.ids):
            for c, cls in enumerate(CLASSES):
                expected[(slice_id, cls)] = rle_encode(masks[s, c])
    assert got == expected and any(expected.values())
    single = {k: v for k, v in expected.items() if k[1] == "large_bowel"}
    write_decisions(
        decisions_path("toy_ens"),
        replace(decisions, weights={c: {"toy_seg": 1.0, "toy_seg_b": 0.0, "ghost": 0.0} for c in CLASSES}),
    )
    alone = pd.read_csv(
        run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "a.csv", device="cpu"),
        dtype=str,
        keep_default_na=False,
    )
    assert {
        k: v for k, v in zip(zip(alone["id"], alone["class"]), alone["predicted"]) if k[1] == "large_bowel"
    } == single


def test_gate_empties_the_gated_class(toy, tmp_path: Path) -> None:
    from pipeline.models.classifier import build_classifier

    cfg, root = toy
    cls_cfg = ClsConfig(
        name="toy_cls",
        data=DataCfg(k=0, img_size=(32, 32), crop=False),
        model=ModelCfg(arch="timm", encoder="resnet10t"),
    )
    folder = run_dir("cls", "toy_cls", 0)
    write_text(folder / "config.yaml", dump_config(cls_cfg))
    model = build_classifier(cls_cfg.model, in_channels=1)
    torch.save({"model": model.state_dict(), "epoch": 1, "score": 0.0}, folder / "best.pt")
    cfg = replace(cfg, classifier="toy_cls")
    outs = {}
    for gate in (0.0, 1.5):  # 1.5: above any probability, so every stomach slice is gated
        classes = dict.fromkeys(CLASSES, ClassParams(0.5, 0.0, 0)) | {"stomach": ClassParams(0.5, gate, 0)}
        decisions = Decisions(
            classes=classes,
            weights={"toy_seg": 1.0},
            members=[{"config": "toy_seg", "folds": [0]}],
            classifier={"config": "toy_cls", "folds": [0]},
        )
        write_decisions(decisions_path("toy_ens"), decisions)
        out = run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / f"gate{gate}.csv", device="cpu")
        outs[gate] = pd.read_csv(out, dtype=str, keep_default_na=False)
    open_, gated = outs[0.0], outs[1.5]
    stomach = gated["class"] == "stomach"
    assert (gated.loc[stomach, "predicted"] == "").all() and (open_.loc[stomach, "predicted"] != "").any()
    assert gated.loc[~stomach, "predicted"].equals(open_.loc[~stomach, "predicted"])


def test_failed_write_keeps_previous_file(toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, root = toy
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    out.write_text("previous\n")

    def broken(frame, rows, where, shapes=None):
        raise SubmissionError("simulated validation failure")

    monkeypatch.setattr("pipeline.datasets.uwmgi_submission.validate_rows", broken)
    with pytest.raises(SubmissionError, match="simulated"):
        run_submit(cfg, get_dataset(cfg.dataset), root, out, device="cpu")
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv"]  # no temporary left


def test_empty_test_folder_and_debug_train_volumes(toy, tmp_path: Path) -> None:
    cfg, root = toy
    import shutil

    shutil.rmtree(root / "test")
    out = run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "empty.csv", device="cpu")
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(sub) == 8 * 3 and (sub["predicted"] == "").all()
    (root / "sample_submission.csv").write_text("id,class,predicted\n")  # the public Kaggle page
    assert pd.read_csv(
        run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "header.csv", device="cpu")
    ).empty
    debug = pd.read_csv(
        run_submit(
            cfg, get_dataset(cfg.dataset), root, tmp_path / "debug.csv", debug_train_volumes=1, device="cpu"
        )
    )
    assert set(debug["id"].str.slice(0, 10)) == {"case1_day0"} and len(debug) == 3 * 3


def test_missing_decisions_say_run_make_tune(toy, tmp_path: Path) -> None:
    cfg, root = toy
    decisions_path("toy_ens").unlink()
    with pytest.raises(DecisionsError, match="make tune"):
        run_submit(cfg, get_dataset(cfg.dataset), root, tmp_path / "s.csv", device="cpu")
    assert not (tmp_path / "s.csv").exists()


def test_bench_infer_reports_rates_and_projection(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages import bench_infer

    monkeypatch.setenv("DATA_DIR", str(isolated_dirs / "nodata"))
    result = bench_infer.main(["--slices", "2", "--repeats", "1", "--device", "cpu"])
    assert set(result["per_model_fold"]) == {"seg:demo_seg", "seg:demo_seg3d", "cls:demo_cls"}
    assert all(r["no_tta"] > 0 and r["tta"] > 0 for r in result["per_model_fold"].values())
    assert set(result["projection_h"]) == {"no_tta", "tta"} and min(result["projection_h"].values()) > 0
    assert result["end_to_end"] == {}  # nothing tuned in this folder


# --------------------------------------------------------------------------- the real chain


def _toy_detector(name: str) -> None:
    """An untrained YOLO run folder (weights.pt, model.yaml, config.yaml) plus threshold boxes:
    the crop path of training and submit without a minute of detector training."""
    from ultralytics.nn.tasks import DetectionModel

    from pipeline.config import DetConfig
    from pipeline.data.volumes import VolumeStore
    from pipeline.models.detector import save_weights, write_boxes
    from pipeline.models.detector_boxes import choose_volume_box
    from pipeline.paths import data_dir

    det = DetConfig(name=name)
    out = run_dir("det", name)
    save_weights(out, DetectionModel("yolov8n.yaml", nc=1, verbose=False), det.det)
    write_text(out / "config.yaml", dump_config(det))
    spec = get_dataset("uwmgi")
    store = VolumeStore(data_dir(), spec.load_split(data_dir(), "train"), "train", spec)
    write_boxes(
        out / "boxes_train.csv", {d: choose_volume_box(store[d].image, [], det.det) for d in store.volume_ids}
    )


def test_tiny_trained_chain_tune_cv_submit(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """make data (tiny) -> folds -> a detector run -> train-cls / train-seg (1 epoch, 2 steps, 64 px,
    crop on) -> tune -> cv -> submit (and its debug path), each through its stage's main()."""
    from pipeline.datasets.uwmgi_files import scan_split
    from stages import cv, folds, make_data, train_cls, train_seg, tune
    from stages import submit as submit_stage

    root = isolated_dirs / "data"
    monkeypatch.setenv("DATA_DIR", str(root))
    make_data.main(["--out", str(root), "--preset", "tiny"])
    folds.main(["--set", "n_folds=3"])
    _toy_detector("chain_det")
    fast = [
        "data.img_size=[64,64]",
        "data.det_config=chain_det",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
    ]
    fast += ["train.batch_size=4", "train.num_workers=0", "train.device=cpu", "train.amp=false"]
    train_cls.main(["--config", "demo_cls", "--folds", "0", "--set", *fast, "name=chain_cls"])
    tiny = "model.encoder=tu-mobilenetv3_small_050"
    train_seg.main(
        ["--config", "demo_seg", "--folds", "0", "--set", *fast, "name=chain_seg", tiny, "model.kwargs={}"]
    )

    config = tmp_path / "chain_ensemble.yaml"
    config.write_text(
        "stage: ensemble\nmembers: [{config: chain_seg}]\nclassifier: chain_cls\ndet_config: chain_det\n"
        "tta: {hflip: true}\ntune: {pixel_thresholds: [0.4, 0.5, 0.6], gate_thresholds: [0.0, 0.5],"
        " min_component_sizes: [0, 50], blend_steps: 1}\nreport_slices: 3\ndevice: cpu\n"
    )
    with pytest.raises(DecisionsError, match="make tune"):
        submit_stage.main(["--config", str(config), "--out", str(tmp_path / "early.csv")])
    decisions = read_decisions("chain_ensemble", tune.main(["--config", str(config), "--workers", "1"]))
    assert [m["config"] for m in decisions.members] == ["chain_seg"]
    assert decisions.weights == {c: {"chain_seg": 1.0} for c in CLASSES}
    assert decisions.classifier == {"config": "chain_cls", "folds": [0]}
    assert decisions.steps[0]["step"] == "raw" and decisions.oof.days == 2  # fold 0: one case, two days
    scores = [s["score"] for s in decisions.steps]
    assert scores == sorted(scores)  # coordinate ascent never loses score

    report = cv.main(["--config", str(config), "--workers", "1"])
    table = pd.read_csv(report / "cv_table.csv")
    assert table["class"].tolist() == [*CLASSES, "all"]
    assert table["score"].iloc[-1] == pytest.approx(decisions.oof.score)
    assert {"pixel_threshold.png", "overlays.png", "steps.png"} <= {p.name for p in report.iterdir()}
    steps = pd.read_csv(report / "cv_steps.csv")
    assert {"score", "held_out", "gain", "held_gain", "gap", "note"} <= set(steps.columns)

    out = submit_stage.main(["--config", str(config), "--out", str(tmp_path / "submission.csv")])
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert sub[["id", "class"]].equals(sample[["id", "class"]]) and len(sub) > 0
    size = {r.id: (r.height, r.width) for r in scan_split(root, "test").itertuples()}
    for row in sub.itertuples():
        rle_decode(row.predicted, size[row.id])

    debug = submit_stage.main(
        ["--config", str(config), "--out", str(tmp_path / "debug.csv"), "--debug-train-volumes", "2"]
    )
    debug_sub = pd.read_csv(debug, dtype=str, keep_default_na=False)
    train_days = list(dict.fromkeys(scan_split(root, "train")["volume_id"]))[:2]
    assert list(dict.fromkeys(debug_sub["id"].str.rsplit("_slice", n=1).str[0])) == train_days
