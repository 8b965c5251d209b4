"""The body detector: the project's one adapter around ultralytics YOLO.

A single-class ("body") YOLO is built from a model YAML with every online feature off and trained on
slices labelled by their own threshold boxes (:mod:`pipeline.models.yolo_data`): from scratch, or
(``det.pretrained: coco``) from ultralytics' COCO checkpoint of that size, which `make weights` turned
into a plain state dict in the local weights cache (:func:`fetch_yolo_state`, the one place a ``.pt``
is downloaded and read, by ultralytics itself); training never reads a ``.pt``.
The best weights are exported as a plain state dict (``weights.pt``, loaded with
``weights_only=True``) next to the architecture (``model.yaml``); :func:`build_yolo` rebuilds the
net with ``YOLO(model.yaml)`` and loads that state dict. At inference a volume
gets one box (:mod:`pipeline.models.detector_boxes`).

ultralytics is imported inside functions only, after :func:`pipeline.runtime.set_offline_env` and
:func:`pipeline.runtime.set_yolo_config_dir`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import CONFIG_DIR, ConfigError, DetParams
from pipeline.data.boxes import boxes_path, load_boxes, write_boxes
from pipeline.io import write_text, write_with
from pipeline.models.weights import WeightsError, WeightsRequest, load_cached
from pipeline.models.weights import cached_file as cached_weights_file
from pipeline.models.yolo_data import CLASS_NAME
from pipeline.runtime import set_offline_env, set_yolo_config_dir

log = logging.getLogger(__name__)

__all__ = [  # load_boxes and write_boxes live with the other box helpers; they are part of this API
    "boxes_path",
    "build_yolo",
    "load_boxes",
    "train_yolo",
    "write_boxes",
]

WEIGHTS_FILE = "weights.pt"
ARCH_FILE = "model.yaml"
# train() arguments the adapter sets from det.* or itself; det.train_args may not override them.
# (amp: fp16 AMP runs a check that downloads a model, so the adapter picks bf16 or fp32 itself.)
RESERVED_TRAIN_ARGS = frozenset(
    {"model", "data", "imgsz", "epochs", "batch", "workers", "device", "seed", "project", "name"}
    | {"exist_ok", "resume", "pretrained", "mode", "task", "single_cls", "amp"}
)


# --------------------------------------------------------------------------- ultralytics access


# ultralytics settings that would log training elsewhere (integrations) or send usage events (sync)
YOLO_INTEGRATIONS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


def _ultralytics() -> Any:
    """Import ultralytics with the offline switches and the local font in place (order matters:
    ultralytics reads YOLO_OFFLINE and YOLO_CONFIG_DIR once, at import)."""
    set_offline_env()
    set_yolo_config_dir()
    import ultralytics
    from ultralytics.utils import SETTINGS

    # its logger integrations switch themselves on when their package is importable (MLflow is, for
    # train.tracker): training would write mlflow.db and mlruns/ into the working directory
    quiet = {key: False for key in YOLO_INTEGRATIONS if SETTINGS.get(key) is True}
    if quiet:
        SETTINGS.update(quiet)
    return ultralytics


def torch_device(device: str | None = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is kept."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def yolo_device(device: str) -> str:
    """A torch device string as ultralytics spells it (``cuda:1`` -> ``1``)."""
    if device.startswith("cuda"):
        return device.partition(":")[2] or "0"
    return device


def model_source(name: str) -> str:
    """``det.model`` as ultralytics takes it: a YAML file (a path, or one shipped under configs/)
    or the name of one bundled with ultralytics (``yolov8n.yaml``)."""
    if not name.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"det.model '{name}' must be a model YAML such as yolov8n.yaml: training reads no .pt file and "
            "no .pt weights are ever downloaded here (det.pretrained: coco starts it from the COCO weights "
            "that `make weights` put in the local cache)"
        )
    for candidate in (Path(name), CONFIG_DIR / name):
        if candidate.is_file():
            return str(candidate.resolve())
    return name


# --------------------------------------------------------------------------- pretrained start


def det_request(params: DetParams) -> WeightsRequest | None:
    """The weights-cache entry ``det.pretrained`` asks for: ultralytics' checkpoint of ``det.model``'s
    name and size (``yolov8n.yaml`` -> ``ultralytics/yolov8n.coco``); None when trained from scratch."""
    if not params.pretrained:
        return None
    name = Path(params.model).name.removesuffix(".yaml").removesuffix(".yml")
    return WeightsRequest("ultralytics", name, params.pretrained, "det.pretrained")


def check_pretrained(params: DetParams, config_name: str) -> None:
    """Refuse ``det.pretrained`` on a YAML of one's own, and missing or damaged cache entries."""
    request = det_request(params)
    if request is None:
        return
    if Path(params.model).name != params.model:
        raise ConfigError(
            f"det.pretrained: {params.pretrained} needs det.model to name one of ultralytics' own YAMLs "
            f"(yolov8n.yaml, yolov8s.yaml...), not the file '{params.model}'; or set det.pretrained to null"
        )
    cached_weights_file(request, command=f"make weights CONFIG_DET=configs/{config_name}.yaml")


def _yolo_from_state(yaml_name: str, state: dict[str, Any]) -> Any:
    """The net of ``YOLO(yaml_name)`` holding ``state``; every tensor of ``state`` must find its place."""
    _ultralytics()
    from ultralytics import YOLO

    net: Any = YOLO(yaml_name, task="detect").model
    own = net.state_dict()
    unfit = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if unfit:
        raise WeightsError(
            f"{len(unfit)} of {len(state)} pretrained tensors do not fit ultralytics' {yaml_name} "
            f"(first: {', '.join(unfit[:3])}): run `make weights FORCE=1` with this ultralytics version"
        )
    net.load_state_dict(state, strict=False)
    return net


def pretrained_net(params: DetParams) -> Any:
    """The COCO-pretrained net ``det.pretrained`` starts from, rebuilt from the verified cache entry."""
    request = det_request(params)
    if request is None:
        raise ValueError("det.pretrained is null: the detector trains from scratch")
    return _yolo_from_state(f"{request.name}.yaml", load_cached(request))


def transfer_weights(model: Any, net: Any) -> int:
    """Copy ``net``'s tensors into ``model`` where name and shape match; the number copied.

    Plain name-and-shape matching (ultralytics' ``intersect_dicts`` rule), not ``DetectionModel.load``,
    which rebuilds the class branch at the source's width: the trained net must stay what its
    ``model.yaml`` rebuilds. So the backbone, neck and box branch start from COCO, the class branch fresh.
    """
    own = model.state_dict()
    match = {k: v for k, v in net.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(match, strict=False)
    return len(match)


def pretrained_trainer(net: Any) -> type:
    """ultralytics' DetectionTrainer whose new model starts from ``net``'s weights (``train(trainer=...)``)."""
    _ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    class PretrainedTrainer(DetectionTrainer):
        transferred = 0

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
            self.transferred = transfer_weights(model, net)
            return model

    return PretrainedTrainer


def fetch_yolo_state(name: str, folder: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """`make weights` only: ultralytics downloads ``<name>.pt`` (its GitHub release asset) into
    ``folder`` and loads it itself; returned as (plain state dict, source, meta), checked to fit
    ``<name>.yaml``. Needs the network and YOLO_OFFLINE unset."""
    _ultralytics()
    from ultralytics import YOLO, __version__

    net: Any = YOLO(str(Path(folder) / f"{name}.pt"), task="detect").model
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    _yolo_from_state(f"{name}.yaml", state)
    source = f"github.com/ultralytics/assets releases: {name}.pt (ultralytics {__version__})"
    return state, source, {"classes": len(net.names), "yaml": f"{name}.yaml"}


def check_train_args(extra: dict[str, Any]) -> None:
    """Reject unknown or adapter-owned keys of ``det.train_args`` before any work starts."""
    _ultralytics()
    from ultralytics.utils import DEFAULT_CFG_DICT

    for key in extra:
        if key in RESERVED_TRAIN_ARGS:
            raise ConfigError(
                f"det.train_args.{key} is set by the detector adapter; use det.{key} if it exists"
            )
        if key not in DEFAULT_CFG_DICT:
            close = difflib.get_close_matches(key, list(DEFAULT_CFG_DICT), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"det.train_args.{key} is not an ultralytics train argument{hint}")


class _DropLogLines(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _without_log_lines(logger: logging.Logger, text: str) -> Iterator[None]:
    drop = _DropLogLines(text)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def arch_yaml(net: Any) -> str:
    """A trained net's architecture as a model YAML that ``YOLO(path)`` rebuilds under any file name.

    ultralytics reads the model scale (n/s/m/l/x) from the YAML's file name, which ``model.yaml``
    does not carry, so ``scales`` is cut down to the one row that was trained.
    """
    arch = copy.deepcopy(net.yaml)
    scale = arch.pop("scale", "")
    arch.pop("yaml_file", None)
    scales = arch.get("scales")
    if scales:
        scale = scale or next(iter(scales))  # the row parse_model takes when no scale is named
        arch["scales"] = {scale: scales[scale]}
    return yaml.safe_dump(arch, sort_keys=False)


def build_yolo(arch_path: Path, state: dict[str, Any]) -> Any:
    """``YOLO(model.yaml)`` with a plain state dict loaded into it (strict: the shapes must match)."""
    _ultralytics()
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    with _without_log_lines(LOGGER, "no model scale passed"):  # the one scale row of arch_yaml
        yolo = YOLO(str(arch_path), task="detect")
    net: Any = yolo.model  # the DetectionModel (ultralytics types it loosely)
    net.load_state_dict(state, strict=True)
    net.names = {0: CLASS_NAME}
    net.eval()
    return yolo


def train_yolo(data_yaml: Path, params: DetParams, project: Path) -> tuple[Any, dict[str, float]]:
    """``YOLO(model yaml).train(...)`` into ``project/train``; returns (best net, its val metrics).

    With ``det.pretrained`` the trainer's new model first takes the cached COCO weights
    (:func:`pretrained_trainer`; ``pretrained_tensors`` in the metrics counts them). The net is the one
    ultralytics holds after training (its best checkpoint, which it reloads itself); this code never
    unpickles an ultralytics ``.pt`` file.
    """
    _ultralytics()
    import torch
    from ultralytics import YOLO

    device = torch_device(params.device)
    # fp16 AMP runs a check that downloads a model; bf16 skips it, CPU trains in fp32.
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)  # not a T4
    amp: str | bool = "bf16" if bf16 else False
    args = {
        "data": str(data_yaml),
        "imgsz": params.imgsz,
        "epochs": params.epochs,
        "batch": params.batch,
        "workers": params.workers,
        "device": yolo_device(device),
        "seed": params.seed,
        "project": str(project.resolve()),
        "name": "train",
        "exist_ok": True,
        "pretrained": False,
        "single_cls": True,
        "amp": amp,
        "plots": False,  # plots need only the local font, but cost time
        "verbose": False,
        **params.train_args,
    }
    yolo = YOLO(model_source(params.model), task="detect")
    trainer = pretrained_trainer(pretrained_net(params)) if params.pretrained else None
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        yolo.train(trainer=trainer, **args)
    finally:  # ultralytics switches deterministic algorithms on process-wide
        torch.use_deterministic_algorithms(deterministic)
    results: dict[str, Any] = yolo.metrics.results_dict if yolo.metrics is not None else {}
    metrics = {k: float(v) for k, v in results.items()}
    metrics["pretrained_tensors"] = float(getattr(yolo.trainer, "transferred", 0))
    return yolo.model, metrics


def save_weights(out: Path, net: Any, params: DetParams) -> Path:
    """Export a trained net as ``weights.pt`` (plain fp32 tensors, ``weights_only``-loadable) and
    ``model.yaml`` (its architecture)."""
    import torch

    _ultralytics()
    from ultralytics import __version__

    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in net.state_dict().items()
    }
    payload = {"model": state, "imgsz": params.imgsz, "ultralytics": __version__}
    write_text(out / ARCH_FILE, arch_yaml(net))
    return write_with(out / WEIGHTS_FILE, lambda p: torch.save(payload, p))
