"""`python -m stages.bench_infer`: inference throughput, and the projected time of the hidden test set.

    python -m stages.bench_infer                 # demo ensemble on this machine (CPU unless a GPU is seen)
    python -m stages.bench_infer --full          # the full GPU configs' members, untrained (random init)

1. Per model-fold: slices/s of ``predict_volume`` (2.5D prepare + network + TTA views +
   paste-back) on one synthetic volume of ``--slices`` slices at 266x266, without TTA
   and with the ensemble config's TTA. The networks are built from the member configs with
   random weights: speed does not depend on the weights, so nothing has to be trained.
2. End to end: ``make submit``'s predictor (detector crop, classifier gate, every member x fold,
   post-processing, RLE) on ``--volumes`` test volumes, phase by phase. It needs the tuned
   ensemble (``make tune``) and trained members, so it is skipped with ``--full`` or without them.
3. Projection: ``--hidden-slices`` (about 25,000 on Kaggle) through a 5-fold x 3-model segmenter
   ensemble plus a 5-fold classifier at the measured per-model rates, plus the per-slice cost of
   the other phases when step 2 ran.

Every figure is the median of ``--repeats`` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

from pipeline.bench.timing import median_seconds
from pipeline.config import EnsembleConfig, MemberConfig, TTACfg
from pipeline.data.geometry import full_box
from pipeline.datasets import get_dataset, load_config
from pipeline.device import resolve_device
from pipeline.infer.postprocess import apply_postprocess, decisions_path, read_decisions, to_uint8
from pipeline.models.predict import build_model, channels_last, predict_volume
from pipeline.paths import data_dir
from pipeline.runtime import configure_runtime

FOLDS, MODELS = 5, 3
KAGGLE_LIMIT_H = 9.0
NO_TTA = TTACfg(hflip=False, vflip=False, scales=(1.0,))
PHASES = ("crop", "gate", "segment", "postprocess", "rle")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_rates(
    cfg: EnsembleConfig, device: torch.device, n_slices: int, repeats: int
) -> dict[str, dict[str, float]]:
    """{stage:name: {"no_tta": slices/s, "tta": slices/s}} of one fold of every member and the classifier."""
    spec = get_dataset(cfg.dataset)
    channels = spec.channels
    shape = (n_slices, 266, 266) if channels == 1 else (n_slices, channels, 266, 266)
    image = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    amp = cfg.amp and device.type == "cuda"
    members: list[MemberConfig] = [load_config(m.config, stage="seg") for m in cfg.members]
    if cfg.classifier:
        members.append(load_config(cfg.classifier, stage="cls"))
    rates = {}
    for member in members:
        model = build_model(member, spec, pretrained=False).to(device).eval()
        if channels_last(member):
            model = model.to(memory_format=torch.channels_last)
        row = {}
        for label, tta in (("no_tta", NO_TTA), ("tta", cfg.tta)):

            def run(tta: TTACfg = tta, model: torch.nn.Module = model, member: MemberConfig = member) -> None:
                predict_volume(
                    model,
                    member,
                    image,
                    full_box(image.shape[-2:]),
                    device=device,
                    batch_size=cfg.batch_size,
                    tta=tta,
                    amp=amp,
                )

            row[label] = n_slices / median_seconds(run, repeats, _sync)
        rates[f"{member.stage}:{member.name}"] = row
        print(
            f"  {member.stage + ':' + member.name:36s} {row['no_tta']:10.1f} {row['tta']:10.1f}", flush=True
        )
        del model
    return rates


def end_to_end(
    cfg: EnsembleConfig, device: torch.device, n_volumes: int, repeats: int
) -> dict[str, Any] | None:
    """Seconds per slice of each submit phase on ``n_volumes`` test volumes, without and with TTA."""
    from pipeline.infer.submit import EnsemblePredictor

    spec = get_dataset(cfg.dataset)
    catalog = spec.prediction_catalog(data_dir(cfg.data_dir, cfg.dataset))
    if not decisions_path(cfg.name).is_file() or catalog.empty:
        return None
    decisions = read_decisions(cfg.name)
    groups = [g for _, g in catalog.groupby("volume_id", sort=False)][: max(1, n_volumes)]
    volumes = [spec.read_volume(g, False) for g in groups]
    n = sum(len(v.ids) for v in volumes)
    # One predictor, the two variants interleaved (no TTA, TTA, no TTA, ...): a second predictor
    # loaded after the first ran 1.5-2x slower here whatever its TTA (allocator and cache state),
    # which once made TTA look 3x as costly as no TTA end to end.
    p = EnsemblePredictor(cfg, spec, decisions, device)
    variants = {"no_tta": NO_TTA, "tta": cfg.tta}

    def run() -> dict[str, float]:
        spent = dict.fromkeys(PHASES, 0.0)
        for volume in volumes:
            marks = [time.perf_counter()]
            boxes = p.boxes(volume.image)
            marks.append(time.perf_counter())
            gate = p.gate_probs(volume.image, boxes)
            marks.append(time.perf_counter())
            probs = to_uint8(p.seg_probs(volume.image, boxes))
            marks.append(time.perf_counter())
            masks = apply_postprocess(probs, gate, p.decisions.classes, spec.volumetric)
            marks.append(time.perf_counter())
            p.encode(masks.reshape(-1, *masks.shape[2:]), spec.rle_order)
            _sync()
            marks.append(time.perf_counter())
            for phase, a, b in zip(PHASES, marks, marks[1:]):
                spent[phase] += b - a
        return spent

    runs: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    for i in range(max(1, repeats) + 1):  # the first round warms up (JIT, allocator)
        for label, tta in variants.items():
            p.tta = tta
            spent = run()
            if i:
                runs[label].append(spent)
    out: dict[str, Any] = {}
    for label in variants:
        totals = {phase: statistics.median(r[phase] for r in runs[label]) / n for phase in PHASES}
        totals["total"] = statistics.median(sum(r.values()) for r in runs[label]) / n
        totals["model_folds"] = len(p.segmenters) + len(p.classifiers)
        out[label] = totals
    _print_end_to_end(out, len(volumes), n)
    out["slices"] = n
    return out


def _print_end_to_end(out: dict[str, dict[str, float]], n_volumes: int, n_slices: int) -> None:
    """The phases' ms/slice of each variant (``no_tta``, ``tta``) as a table."""
    print(
        f"\nend to end on {n_volumes} test volume(s), {n_slices} slices, {out['tta']['model_folds']} "
        "model-folds (ms/slice):"
    )
    print(f"  {'':8s}" + "".join(f"{ph:>12s}" for ph in (*PHASES, "total")) + f"{'slices/s':>12s}")
    for label, row in out.items():
        cells = "".join(f"{row[ph] * 1000:12.1f}" for ph in (*PHASES, "total"))
        print(f"  {label:8s}{cells}{1.0 / row['total']:12.1f}")
    print(f"  TTA / no TTA end to end: {out['tta']['total'] / out['no_tta']['total']:.2f}x")


def projection(rates: dict[str, dict[str, float]], e2e: dict | None, hidden: int) -> dict[str, float]:
    """Projected hours of ``hidden`` slices: 5 folds x 3 segmenters + 5 classifier folds (+ other phases)."""
    seg = [r for k, r in rates.items() if k.startswith("seg:")]
    cls = [r for k, r in rates.items() if k.startswith("cls:")]
    hours = {}
    print(
        f"\nprojection for {hidden} slices: {FOLDS} folds x {MODELS} segmenters (mean measured speed)"
        f" + {FOLDS} classifier folds{' + crop/post-processing/RLE as measured end to end' if e2e else ''}:"
    )
    for label in ("no_tta", "tta"):
        seconds = FOLDS * MODELS * statistics.mean(1.0 / r[label] for r in seg)
        seconds += FOLDS * sum(1.0 / r[label] for r in cls)
        if e2e:
            seconds += e2e[label]["crop"] + e2e[label]["postprocess"] + e2e[label]["rle"]
        hours[label] = hidden * seconds / 3600
        print(
            f"  {label:7s} {hours[label]:8.2f} h  ({hours[label] / KAGGLE_LIMIT_H:.0%} of Kaggle's"
            f" {KAGGLE_LIMIT_H:.0f} h limit)"
        )
    return hours


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo_ensemble.yaml")
    parser.add_argument(
        "--full", action="store_true", help="time configs/full_ensemble.yaml's members (untrained)"
    )
    parser.add_argument(
        "--slices", type=int, default=32, help="slices of the synthetic volume per model timing"
    )
    parser.add_argument("--volumes", type=int, default=2, help="test volumes of the end-to-end timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden-slices", type=int, default=25_000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    configure_runtime(seed=0, log_level="WARNING")
    cfg = load_config("configs/full_ensemble.yaml" if args.full else args.config, stage="ensemble")
    device = resolve_device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"{cfg.name} on {name}; median of {args.repeats} after a warm-up")
    print(f"per model-fold, one volume of {args.slices} slices at 266x266 (slices/s):")
    print(f"  {'model':36s} {'no TTA':>10s} {'TTA':>10s}   (TTA: {cfg.tta})")
    rates = model_rates(cfg, device, args.slices, args.repeats)
    e2e = None if args.full else end_to_end(cfg, device, args.volumes, args.repeats)
    if e2e is None:
        print(f"\n(end to end skipped: {'--full' if args.full else f'no tuned {cfg.name} or no test split'})")
    hours = projection(rates, e2e, args.hidden_slices)
    return {"per_model_fold": rates, "end_to_end": e2e or {}, "projection_h": hours}


if __name__ == "__main__":
    main()
