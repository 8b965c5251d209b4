"""Loading a trained member (a run folder's resolved config and ``best.pt``) for inference.

The forward machinery (prepare, batches, TTA views, paste-back) is :mod:`pipeline.models.predict`,
shared with training's validation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import ClsConfig, SegConfig, config_from_text
from pipeline.datasets import get_dataset
from pipeline.errors import PipelineError
from pipeline.models.predict import build_model, channels_last
from pipeline.train.checkpoint import load_weights, train_command


class MemberError(PipelineError, FileNotFoundError):
    """A run folder does not hold a trained member."""


def load_member(
    run_dir: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, SegConfig | ClsConfig]:
    """(model in eval mode on ``device`` with best.pt weights, its resolved config) of a run folder."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / "config.yaml", run_dir / "best.pt"
    if not (config_path.is_file() and weights_path.is_file()):
        stage = run_dir.parent.parent.name if run_dir.name.startswith("fold_") else run_dir.parent.name
        missing = " and ".join(p.name for p in (config_path, weights_path) if not p.is_file())
        fold = run_dir.name.removeprefix("fold_")
        raise MemberError(
            f"{run_dir}: no trained member here ({missing} missing); run "
            f"`{train_command(stage, run_dir.parent.name, [fold])}` first"
        )
    cfg = config_from_text(config_path.read_text(), source=str(config_path))
    if not isinstance(cfg, (SegConfig, ClsConfig)):
        raise MemberError(f"{config_path}: a '{cfg.stage}' config, not a segmenter's or a classifier's")
    model = build_model(cfg, get_dataset(cfg.dataset), pretrained=False)  # the checkpoint holds every weight
    load_weights(weights_path, model, map_location="cpu")
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last(cfg):
        model = model.to(memory_format=torch.channels_last)
    return model, cfg
