"""Inference throughput: slices/s per model-fold and end to end, with and without TTA, and the
projected time of a hidden test set (~25,000 slices) with a 5-fold x 3-model ensemble.

    python -m stages.bench_infer                          # demo ensemble on this machine
    python -m stages.bench_infer --full --slices 144      # untrained full-size GPU members (random init)

Per model-fold figures time ``predict_day`` (2.5D prepare + network + paste-back) on one day of
``--slices`` slices at 266x266 (random init: speed does not depend on the weights). End to end
times ``make submit``'s predictor (detector crop, classifier gate, every member x fold with TTA,
post-processing, RLE) on the test days, when the ensemble has been tuned (`make demo` / `make tune`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from pipeline.config import TTACfg, load_config
from pipeline.data.catalog import scan_split
from pipeline.data.geometry import full_box
from pipeline.data.volumes import read_volume
from pipeline.infer.postprocess import decisions_path, read_decisions
from pipeline.infer.predict import build_model, predict_day, predict_day_cls
from pipeline.infer.submit import EnsemblePredictor
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime
from pipeline.train.engine import resolve_device

HIDDEN_SLICES = 25_000
FOLDS, MODELS = 5, 3
KAGGLE_LIMIT_H = 9.0


def median_rate(fn, n_slices: int, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotune, numba JIT, allocator)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return n_slices / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo_ensemble.yaml")
    parser.add_argument("--full", action="store_true", help="time configs/full_ensemble.yaml's members")
    parser.add_argument("--slices", type=int, default=40, help="slices of the synthetic day per model timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    configure_runtime(seed=0, log_level="WARNING")
    cfg = load_config("configs/full_ensemble.yaml" if args.full else args.config, stage="ensemble")
    device = resolve_device(args.device)
    amp = cfg.amp and device.type == "cuda"
    image = np.random.default_rng(0).integers(0, 4000, (args.slices, 266, 266)).astype(np.uint16)
    no_tta = TTACfg(hflip=False, vflip=False, scales=(1.0,))
    print(f"device {device}, day of {args.slices} slices at 266x266, median of {args.repeats}")
    print(f"{'model':34s} {'no TTA':>12s} {'TTA':>12s}   (slices/s per model-fold)")
    rates: dict[str, dict[str, float]] = {}
    configs = [load_config(m.config, stage="seg") for m in cfg.members]
    if cfg.classifier:
        configs.append(load_config(cfg.classifier, stage="cls"))
    for member in configs:
        model = build_model(member).to(device).eval()
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        predict = predict_day if member.stage == "seg" else predict_day_cls
        row = {}
        for label, tta in (("no_tta", no_tta), ("tta", cfg.tta)):
            row[label] = median_rate(
                lambda tta=tta, model=model, member=member, predict=predict: predict(
                    model,
                    member,
                    image,
                    full_box(image.shape[1:]),
                    device=device,
                    batch_size=cfg.batch_size,
                    tta=tta,
                    amp=amp,
                ),
                args.slices,
                args.repeats,
            )
        rates[f"{member.stage}:{member.name}"] = row
        print(f"{member.stage + ':' + member.name:34s} {row['no_tta']:12.1f} {row['tta']:12.1f}")

    seg = [r for k, r in rates.items() if k.startswith("seg:")]
    cls = [r for k, r in rates.items() if k.startswith("cls:")]
    per_slice = {}
    for label in ("no_tta", "tta"):
        # 3 models x 5 folds of segmenters (members beyond those measured take their mean speed)
        seg_s = FOLDS * MODELS * statistics.mean(1.0 / r[label] for r in seg)
        cls_s = FOLDS * sum(1.0 / r[label] for r in cls)
        per_slice[label] = seg_s + cls_s
    print(
        f"\nprojection for {HIDDEN_SLICES} slices, {FOLDS} folds x {MODELS} models + {FOLDS} classifier folds:"
    )
    for label, seconds in per_slice.items():
        hours = HIDDEN_SLICES * seconds / 3600
        print(
            f"  {label:7s} {hours:7.2f} h  ({hours / KAGGLE_LIMIT_H:.0%} of Kaggle's {KAGGLE_LIMIT_H:.0f} h GPU limit)"
        )

    end_to_end = {}
    root = data_dir(cfg.data_dir)
    catalog = scan_split(root, "test")
    if decisions_path(cfg.name).is_file() and not catalog.empty and not args.full:
        decisions = read_decisions(cfg.name)
        volumes = [read_volume(g, False) for _, g in catalog.groupby("case_day", sort=False)]
        n = sum(len(v) for v in volumes)
        for label, tta in (("no_tta", no_tta), ("tta", cfg.tta)):
            predictor = EnsemblePredictor(dataclasses.replace(cfg, tta=tta), decisions, device)
            end_to_end[label] = median_rate(
                lambda p=predictor: [p.encode(p.masks(v.image)) for v in volumes], n, args.repeats
            )
        folds = len(predictor.segmenters) + len(predictor.classifiers)
        print(
            f"\nend to end on {n} test slices ({folds} model-folds, crop + gate + ensemble + post-processing + RLE):"
            f" {end_to_end['no_tta']:.1f} slices/s without TTA, {end_to_end['tta']:.1f} with TTA"
        )
    else:
        print(f"\n(end to end skipped: run `make tune` for {cfg.name} on a dataset with a test split first)")
    return {"per_model_fold": rates, "projection_s_per_slice": per_slice, "end_to_end": end_to_end}


if __name__ == "__main__":
    main()
