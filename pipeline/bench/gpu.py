"""`make bench-gpu`: the figures a GPU machine (H100/H200 class) is for, in one run; tiny on a CPU.

1. ``rle``: masks/s of the CUDA RLE (:mod:`pipeline.rle_cuda`) on masks already on the device
   (on a CPU: the numba CPU batch encoder, :func:`pipeline.rle.encode_masks`);
2. ``train``: AMP training images/s of each full config's network (segmenters, classifiers, the 3D
   member) at its ``data.img_size`` (3D: ``seg3d.patch_size``) and batch, on random inputs: forward,
   BCE, backward and an AdamW step in the config's precision and memory layout;
3. ``submit``: slices/s of ``predict_volume`` (prepare, network, TTA views, paste-back: `make submit`'s
   per-member work, measured as ``stages.bench_infer`` does) per 2.5D ensemble member, without and
   with the ensemble's TTA, on a synthetic volume;
4. ``sliding``: 3D sliding-window volumes/s of the full 3D member (its ROI, overlap and Gaussian
   blending; no TTA, and with the ensemble's flips);
5. ``ddp``: training images/s of one network wrapped in DistributedDataParallel inside a 1-process
   group (nccl on a GPU, gloo on a CPU) against the same network plain: the wrapper's overhead.

Networks are built untrained (random weights, no weights cache: speed does not depend on them).
Every figure is the median of ``repeats`` timed runs after one warm-up run. :data:`TINY` runs the
same code on the demo configs at toy sizes (the tests, and any machine without CUDA).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bench.timing import median_seconds
from pipeline.config import CONFIG_DIR, ClsConfig, ConfigError, MemberConfig, SegConfig, TTACfg
from pipeline.data.geometry import full_box
from pipeline.datasets import get_dataset, load_config
from pipeline.device import amp_autocast, amp_dtype
from pipeline.models.predict import build_model, channels_last, input_channels, is_3d, predict_volume
from pipeline.rle import encode_masks

log = logging.getLogger(__name__)

NO_TTA = TTACfg(hflip=False, vflip=False, scales=(1.0,))
FULL_PATTERNS = ("full_*.yaml", "lgg_full_*.yaml", "nerve_full_*.yaml")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure and at which sizes."""

    train_configs: tuple[str, ...]  # seg / cls configs whose networks train (empty: every full config)
    ensemble: str  # its members (and TTA) give the submit figures
    seg3d: str  # the 3D member of the sliding-window figure
    slices: int = 144  # synthetic volume (a UW-Madison scan: 144 slices of 266x266)
    size: tuple[int, int] = (266, 266)
    rle_masks: int = 2048
    steps: int = 10  # optimizer steps per timed training run
    repeats: int = 3
    shrink: bool = False  # toy sizes: img_size 64, batch 2; 3D: 32 px, patch and ROI 8x32x32


FULL = Plan(train_configs=(), ensemble="full_ensemble", seg3d="full_seg3d_segresnet_ft")
TINY = Plan(
    train_configs=("demo_seg", "demo_seg3d"),
    ensemble="demo_ensemble",
    seg3d="demo_seg3d",
    slices=8,
    size=(64, 64),
    rle_masks=32,
    steps=1,
    repeats=1,
    shrink=True,
)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after a warm-up run, the GPU's queue included."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return median_seconds(fn, repeats, sync)


def full_configs() -> list[str]:
    """Every full seg and cls config of the three datasets (``configs/{,lgg_,nerve_}full_*.yaml``)."""
    names = sorted({p.stem for pattern in FULL_PATTERNS for p in CONFIG_DIR.glob(pattern)})
    return [n for n in names if isinstance(load_config(n), SegConfig | ClsConfig)]


def member_config(name: str) -> MemberConfig:
    """A seg or cls config by name (with its dataset's defaults); another stage's config fails."""
    cfg = load_config(name)
    if not isinstance(cfg, SegConfig | ClsConfig):
        raise ConfigError(f"{name}: a '{cfg.stage}' config, not a segmenter's or a classifier's")
    return cfg


def prepared(name: str, plan: Plan) -> MemberConfig:
    """A config as the bench builds it: no starting weights (untrained), toy sizes when ``plan.shrink``."""
    cfg = member_config(name)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, encoder_weights=None, pretrained_path=None)
    )
    if not plan.shrink:
        return cfg
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, img_size=(64, 64)),
        train=dataclasses.replace(cfg.train, batch_size=2),
    )
    if is_3d(cfg):  # one window per volume
        small = (8, 32, 32)
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, img_size=small[1:]),
            seg3d=dataclasses.replace(cfg.seg3d, patch_size=small, roi_size=small, sw_batch_size=1),
        )
    return cfg


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- 1. RLE


def rle_rate(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Masks/s of the RLE encoder for masks on ``device`` (disks of random size; a quarter empty)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, (h, w) = plan.rle_masks, plan.size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([h, w])
    radius = torch.rand(n, generator=gen) * min(h, w) / 6 * (torch.rand(n, generator=gen) > 0.25)
    dist = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    masks = (dist <= radius[:, None, None] ** 2).to(torch.uint8)
    if device.type == "cuda":
        from pipeline.rle_cuda import rle_encode_cuda

        on_device = masks.to(device)
        seconds = timed(lambda: rle_encode_cuda(on_device), plan.repeats, device)
        encoder = "rle_encode_cuda (device tensors)"
    else:
        host = masks.numpy()
        seconds = timed(lambda: encode_masks(host), plan.repeats, device)
        encoder = "encode_masks (numba, CPU)"
    return {"encoder": encoder, "masks": n, "shape": [h, w], "masks_per_s": n / seconds}


# --------------------------------------------------------------------------- 2. training


def _batch(cfg: MemberConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets of one training batch of ``cfg``'s network."""
    spec = get_dataset(cfg.dataset)
    if is_3d(cfg):
        batch = cfg.train.batch_size * cfg.seg3d.samples_per_volume
        spatial: tuple[int, ...] = tuple(cfg.seg3d.patch_size)
    else:
        batch, spatial = cfg.train.batch_size, tuple(cfg.data.img_size)
    x = torch.randn(batch, input_channels(cfg.data, spec.channels), *spatial, device=device)
    classes = len(spec.classes)
    target = (batch, classes) if isinstance(cfg, ClsConfig) else (batch, classes, *spatial)
    y = (torch.rand(*target, device=device) > 0.5).float()
    if channels_last(cfg):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_rate(model: nn.Module, cfg: MemberConfig, device: torch.device, plan: Plan) -> float:
    """Images (3D: patches) per second of ``plan.steps`` AMP training steps of ``model``."""
    x, y = _batch(cfg, device)
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.train.amp) == torch.float16)
    model.train()

    def steps() -> None:
        for _ in range(plan.steps):
            optimizer.zero_grad(set_to_none=True)
            with amp_autocast(device, cfg.train.amp):
                out = model(x)
            loss = F.binary_cross_entropy_with_logits(out.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return len(x) * plan.steps / timed(steps, plan.repeats, device)


def network(cfg: MemberConfig, device: torch.device) -> nn.Module:
    model = build_model(cfg, get_dataset(cfg.dataset), pretrained=False).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(cfg) else model


def train_rates(device: torch.device, plan: Plan) -> list[dict[str, Any]]:
    """One row per config: its network, input size, batch and AMP training images/s."""
    rows = []
    for name in plan.train_configs or tuple(full_configs()):
        cfg = prepared(name, plan)
        model = network(cfg, device)
        size = list(cfg.seg3d.patch_size) if is_3d(cfg) else list(cfg.data.img_size)
        rate = train_rate(model, cfg, device, plan)
        arch = cfg.model.arch if is_3d(cfg) else f"{cfg.model.arch}/{cfg.model.encoder}"
        rows.append({"config": name, "network": arch, "size": size, "batch": len(_batch(cfg, device)[0]),
                     "precision": str(amp_dtype(device, cfg.train.amp) or "fp32").removeprefix("torch."),
                     "images_per_s": rate})  # fmt: skip
        log.info("train %s (%s, %s): %.1f images/s", name, arch, size, rate)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- 3-4. inference


def synthetic_volume(cfg: MemberConfig, plan: Plan) -> np.ndarray:
    channels = get_dataset(cfg.dataset).channels
    shape = (plan.slices, *plan.size) if channels == 1 else (plan.slices, channels, *plan.size)
    return np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)


def predict_rate(model: nn.Module, cfg: MemberConfig, image: np.ndarray, tta: TTACfg, device: torch.device,
                 plan: Plan, batch_size: int) -> float:  # fmt: skip
    """Seconds per volume of ``predict_volume`` (the whole frame as the box)."""

    def run() -> None:
        with torch.no_grad():
            predict_volume(model, cfg, image, full_box(image.shape[-2:]), device=device, batch_size=batch_size,
                        tta=tta, amp=device.type == "cuda")  # fmt: skip

    return timed(run, plan.repeats, device)


def submit_rates(device: torch.device, plan: Plan) -> list[dict[str, Any]]:
    """Per ensemble member: slices/s without and with the ensemble's TTA."""
    ens = load_config(plan.ensemble, stage="ensemble")
    names = [m.config for m in ens.members] + ([ens.classifier] if ens.classifier else [])
    rows = []
    for name in names:
        cfg = prepared(name, plan)
        if cfg.stage != "seg" or is_3d(cfg):
            continue  # the 3D member: the sliding-window figure; the gate: stages.bench_infer
        model = network(cfg, device).eval()
        image = synthetic_volume(cfg, plan)
        row = {"config": name, "slices": plan.slices}
        for label, tta in (("no_tta", NO_TTA), ("tta", ens.tta)):
            row[label] = plan.slices / predict_rate(model, cfg, image, tta, device, plan, ens.batch_size)
        rows.append(row)
        log.info("submit %s: %.1f slices/s, %.1f with TTA", name, row["no_tta"], row["tta"])
        del model
    return rows


def sliding_rate(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Volumes/s of the 3D member's sliding window (``predict_sliding_window`` through ``predict_volume``)."""
    cfg = prepared(plan.seg3d, plan)
    if not is_3d(cfg):
        raise ConfigError(f"{plan.seg3d} is not a 3D member (model.spatial_dims: 3)")
    ens = load_config(plan.ensemble, stage="ensemble")
    model = network(cfg, device).eval()
    image = synthetic_volume(cfg, plan)
    out: dict[str, Any] = {"config": plan.seg3d, "volume": [plan.slices, *plan.size],
                           "roi": list(cfg.seg3d.roi_size), "overlap": cfg.seg3d.overlap}  # fmt: skip
    for label, tta in (("no_tta", NO_TTA), ("tta", ens.tta)):
        out[f"volumes_per_s_{label}"] = 1.0 / predict_rate(model, cfg, image, tta, device, plan, 1)
    log.info("sliding window %s: %.3f volumes/s", plan.seg3d, out["volumes_per_s_no_tta"])
    return out


# --------------------------------------------------------------------------- 5. DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ddp_rates(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Training images/s of the first config's network plain and inside DDP with one process."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    name = (plan.train_configs or tuple(full_configs()))[0]
    cfg = prepared(name, plan)
    model = network(cfg, device)
    plain = train_rate(model, cfg, device, plan)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        raise RuntimeError("bench-gpu's DDP figure needs its own process group: run it outside torchrun")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ids = [device.index or 0] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
        ddp = train_rate(wrapped, cfg, device, plan)
    finally:
        dist.destroy_process_group()
    out = {"config": name, "backend": backend, "plain_images_per_s": plain, "ddp_images_per_s": ddp,
           "ddp_over_plain": ddp / plain}  # fmt: skip
    log.info("ddp %s: plain %.1f, DDP x1 (%s) %.1f images/s", name, plain, backend, ddp)
    return out


def run_bench(device: torch.device, plan: Plan) -> dict[str, Any]:
    """Every figure of the module doc, as one JSON-able dict."""
    log.info("bench-gpu on %s (%s)", device_name(device), "tiny CPU mode" if plan.shrink else "full configs")
    result: dict[str, Any] = {"device": device_name(device), "mode": "tiny" if plan.shrink else "full",
                              "torch": torch.__version__, "plan": dataclasses.asdict(plan)}  # fmt: skip
    result["rle"] = rle_rate(device, plan)
    log.info("rle %s: %.0f masks/s", result["rle"]["encoder"], result["rle"]["masks_per_s"])
    result["train"] = train_rates(device, plan)
    result["submit"] = submit_rates(device, plan)
    result["sliding"] = sliding_rate(device, plan)
    result["ddp"] = ddp_rates(device, plan)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures of :func:`run_bench` as one plain-text table."""
    rle, sliding, ddp = result["rle"], result["sliding"], result["ddp"]
    lines = [
        f"bench-gpu on {result['device']} ({result['mode']}; torch {result['torch']}); median of "
        f"{result['plan']['repeats']} runs after a warm-up",
        f"{'measure':10s} {'config':32s} {'detail':44s} {'figure':>12s}  unit",
        f"{'rle':10s} {'-':32s} {rle['encoder'] + ', ' + 'x'.join(map(str, rle['shape'])):44s} "
        f"{rle['masks_per_s']:12.1f}  masks/s",
    ]
    for row in result["train"]:
        detail = f"{row['network']} {'x'.join(map(str, row['size']))} b{row['batch']} {row['precision']}"
        lines.append(
            f"{'train':10s} {row['config']:32s} {detail[:44]:44s} {row['images_per_s']:12.1f}  images/s"
        )
    for row in result["submit"]:
        for label in ("no_tta", "tta"):
            detail = f"{row['slices']}-slice volume, {'TTA' if label == 'tta' else 'no TTA'}"
            lines.append(f"{'submit':10s} {row['config']:32s} {detail:44s} {row[label]:12.1f}  slices/s")
    for label in ("no_tta", "tta"):
        detail = (f"{'x'.join(map(str, sliding['volume']))} roi {'x'.join(map(str, sliding['roi']))}"
                  f"{', flips' if label == 'tta' else ''}")  # fmt: skip
        lines.append(f"{'sliding':10s} {sliding['config']:32s} {detail:44s} "
                     f"{sliding['volumes_per_s_' + label]:12.3f}  volumes/s")  # fmt: skip
    for key, label in (
        ("plain_images_per_s", "plain"),
        ("ddp_images_per_s", f"DDP, 1 process ({ddp['backend']})"),
    ):
        lines.append(f"{'ddp':10s} {ddp['config']:32s} {label:44s} {ddp[key]:12.1f}  images/s")
    return "\n".join(lines)
