"""Checkpoint files of a training run: plain dicts of tensors and numbers, written atomically.

``best.pt``: ``{"model": state_dict, "epoch": int, "score": float | None}``.
``last.pt``: model, optimizer, scheduler, scaler, ema, epoch, best score/epoch, step, history
and RNG states, all loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.io import write_with

BEST = "best.pt"
LAST = "last.pt"


def save(path: Path, obj: dict[str, Any]) -> Path:
    """``torch.save`` through a temporary file renamed into place."""
    return write_with(path, lambda tmp: torch.save(obj, tmp))


def read(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train this run first)")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_weights(path: Path, model: nn.Module, map_location: Any = "cpu") -> dict[str, Any]:
    """Load the ``"model"`` state dict of ``best.pt`` / ``last.pt`` into ``model``; return the checkpoint."""
    ckpt = read(path, map_location)
    if "model" not in ckpt:
        raise ValueError(f"{path}: no 'model' entry (keys: {sorted(ckpt)}); is this a best.pt / last.pt?")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the model built from config.yaml: {exc}") from exc
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
