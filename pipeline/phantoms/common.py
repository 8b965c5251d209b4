"""Writing a synthetic dataset folder: atomically, and never over real data.

Every embedded phantom (:mod:`pipeline.phantoms.uwmgi`, :mod:`pipeline.phantoms.lgg`,
:mod:`pipeline.phantoms.nerve`) writes through :func:`write_dataset_folder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import cv2
from tqdm.auto import tqdm

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class SyntheticDataError(PipelineError, ValueError):
    """The output folder holds something this generator must not overwrite."""


Job = TypeVar("Job")
Result = TypeVar("Result")


def init_worker() -> None:
    """Pool initializer of phantom writers: one OpenCV thread per worker process."""
    cv2.setNumThreads(1)  # one process per core already


def run_jobs(
    write: Callable[[Job], Result], jobs: Sequence[Job], workers: int, desc: str, unit: str = "it"
) -> Iterator[Result]:
    """``write(job)`` for every job in order, in ``workers`` spawned processes (1: in this one), with a
    progress bar. The writers' one job loop: results come back in job order, so the same seed gives the
    same folder whatever the worker count."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(workers, initializer=init_worker) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(write, jobs) if pool else map(write, jobs)
        yield from tqdm(results, total=len(jobs), desc=desc, unit=unit)


def write_dataset_folder(
    out_dir: Path | str,
    spec: dict,
    write: Callable[[Path], dict],
    force: bool = False,
    what: str = "synthetic dataset",
) -> dict:
    """Write a generated dataset folder atomically and return its statistics.

    ``write(tmp)`` fills a temporary sibling folder and returns the statistics; it must write
    ``dataset.json`` holding ``{"spec": spec, "stats": ...}``. The folder is renamed into place
    only when ``write`` succeeded. An ``out_dir`` already holding the same ``spec`` is kept as is;
    one made with another spec is replaced only with ``force``; a non-empty folder without
    ``dataset.json`` (real data, say) never is.
    """
    out = Path(out_dir)
    meta_path = out / "dataset.json"
    if out.is_dir() and any(out.iterdir()):
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is None:
            raise SyntheticDataError(
                f"{out} is not empty and holds no dataset.json, so it is not a {what}; "
                "refusing to replace it (even with --force). Pick another --out or remove it yourself."
            )
        if meta.get("spec") == spec:
            log.info("%s already holds this %s (%s): nothing to do", out, what, spec.get("name"))
            return meta["stats"]
        if not force:
            old = meta.get("spec", {})
            raise SyntheticDataError(
                f"{out} holds a {what} made with preset '{old.get('name')}' seed {old.get('seed')} "
                f"(generator {old.get('generator')}), not '{spec.get('name')}' seed {spec.get('seed')}; "
                "pass --force to replace it"
            )
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        stats = write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


Preset = TypeVar("Preset")


def preset_spec(preset: Any, seed: int, generator: int, **head: str) -> dict:
    """What a phantom folder was made with (``dataset.json``'s ``spec``): ``head``, the generator version,
    the seed and the preset's fields, as JSON reads them back (tuples become lists), so that a folder
    made with the same settings compares equal."""
    return json.loads(
        json.dumps({**head, "generator": generator, "seed": seed, **dataclasses.asdict(preset)})
    )


def resolve_preset(preset: str | Preset, presets: Mapping[str, Preset]) -> Preset:
    """A preset given by name (from ``presets``) or as itself; an unknown name lists the valid ones."""
    if isinstance(preset, str):
        if preset not in presets:
            raise SyntheticDataError(f"unknown preset '{preset}'; valid presets: {', '.join(presets)}")
        return presets[preset]
    return preset
