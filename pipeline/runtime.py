"""Process-wide settings, applied once by each stage (never at import).

Sets the offline switches every dependency needs, the thread counts, seeds, and the optional pin of the
CPU kernels to one instruction set (``CPU_ISA``); describes the machine a run ran on (its fingerprint,
written into every run's ``config.yaml``). See docs/REPRODUCIBILITY.md.

numpy, torch and the other heavy libraries are imported inside the functions: :func:`pin_cpu_isa` must
be able to run before any of them loads its kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import random
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError
from pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # the optional tracker (pipeline/train/tracker.py) sends no usage data
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
    """The switches of :data:`OFFLINE_ENV` that keep every library offline (values already set are kept).

    Called by :func:`configure_runtime` and again by the model factories (timm, smp, huggingface-hub
    read them when they load), so a library used outside a stage stays offline too.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def set_yolo_config_dir() -> Path:
    """Point ultralytics at the project-local settings folder holding its font (it would download one)."""
    cfg_dir = yolo_config_dir()
    os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    ensure_yolo_font(cfg_dir)
    return cfg_dir


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of training only
        return
    torch.manual_seed(seed)


def configure_runtime(seed: int | None = None, threads: int | None = None, log_level: str = "INFO") -> None:
    """Called once by each stage: logging, offline switches, the CPU_ISA pin, thread counts, seeds."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format=LOG_FORMAT)
    set_offline_env()
    set_yolo_config_dir()
    pin_cpu_isa()
    n = threads or int(os.environ.get("NUM_THREADS", 0)) or available_cores()
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


# --------------------------------------------------------------------------- one instruction set

CPU_ISA_ENV = "CPU_ISA"
# What each library calls the pinned instruction set. ATen, oneDNN and MKL read theirs at their first
# kernel, numba at its first compile: after import is early enough. OpenBLAS (numpy's BLAS) reads its
# own when numpy loads: only a pin made before that (the `stages` package does it) reaches it.
CPU_ISA_PINS: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility, on the AVX2 code path
        "NUMBA_CPU_NAME": "x86-64-v3",
        "NUMBA_CPU_FEATURES": "",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "MKL_CBWR": "AVX512",
        "NUMBA_CPU_NAME": "x86-64-v4",
        "NUMBA_CPU_FEATURES": "",
        "OPENBLAS_CORETYPE": "SkylakeX",
    },
}
# /proc/cpuinfo flags a machine needs for each pin
CPU_ISA_FLAGS = {
    "avx2": ("avx2", "fma", "bmi2", "f16c"),
    "avx512": ("avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
}
OFF = ("", "off", "native", "none")
_blas_late: list[bool] = []  # set when a pin reached OPENBLAS_CORETYPE after numpy had loaded


def cpu_isa() -> str | None:
    """The instruction set ``$CPU_ISA`` pins the CPU kernels to; None when unset (each library picks its best)."""
    value = os.environ.get(CPU_ISA_ENV, "").strip().lower()
    return None if value in OFF else value


def pin_cpu_isa(strict: bool = True) -> dict[str, str]:
    """Set the environment that pins ATen, oneDNN, MKL, numba and OpenBLAS to ``$CPU_ISA``; what was set.

    A no-op without ``CPU_ISA``. ``strict`` (:func:`configure_runtime`): an unknown name or one this CPU
    lacks raises ConfigError, and a library that chose its kernels before the pin is reported; the early
    call of the ``stages`` package (before numpy loads) passes ``strict=False`` and leaves that to it.
    """
    isa = cpu_isa()
    if isa is None:
        return {}
    if isa not in CPU_ISA_PINS:
        if strict:
            raise ConfigError(f"CPU_ISA={isa}: unknown; valid: {', '.join(CPU_ISA_PINS)} (or unset)")
        return {}
    flags = _cpu_flags()
    missing = [f for f in CPU_ISA_FLAGS[isa] if f not in flags] if flags else []
    if missing:
        if strict:
            raise ConfigError(
                f"CPU_ISA={isa}, but this CPU lacks {', '.join(missing)}: pick a lower one or unset it"
            )
        return {}
    pins = CPU_ISA_PINS[isa]
    if os.environ.get("OPENBLAS_CORETYPE") != pins["OPENBLAS_CORETYPE"] and "numpy" in sys.modules:
        _blas_late.append(True)
    os.environ.update(pins)
    if "numba" in sys.modules:  # numba reads its target when it loads: read it again
        import numba

        numba.config.reload_config()
    if strict:
        _check_pinned(isa, bool(_blas_late))
    return dict(pins)


def _check_pinned(isa: str, blas_late: bool) -> None:
    """Warn when a library chose its kernels before the pin (it then keeps its own)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.lower() != CPU_ISA_PINS[isa]["ATEN_CPU_CAPABILITY"]:
        log.warning(
            "CPU_ISA=%s came after torch chose its %s kernels; set CPU_ISA before Python starts",
            isa,
            capability,
        )
    if blas_late:
        log.warning(
            "CPU_ISA=%s came after numpy loaded OpenBLAS, which keeps its own kernels; run stages as "
            "`python -m stages.<name>` (or `make ... CPU_ISA=%s`), which pin it first",
            isa,
            isa,
        )


# --------------------------------------------------------------------------- the machine's fingerprint

SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:  # pragma: no cover - not Linux
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def _cpu_flags() -> list[str]:
    return _cpuinfo().get("flags", "").split()


def _caches() -> dict[str, str]:
    """Cache sizes of CPU 0 (oneDNN picks its blocking from them): {"L1d": "48K", "L2": ..., "L3": ...}."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / n).read_text().strip() for n in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            out[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return out


def _build_versions(config_text: str) -> dict[str, str]:
    """oneDNN and MKL versions from ``torch.__config__.show()``."""
    found = {
        "onednn": re.search(r"MKL-DNN v([\w.]+)", config_text),
        "mkl": re.search(r"Math Kernel Library Version ([\w.]+)", config_text),
    }
    return {k: m.group(1) for k, m in found.items() if m}


def _blas() -> str | None:
    """numpy's BLAS as threadpoolctl sees it: ``openblas 0.3.31 SkylakeX``."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return None
    for info in threadpool_info():
        if info.get("user_api") == "blas" and "numpy" in str(info.get("filepath", "")) + str(
            info.get("prefix")
        ):
            return " ".join(
                str(info.get(k) or "") for k in ("internal_api", "version", "architecture")
            ).strip()
    return None


def machine_fingerprint() -> dict[str, Any]:
    """What decides the CPU kernels a run used: CPU model and instruction sets, caches, thread counts,
    the kernel libraries' versions and choices, and the ``CPU_ISA`` pin (None: off).

    Plain YAML-able values. Comparing two runs' fingerprints tells whether a score difference can come
    from the machine (docs/REPRODUCIBILITY.md).
    """
    import cv2
    import numba
    import numpy as np
    import torch

    info, flags = _cpuinfo(), _cpu_flags()
    numba_config: Any = numba.config  # its settings are set at import, out of the type stubs' sight
    n_gpus = torch.cuda.device_count()  # names only where CUDA is already up: never start it here
    gpus = [torch.cuda.get_device_name(i) for i in range(n_gpus)] if torch.cuda.is_initialized() else n_gpus
    return {
        "cpu": info.get("model name", platform.processor() or platform.machine()),
        "cpu_id": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "isa": [f for f in SIMD_FLAGS if f in flags],
        "flags_sha1": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12],
        "caches": _caches(),
        "cores": {"machine": os.cpu_count(), "usable": available_cores()},
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "numba": int(numba_config.NUMBA_NUM_THREADS),
            "opencv": cv2.getNumThreads(),
            **{
                k: os.environ[k]
                for k in ("NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if k in os.environ
            },
        },
        "kernels": {
            "aten": torch.backends.cpu.get_cpu_capability(),
            "numba_cpu": numba_config.CPU_NAME or _host_cpu_name(),
            "blas": _blas(),
            "opencv": cv2.getCPUFeaturesLine(),
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": str(torch.__version__),
            **_build_versions(torch.__config__.show()),
            "numba": numba.__version__,
            "opencv": cv2.__version__,
            "cuda": torch.version.cuda and str(torch.version.cuda),
        },
        "gpus": gpus,
        "cpu_isa": cpu_isa(),
    }


def _host_cpu_name() -> str:
    import llvmlite.binding

    return str(llvmlite.binding.get_host_cpu_name())


def record_machine(config_text: str) -> str:
    """A run's resolved config text with the machine's fingerprint appended as a top-level ``machine:``
    block (a record, not a setting: loading the config ignores it)."""
    block = yaml.safe_dump({"machine": machine_fingerprint()}, sort_keys=False, default_flow_style=None)
    return config_text + block


def machine_summary(fingerprint: dict[str, Any] | None = None) -> str:
    """One line of a fingerprint (default: this machine's) for a stage's output."""
    fp = fingerprint or machine_fingerprint()
    versions, kernels = fp["versions"], fp["kernels"]
    isa = next((f for f in ("amx_tile", "avx512f", "avx2", "avx", "sse4_2") if f in fp["isa"]), "baseline")
    return (
        f"{fp['cpu']} ({fp['cpu_id']}, up to {isa}, flags {fp['flags_sha1']}), {fp['threads']['torch']} torch "
        f"threads | torch {versions['torch']} ATen {kernels['aten']}, oneDNN {versions.get('onednn', '?')}, "
        f"MKL {versions.get('mkl', '?')}, BLAS {kernels['blas'] or '?'} | CPU_ISA {fp['cpu_isa'] or 'off'}"
    )
