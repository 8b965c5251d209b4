"""Reliability: cached volumes read by many threads at once, gaps in a volume's slices, nerve frames
of another size, and the machine fingerprint written beside every run."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from layout import write_dataset, write_day

from pipeline import runtime
from pipeline.config import (
    ConfigError,
    DataCfg,
    EnsembleConfig,
    MemberCfg,
    ModelCfg,
    SegConfig,
    config_from_text,
    dump_config,
    load_config,
)
from pipeline.data.folds import make_folds
from pipeline.data.volumes import Volume, VolumeStore
from pipeline.datasets import get_dataset
from pipeline.datasets.nerve import TEST_BLOCK, batch_names
from pipeline.errors import DataError
from pipeline.infer.oof_cache import oof_entry
from pipeline.infer.postprocess import ClassParams, Decisions, decisions_path, write_decisions
from pipeline.infer.predict import load_member
from pipeline.infer.submit import run_submit
from pipeline.io import write_csv, write_text, write_with
from pipeline.models.predict import build_model
from pipeline.paths import run_dir
from stages import folds, make_data, train_seg
from stages._cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- threads and .npy headers


class _ArraySpec:
    """A dataset whose volume ``v<i>`` is a tiny (2, 3, 4) image filled with i (mask: i % 2)."""

    labels_file = None

    def has_labels(self, catalog: pd.DataFrame) -> bool:
        return True

    def read_volume(self, rows: pd.DataFrame, with_masks: bool | None = None) -> Volume:
        i = int(rows["volume_id"].iloc[0].removeprefix("v"))
        image = np.full((2, 3, 4), i, np.uint16)
        mask = np.full((2, 1, 3, 4), i % 2, np.uint8)
        return Volume(f"v{i}", list(rows["id"]), image, mask, (1.0, 1.0))


class _Finalized:
    """Cyclic garbage with a Python finalizer: the collector runs Python code (and may switch threads)
    in the middle of whatever allocates, as in a real tuning pass."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        pass


@contextmanager
def _busy_thread_switching():
    """Threads switch as often as the interpreter allows while the block runs."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_threaded_volume_and_oof_reads_survive_many_rounds(isolated_dirs: Path) -> None:
    """200 cached volumes and 200 cached OOF boxes read by 8 threads, 20 rounds: every array right.

    Without the lock of ``pipeline.io.load_npy`` this fails on CPython 3.11 with "SystemError: AST
    constructor recursion depth mismatch" (numpy parses each .npy header with ast.literal_eval).
    """
    n, rounds = 200, 20
    ids = [f"v{i}_{s}" for i in range(n) for s in (1, 2)]
    catalog = pd.DataFrame(
        {"id": ids, "volume_id": [i.split("_")[0] for i in ids], "slice": [1, 2] * n, "px": 1.0, "py": 1.0}
    )
    store = VolumeStore(isolated_dirs / "data", catalog, "train", _ArraySpec())
    store.build(progress=False, workers=2)
    oof = isolated_dirs / "runs" / "seg" / "toy" / "fold_0" / "oof"
    for i in range(n):
        probs = np.zeros((2, 1, 3, 4), np.uint8)
        probs[:, 0, 1:, 1:] = i % 256 or 1
        arrays = {"probs": probs, "ids": np.asarray([f"v{i}_1", f"v{i}_2"])}
        write_with(oof / f"v{i}.npz", lambda tmp, a=arrays: np.savez_compressed(tmp, **a))
    entries = [oof_entry(oof / f"v{i}.npz") for i in range(n)]

    def read(i: int) -> tuple[int, int, int]:
        garbage = [_Finalized() for _ in range(10)]  # noqa: F841 - collected mid-parse, as in a real pass
        volume = store[f"v{i}"]
        crop = entries[i].crop()
        return int(volume.image[1, 2, 3]), int(volume.mask[0, 0, 0, 0]), int(crop[1, 0, 1, 2])

    expected = [(i, i % 2, i % 256 or 1) for i in range(n)]
    with _busy_thread_switching(), ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(rounds):
            assert list(pool.map(read, range(n))) == expected


# --------------------------------------------------------------------------- gaps in a volume's slices

LGG_PATIENT = "TCGA_CS_4941_19960909"


def _lgg_patient(root: Path, ks, split: str = "train", size=(8, 8), name: str = LGG_PATIENT) -> Path:
    folder = root / ("kaggle_3m" if split == "train" else "test") / name
    folder.mkdir(parents=True, exist_ok=True)
    for k in ks:
        tifffile.imwrite(folder / f"{name}_{k}.tif", np.full((*size, 3), 40, np.uint8))
        mask = np.zeros(size, np.uint8)
        mask[2:4, 2:4] = 255 * (k % 2)
        tifffile.imwrite(folder / f"{name}_{k}_mask.tif", mask)
    return folder


def test_a_gap_in_an_lgg_patient_is_one_line_naming_patient_and_slices(
    isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    root = isolated_dirs / "lgg"
    spec = get_dataset("lgg")
    _lgg_patient(root, range(1, 7), name="TCGA_DU_5855_19951217")
    _lgg_patient(root, [1, 2, 4, 5, 6])  # slice k=3 (image and mask) removed
    with pytest.raises(
        DataError, match=rf"{LGG_PATIENT} \(.*{LGG_PATIENT}\) lacks slice\(s\) 3 of 1..6: 2.5D"
    ):
        spec.load_split(root, "train")
    monkeypatch.setenv("DATASET", "lgg")
    monkeypatch.setenv("DATA_DIR", str(root))
    capsys.readouterr()
    assert run_cli("folds", folds.main, ["--config", "configs/folds.yaml", "--set", "dataset=lgg"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("folds: error: ") and "lacks slice(s) 3 of 1..6" in err[0]

    _lgg_patient(root, [3])  # restored: the train split loads; now a test patient with a gap
    assert len(spec.load_split(root, "train")) == 12
    _lgg_patient(root, [1, 2, 5], split="test", name="TCGA_FG_7637_20000922")
    with pytest.raises(DataError, match=r"TCGA_FG_7637_20000922 .* lacks slice\(s\) 3, 4 of 1..5"):
        spec.prediction_catalog(root)


def test_lgg_slice_numbers_twice_or_images_of_another_size_name_the_file(tmp_path: Path) -> None:
    spec = get_dataset("lgg")
    folder = _lgg_patient(tmp_path, range(1, 4))
    tifffile.imwrite(folder / f"{LGG_PATIENT}_02.tif", np.zeros((8, 8, 3), np.uint8))
    tifffile.imwrite(folder / f"{LGG_PATIENT}_02_mask.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"has slice\(s\) 2 twice.*keep one file per slice"):
        spec.load_split(tmp_path, "train")
    for name in (f"{LGG_PATIENT}_02.tif", f"{LGG_PATIENT}_02_mask.tif"):
        (folder / name).unlink()
    _lgg_patient(tmp_path, [2], size=(8, 6))  # one slice of another size
    catalog = spec.load_split(tmp_path, "train")
    with pytest.raises(
        DataError, match=rf"{LGG_PATIENT}_2.tif: image is 6x8, but the other images of {LGG_PATIENT} are 8x8"
    ):
        spec.read_volume(catalog)


def test_real_lgg_patients_hold_every_slice(shared_data: Path) -> None:
    catalog = get_dataset("lgg").load_split(shared_data / "lgg-real-dev", "train")
    assert len(catalog) == 563 and catalog["volume_id"].nunique() == 15


def test_a_gap_in_a_uw_day_is_refused_in_train_and_test(isolated_dirs: Path) -> None:
    spec = get_dataset("uwmgi")
    root = write_dataset(isolated_dirs / "uw", {1: [0], 2: [0]}, n_slices=6)
    assert len(spec.load_split(root, "train")) == 12
    next((root / "train" / "case2" / "case2_day0" / "scans").glob("slice_0003_*.png")).unlink()
    labels = pd.read_csv(root / "train.csv", keep_default_na=False)
    labels[labels["id"] != "case2_day0_slice_0003"].to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"case2_day0 \(.*case2_day0/scans\) lacks slice\(s\) 3 of 1..6"):
        spec.load_split(root, "train")

    rows = pd.DataFrame(write_day(root, 7, 1, n_slices=5, split="test"))
    rows[["id", "class"]].assign(predicted="").to_csv(root / "sample_submission.csv", index=False)
    assert len(spec.prediction_catalog(root)) == 5
    next((root / "test" / "case7" / "case7_day1" / "scans").glob("slice_0004_*.png")).unlink()
    with pytest.raises(DataError, match=r"case7_day1 .* lacks slice\(s\) 4 of 1..5"):
        spec.prediction_catalog(root)


# --------------------------------------------------------------------------- nerve frames of any size


def test_nerve_test_frames_are_batched_by_size() -> None:
    sizes = [(420, 580)] * 40 + [(400, 580)] + [(420, 580)] * 30
    frame = pd.DataFrame({"height": [h for h, _ in sizes], "width": [w for _, w in sizes]})
    names = batch_names(frame)
    assert names[:TEST_BLOCK] == ["test0000"] * TEST_BLOCK and names[40] == "test0003"
    by_batch = frame.assign(batch=names).groupby("batch")
    assert by_batch.size().max() <= TEST_BLOCK and (by_batch.nunique().max() == 1).all()  # one size each
    assert batch_names(frame.iloc[: TEST_BLOCK + 1]) == ["test0000"] * TEST_BLOCK + ["test0001"]  # as before


def test_a_nerve_test_frame_of_another_size_is_submitted_at_its_size(isolated_dirs: Path) -> None:
    root = isolated_dirs / "nerve"
    make_data.main(["--dataset", "nerve", "--out", str(root), "--preset", "tiny"])  # 84x116 frames
    frames = sorted((root / "test").glob("*.tif"), key=lambda p: int(p.stem))
    odd = frames[1]
    tifffile.imwrite(odd, tifffile.imread(odd)[:64])  # cut to 64x116
    catalog = get_dataset("nerve").prediction_catalog(root)
    alone = catalog[catalog["volume_id"] == catalog.set_index("id").at[odd.stem, "volume_id"]]
    assert list(alone["id"]) == [odd.stem]

    seg = SegConfig(
        name="toy_nerve_seg",
        dataset="nerve",
        data=DataCfg(k=0, img_size=(32, 32), crop=False),
        model=ModelCfg(arch="Unet", encoder="tu-resnet10t", kwargs={"decoder_channels": [16, 16, 8, 8, 8]}),
    )
    folder = run_dir("seg", seg.name, 0)
    write_text(folder / "config.yaml", runtime.record_machine(dump_config(seg)))  # loads with its fingerprint
    torch.save(
        {"model": build_model(seg, get_dataset(seg.dataset)).state_dict(), "epoch": 1}, folder / "best.pt"
    )
    cfg = EnsembleConfig(name="toy_nerve_ens", dataset="nerve", members=(MemberCfg(config=seg.name),))
    decisions = Decisions(
        classes={"nerve": ClassParams(0.0, 0.0, 0)},  # threshold 0: every pixel, so each RLE is "1 <H*W>"
        weights={seg.name: 1.0},
        members=[{"config": seg.name, "folds": [0]}],
        ensemble=cfg.name,
        dataset="nerve",
        volumetric=False,
    )
    write_decisions(decisions_path(cfg.name), decisions)
    out = run_submit(
        cfg, get_dataset(cfg.dataset), root, isolated_dirs / "submission.csv", device="cpu", force=True
    )
    written = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("img")["pixels"]
    assert written[odd.stem] == f"1 {64 * 116}"
    assert all(written[p.stem] == f"1 {84 * 116}" for p in frames if p != odd)


# --------------------------------------------------------------------------- the machine's fingerprint


def test_the_fingerprint_rides_in_config_yaml_and_loads_back(tmp_path: Path) -> None:
    cfg = load_config("configs/demo_seg.yaml")
    text = runtime.record_machine(dump_config(cfg))
    machine = yaml.safe_load(text)["machine"]
    assert machine["cpu"] and machine["versions"]["torch"] == str(torch.__version__)
    assert machine["kernels"]["aten"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"]["torch"] == torch.get_num_threads() and machine["cpu_isa"] is None
    assert config_from_text(text, "config.yaml", stage="seg") == cfg
    write_text(tmp_path / "config.yaml", text)
    assert load_config(tmp_path / "config.yaml", stage="seg") == cfg
    line = runtime.machine_summary(machine)
    assert machine["cpu"] in line and "CPU_ISA off" in line and f"ATen {machine['kernels']['aten']}" in line


def test_a_trained_run_records_its_machine(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(isolated_dirs / "uw", {1: [0], 2: [0]}, n_slices=4)
    spec = get_dataset("uwmgi")
    catalog = spec.load_split(root, "train")
    write_csv(root / "folds.csv", make_folds(catalog, np.ones(len(catalog), bool), n_folds=2, seed=0))
    monkeypatch.setenv("DATA_DIR", str(root))
    fast = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=2", "data.img_size=[32,32]"]
    argv = ["--config", "configs/demo_seg.yaml", "--folds", "0", "--jobs", "1"]
    (out,) = train_seg.main([*argv, "--set", *fast, "data.crop=false", "data.k=0"])
    machine = yaml.safe_load((out / "config.yaml").read_text())["machine"]
    assert machine["kernels"]["aten"] and "isa" in machine and "onednn" in machine["versions"]
    load_member(out, "cpu")  # inference reads the same file


def test_cpu_isa_names_and_machines_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPU_ISA", "avx9")
    with pytest.raises(ConfigError, match="CPU_ISA=avx9: unknown; valid: avx2, avx512"):
        runtime.pin_cpu_isa()
    assert runtime.pin_cpu_isa(strict=False) == {}  # the early call leaves the report to configure_runtime
    monkeypatch.setenv("CPU_ISA", "avx512")
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: ["sse2", "avx", "avx2", "fma"])
    with pytest.raises(ConfigError, match="CPU_ISA=avx512, but this CPU lacks avx512f"):
        runtime.pin_cpu_isa()
    monkeypatch.setenv("CPU_ISA", "off")
    assert runtime.cpu_isa() is None and runtime.pin_cpu_isa() == {}


@pytest.mark.skipif("avx2" not in runtime._cpu_flags(), reason="the pin needs an AVX2 CPU")
def test_cpu_isa_pins_every_library_of_a_stage_process() -> None:
    """A stage process started with CPU_ISA=avx2: ATen, OpenBLAS and numba report AVX2 kernels."""
    code = (
        "import stages, stages.train_seg, json\n"
        "from pipeline.runtime import configure_runtime, machine_fingerprint\n"
        "configure_runtime()\n"
        "print(json.dumps(machine_fingerprint()))"
    )
    env = {**os.environ, "CPU_ISA": "avx2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    fp = yaml.safe_load(done.stdout.strip().splitlines()[-1])
    assert fp["cpu_isa"] == "avx2" and fp["kernels"]["aten"] == "AVX2"
    assert fp["kernels"]["numba_cpu"] == "x86-64-v3" and fp["kernels"]["blas"].endswith("Haswell")
    assert "came after" not in done.stderr  # every library was pinned in time
