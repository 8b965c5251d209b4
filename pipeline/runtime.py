"""Process-wide settings, applied once by each stage (never at import).

Sets the offline switches every dependency needs, the thread counts, and seeds.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.paths import PROJECT_ROOT

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def yolo_config_dir() -> Path:
    """Project-local ultralytics settings folder holding the font it would otherwise download."""
    return Path(os.environ.get("YOLO_CONFIG_DIR") or PROJECT_ROOT / ".yolo")


def ensure_yolo_font(config_dir: Path) -> Path:
    """Put a TTF at ``<config_dir>/Ultralytics/Arial.ttf`` so ultralytics never downloads one.

    Any TrueType font works (it is only used to draw labels on plots); the one matplotlib ships
    is always installed with the project.
    """
    target = config_dir / "Ultralytics" / "Arial.ttf"
    if not target.exists():
        import shutil

        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(font, tmp)
        tmp.replace(target)
    return target


def set_offline_env() -> None:
    """Environment switches that keep ultralytics, albumentations and the HF hub offline."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    cfg_dir = yolo_config_dir()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    ensure_yolo_font(cfg_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of training only
        return
    torch.manual_seed(seed)


def configure_runtime(seed: int | None = None, threads: int | None = None, log_level: str = "INFO") -> None:
    """Called once by each stage: logging, offline switches, thread counts, seeds."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format=LOG_FORMAT)
    set_offline_env()
    n = threads or int(os.environ.get("NUM_THREADS", 0)) or os.cpu_count() or 1
    try:
        import cv2

        cv2.setNumThreads(max(1, n))
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.set_num_threads(max(1, n))
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    except ImportError:  # pragma: no cover
        pass
    if seed is not None:
        seed_everything(seed)


# --------------------------------------------------------------------------- shared cores

_shared: dict[str, Any] = {}  # set only in worker processes of pipeline.train.parallel


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def share_cores(running: Any, cores: int) -> None:
    """Make this process one of several sharing ``cores``: ``running.value`` of them are busy.

    Called once in each worker process; :func:`balance_threads` then gives it
    ``cores // running.value`` threads (at least one).
    """
    _shared.update(running=running, cores=max(1, int(cores)))


def balance_threads() -> int:
    """Re-split the shared cores among the processes still running (no-op outside a worker).

    The training engine calls this before every epoch, so when the other folds have finished
    the last one goes on with every core. Returns the thread count now in use.
    """
    import torch

    if _shared:
        busy = max(1, int(_shared["running"].value))
        threads = max(1, _shared["cores"] // busy)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return torch.get_num_threads()
