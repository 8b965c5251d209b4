"""Checkpoint files of a training run: plain dicts of tensors and numbers, written atomically.

``best.pt``: ``{"model": state_dict, "epoch": int, "score": float | None}``.
``last.pt``: model, optimizer, scheduler, scaler, ema, epoch, best score/epoch, step, history
and RNG states, all loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.io import write_with

BEST = "best.pt"
LAST = "last.pt"


def save(path: Path, obj: dict[str, Any]) -> Path:
    """``torch.save`` through a temporary file renamed into place."""
    return write_with(path, lambda tmp: torch.save(obj, tmp))


# the Makefile target and config variable that train each stage's runs
TRAIN_TARGETS = {"seg": "train-seg CONFIG", "cls": "train-cls CONFIG_CLS", "det": "train-det CONFIG_DET"}


def train_command(stage: str, name: str, folds: Sequence[int | str] | None = None) -> str:
    """The command that makes the run ``runs/<stage>/<name>[/fold_<k>]``: ``make train-seg CONFIG=...``."""
    target = TRAIN_TARGETS.get(stage, f"train-{stage} CONFIG")
    fold_text = (
        ""
        if not folds
        else " FOLDS=" + (str(folds[0]) if len(folds) == 1 else f"'{' '.join(map(str, folds))}'")
    )
    return f"make {target}=configs/{name}.yaml{fold_text}"


def retrain_hint(path: Path) -> str:
    """``run runs/seg/demo_seg/fold_0; retrain it: make train-seg CONFIG=configs/demo_seg.yaml FOLDS=0``."""
    path = Path(path)
    run = path.parent
    fold = run.name.removeprefix("fold_") if run.name.startswith("fold_") else None
    config_dir = run.parent if fold is not None else run
    command = train_command(config_dir.parent.name, config_dir.name, [fold] if fold else None)
    return f"run {run}; retrain it: {command}"


def read(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint dict loaded with ``weights_only=True``; a :class:`CheckpointError` naming the run otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} ({retrain_hint(path)})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not load ({reason[:160]}); {retrain_hint(path)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; {retrain_hint(path)}"
        )
    return ckpt


def describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """Which keys are missing, unexpected or of another shape between a model and a state dict."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and isinstance(found[k], torch.Tensor) and tuple(found[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("other shape (file vs model)", shapes),
    ):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts) or "no key difference"


def load_weights(path: Path, model: nn.Module, map_location: Any = "cpu") -> dict[str, Any]:
    """Load the ``"model"`` state dict of ``best.pt`` / ``last.pt`` into ``model``; return the checkpoint.

    A checkpoint of another architecture fails naming the keys and shapes that differ.
    """
    ckpt = read(path, map_location)
    if "model" not in ckpt or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: no 'model' state dict (keys: {sorted(ckpt)}); {retrain_hint(path)}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        diff = describe_mismatch(model.state_dict(), ckpt["model"])
        raise CheckpointError(
            f"{path} is a checkpoint of another architecture than its config.yaml builds ({diff}); "
            f"{retrain_hint(path)}"
        ) from None
    return ckpt


def cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with its tensors detached and moved to the CPU."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain containers."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
