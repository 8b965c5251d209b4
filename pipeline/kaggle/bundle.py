"""`make kernel`: everything an offline Kaggle script kernel needs to run `make submit`.

``build/kaggle/`` gets one folder per Kaggle dataset, each with its ``dataset-metadata.json``,
and the kernel folder:

- ``code/``: the ``pipeline`` and ``stages`` packages (sources only) and ``configs/`` holding
  the resolved ensemble, member, classifier and detector configs (self-contained: no ``base``);
- ``weights/runs/...``: the files inference loads from each needed run folder, laid out so
  that ``RUNS_DIR=<dataset>/runs`` works unchanged; a member's ``config.yaml`` goes with its
  starting weights spent (:func:`spent`: the checkpoint holds every weight), so the kernel needs
  no weights cache (`make weights`);
- ``wheels/``: the pinned wheels the Kaggle image lacks and ``manifest.json`` saying which;
- ``kernel/``: ``kernel-metadata.json`` and the entry script ``kernels/kaggle_submit.py``
  with its ``SETTINGS`` block filled in (dataset slugs, ensemble name, build id).

``code/BUNDLE.json`` and ``weights/BUNDLE.json`` carry the build id the entry script expects,
so a kernel that runs against a stale dataset version fails with a message saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pprint
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ClsConfig, Config, EnsembleConfig, SegConfig, dump_config, load_config
from pipeline.datasets.base import DatasetSpec
from pipeline.errors import PipelineError
from pipeline.infer.ensemble import run_name
from pipeline.infer.postprocess import DecisionsError, read_decisions
from pipeline.infer.submit import crop_key
from pipeline.io import write_json, write_text
from pipeline.kaggle.wheels import DEFAULT_CACHE, WheelSet, collect_wheels, copy_wheels
from pipeline.paths import PROJECT_ROOT, run_dir, runs_dir

log = logging.getLogger(__name__)

PLACEHOLDER_USER = "your-kaggle-user"
DEFAULT_PREFIX = "gi-tract"
DEFAULT_OUT = PROJECT_ROOT / "build" / "kaggle"
ENTRY_TEMPLATE = PROJECT_ROOT / "kernels" / "kaggle_submit.py"
METADATA_TEMPLATE = PROJECT_ROOT / "kernels" / "kernel-metadata.template.json"
CODE_PACKAGES = ("pipeline", "stages")
LICENSES = [{"name": "CC0-1.0"}]
SETTINGS_RE = re.compile(r"^# --- settings.*?^# --- end settings ---$", re.MULTILINE | re.DOTALL)
# Run-folder files inference loads (required) and small ones that travel along when present.
MEMBER_FILES = ("best.pt", "config.yaml")
DET_FILES = ("weights.pt", "config.yaml", "model.yaml")
DET_OPTIONAL = ("boxes_train.csv",)


class BundleError(PipelineError, ValueError):
    """Something the kernel needs is missing; the message names the file and the make target."""


@dataclasses.dataclass(frozen=True)
class KaggleNames:
    """Owner and slugs of the three datasets and the kernel (slug = title, as Kaggle wants)."""

    user: str
    prefix: str = DEFAULT_PREFIX

    def slug(self, part: str) -> str:
        return f"{self.prefix}-{part}"

    def ref(self, part: str) -> str:
        return f"{self.user}/{self.slug(part)}"

    @property
    def datasets(self) -> dict[str, str]:
        """Bundle folder -> dataset slug."""
        return {part: self.slug(part) for part in ("code", "weights", "wheels")}


@dataclasses.dataclass
class Bundle:
    """What `build_bundle` wrote: the folders and the facts the entry script was given."""

    root: Path
    names: KaggleNames
    build_id: str
    run_files: list[Path] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def folder(self, part: str) -> Path:
        return self.root / part

    def sizes(self) -> dict[str, int]:
        """Bytes per bundle folder."""
        return {
            part: sum(p.stat().st_size for p in self.folder(part).rglob("*") if p.is_file())
            for part in ("code", "weights", "wheels", "kernel")
        }


# --------------------------------------------------------------------------- user name


def kaggle_config_dir() -> Path:
    """Where the kaggle CLI keeps ``kaggle.json``: ``$KAGGLE_CONFIG_DIR`` or ``~/.kaggle``."""
    value = os.environ.get("KAGGLE_CONFIG_DIR", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".kaggle"


def resolve_user(explicit: str | None = None) -> str | None:
    """``--user``, else ``$KAGGLE_USER``, else ``$KAGGLE_USERNAME``, else kaggle.json's username."""
    for value in (explicit, os.environ.get("KAGGLE_USER"), os.environ.get("KAGGLE_USERNAME")):
        if value and value.strip():
            return value.strip()
    token = kaggle_config_dir() / "kaggle.json"
    if not token.is_file():
        return None
    try:
        name = json.loads(token.read_text()).get("username")
    except (ValueError, AttributeError):
        log.warning("%s is not a JSON object with a 'username': ignoring it", token)
        return None
    return str(name).strip() if name and str(name).strip() else None


# --------------------------------------------------------------------------- what to ship


def _require(folder: Path, names: tuple[str, ...], target: str) -> list[Path]:
    missing = [folder / n for n in names if not (folder / n).is_file()]
    if missing:
        raise BundleError(f"{', '.join(map(str, missing))} not found: run `{target}` first")
    return [folder / n for n in names]


def needed_run_files(cfg: EnsembleConfig) -> tuple[list[Path], dict[str, Any]]:
    """The run files `make submit` loads for ``cfg``, and the configs it names ({name: config}).

    The same choices as :class:`pipeline.infer.submit.EnsemblePredictor`: the segmenter folds
    of ``postprocess.json`` with a blend weight above 0, the classifier folds when a class is
    gated, and the detector each of them crops with.
    """
    tuned = run_dir("ensemble", cfg.name) / "postprocess.json"
    files = _require(tuned.parent, (tuned.name,), f"make tune ENSEMBLE=configs/{cfg.name}.yaml")
    try:
        decisions = read_decisions(cfg.name)
    except DecisionsError as exc:
        raise BundleError(str(exc)) from None
    configs: dict[str, Any] = {cfg.name: _portable(cfg)}
    loaded: list[
        tuple[Literal["seg", "cls"], str, int]
    ] = []  # (stage, name, fold) of every network submit loads
    for member in decisions.members:
        if member["config"] in decisions.used_members():
            loaded += [("seg", member["config"], fold) for fold in member["folds"]]
    if decisions.classifier and any(p.gate_threshold > 0 for p in decisions.params()):
        loaded += [("cls", decisions.classifier["config"], fold) for fold in decisions.classifier["folds"]]
    detectors = set()
    for stage, name, fold in loaded:
        folder = run_dir(stage, name, fold)
        target = (
            f"make train-{stage} CONFIG{'_CLS' if stage == 'cls' else ''}=configs/{name}.yaml FOLDS={fold}"
        )
        files += _require(folder, MEMBER_FILES, target)
        trained = load_config(folder / "config.yaml", stage=stage)
        configs.setdefault(name, spent(trained))
        detectors.add(crop_key(trained.data, cfg.det_config))
    for det in sorted(d for d in detectors if d is not None):
        name = run_name(det)
        folder = run_dir("det", name)
        files += _require(folder, DET_FILES, f"make train-det CONFIG_DET=configs/{name}.yaml")
        files += [folder / n for n in DET_OPTIONAL if (folder / n).is_file()]
        configs[name] = load_config(folder / "config.yaml", stage="det")
    return files, configs


def spent(cfg: Config) -> Config:
    """A trained member's config as inference rebuilds it: no starting weights (``encoder_weights``,
    ``pretrained_path``) and nothing frozen, since its checkpoint holds every weight. Other configs
    are returned as they are."""
    if not isinstance(cfg, SegConfig | ClsConfig):
        return cfg
    model = dataclasses.replace(cfg.model, encoder_weights=None, pretrained_path=None, freeze_encoder=0)
    return dataclasses.replace(cfg, model=model)


def _ship(src: Path, dst: Path) -> Path:
    """Copy a run file into the bundle; a member's ``config.yaml`` goes as :func:`spent` writes it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = src.relative_to(runs_dir()).parts[0]
    if src.name == "config.yaml" and stage in ("seg", "cls"):
        return write_text(dst, dump_config(spent(load_config(src, stage=stage))))
    return Path(shutil.copy2(src, dst))


def _portable(cfg: EnsembleConfig) -> EnsembleConfig:
    """The ensemble config with members, classifier and detector named by bare config name."""
    members = tuple(dataclasses.replace(m, config=run_name(m.config)) for m in cfg.members)
    classifier = run_name(cfg.classifier) if cfg.classifier else None
    det = run_name(cfg.det_config) if cfg.det_config else None
    return dataclasses.replace(cfg, members=members, classifier=classifier, det_config=det, data_dir=None)


# --------------------------------------------------------------------------- writers


def _copy_sources(src: Path, dst: Path) -> list[Path]:
    """A package's files without caches or compiled leftovers."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".ruff_cache")
    shutil.copytree(src, dst, ignore=skip)
    return [p for p in dst.rglob("*") if p.is_file()]


def _digest(files: list[Path], root: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        sha.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


def dataset_metadata(names: KaggleNames, part: str, description: str) -> dict[str, Any]:
    return {
        "title": names.slug(part),
        "id": names.ref(part),
        "licenses": LICENSES,
        "description": description,
    }


def data_input(spec: DatasetSpec) -> str:
    """The folder the dataset's Kaggle data is mounted as under /kaggle/input (the slug's last part)."""
    return spec.kaggle_source[1].split("/")[-1]


def kernel_metadata(
    names: KaggleNames, code_file: str, spec: DatasetSpec, template: Path = METADATA_TEMPLATE
) -> dict[str, Any]:
    """kernel-metadata.json: the build's three datasets plus the real data (a competition or a dataset)."""
    kind, slug = spec.kaggle_source
    meta = json.loads(template.read_text())
    meta.update(
        id=names.ref("submit"),
        title=names.slug("submit"),
        code_file=code_file,
        dataset_sources=[names.ref(part) for part in names.datasets] + ([slug] if kind == "dataset" else []),
        competition_sources=[slug] if kind == "competition" else [],
    )
    return meta


def render_entry(settings: dict[str, Any], template: Path = ENTRY_TEMPLATE) -> str:
    """The entry script with its ``# --- settings`` block replaced by ``settings``."""
    text = template.read_text()
    if not SETTINGS_RE.search(text):
        raise BundleError(f"{template} has no '# --- settings ... # --- end settings ---' block")
    block = (
        "# --- settings: written by `make kernel` (pipeline/kaggle/bundle.py) ---\n"
        f"SETTINGS = {pprint.pformat(settings, sort_dicts=False)}\n"
        "# --- end settings ---"
    )
    return SETTINGS_RE.sub(lambda _: block, text, count=1)


def _names(user: str | None, prefix: str) -> KaggleNames:
    """The owner and slugs; without a user name, a placeholder owner (push refuses it) and a warning."""
    if user is None:
        log.warning(
            "no Kaggle user name (--user, KAGGLE_USER, KAGGLE_USERNAME or ~/.kaggle/kaggle.json): "
            "the metadata uses the placeholder '%s'; set one before `make kernel-push`",
            PLACEHOLDER_USER,
        )
    return KaggleNames(user or PLACEHOLDER_USER, prefix)


def _write_code(code: Path, configs: dict[str, Any]) -> list[Path]:
    """The code dataset: the packages' sources, the resolved configs and requirements.txt."""
    files = [f for pkg in CODE_PACKAGES for f in _copy_sources(PROJECT_ROOT / pkg, code / pkg)]
    for name, config in configs.items():
        files.append(write_text(code / "configs" / f"{name}.yaml", dump_config(config)))
    files.append(Path(shutil.copy2(PROJECT_ROOT / "requirements.txt", code / "requirements.txt")))
    return files


def _write_weights(weights: Path, run_files: list[Path], cfg: EnsembleConfig) -> list[Path]:
    """The weights dataset: the run files under ``runs/`` as RUNS_DIR lays them out, and the ensemble config."""
    root = runs_dir()
    copied = [_ship(src, weights / "runs" / src.relative_to(root)) for src in run_files]
    ensemble_yaml = weights / "runs" / "ensemble" / cfg.name / "config.yaml"
    copied.append(write_text(ensemble_yaml, dump_config(_portable(cfg))))
    return copied


def _write_wheels(folder: Path, wheels: WheelSet, names: KaggleNames) -> None:
    copy_wheels(wheels, folder)
    write_json(folder / "manifest.json", wheels.manifest())
    write_json(folder / "dataset-metadata.json", dataset_metadata(names, "wheels", "Pinned wheels, offline."))


def build_bundle(
    cfg: EnsembleConfig,
    spec: DatasetSpec,
    out: Path = DEFAULT_OUT,
    *,
    user: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    wheels_from: Path | None = None,
    wheels_cache: Path = DEFAULT_CACHE,
    debug_train_volumes: int = 0,
    wheels: WheelSet | None = None,
) -> Bundle:
    """Write the code, weights and wheels datasets and the kernel folder under ``out``.

    ``spec`` is the ensemble's dataset (its Kaggle source is the kernel's data input). The folder is
    assembled beside ``out`` and swapped in at the end, so a failed build leaves the previous bundle
    untouched. ``user`` None uses a placeholder owner (push refuses it).
    """
    names = _names(user, prefix)
    run_files, configs = needed_run_files(cfg)
    wheels = wheels or collect_wheels(wheels_from, wheels_cache)
    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    code, weights = staging / "code", staging / "weights"
    code_files = _write_code(code, configs)
    copied = _write_weights(weights, run_files, cfg)
    build_id = _digest(code_files, code) + _digest(copied, weights)[:8]
    stamp = {
        "build_id": build_id,
        "ensemble": cfg.name,
        "runs": [p.relative_to(runs_dir()).as_posix() for p in run_files],
    }
    for part, description in (
        ("code", "Pipeline source for the kernel."),
        ("weights", "Trained runs/ for the kernel."),
    ):
        write_json(staging / part / "BUNDLE.json", stamp)
        write_json(staging / part / "dataset-metadata.json", dataset_metadata(names, part, description))
    _write_wheels(staging / "wheels", wheels, names)

    settings = {
        "dataset": cfg.dataset,
        "data_input": data_input(spec),
        "datasets": names.datasets,
        "ensemble": cfg.name,
        "build_id": build_id,
        "debug_train_volumes": int(debug_train_volumes),
        "packages": wheels.packages,
    }
    write_text(staging / "kernel" / ENTRY_TEMPLATE.name, render_entry(settings))
    write_json(staging / "kernel" / "kernel-metadata.json", kernel_metadata(names, ENTRY_TEMPLATE.name, spec))
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return Bundle(out, names, build_id, run_files, settings)
