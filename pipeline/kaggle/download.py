"""`make download`: a dataset's real data through the official kaggle CLI, unpacked safely and checked.

The dataset spec names its source (``kaggle_source``: a competition or a dataset). Steps:

1. a folder that already holds the dataset (``download.json`` from an earlier run, or a layout its
   scanner reads) is not fetched again; the phantom of `make data` or anything else is not overwritten;
2. ``kaggle competitions download -c <slug> -p <staging>`` or ``kaggle datasets download -d
   <owner/slug> -p <staging>`` (the CLI's own credentials: ``~/.kaggle/kaggle.json`` or
   ``KAGGLE_USERNAME``/``KAGGLE_KEY``); a failure becomes one line saying what to do;
3. the archive is unpacked into the staging folder: every member is checked first and one whose
   resolved path leaves the folder (``../``, an absolute path, a link) refuses the whole archive
   before anything is written (zip-slip); archives inside (the nerve competition ships
   ``train.zip``...) are unpacked the same way;
4. the dataset's train folder is found where the archive put it (LGG's ``kaggle_3m/`` may sit
   under ``lgg-mri-segmentation/``) and that level becomes the data folder;
5. the dataset's own scanner reads it (``load_split(root, "train")``); only then is it renamed into
   place with ``download.json``, and the archive deleted. A failed run leaves the staging folder,
   whose archive the next run reuses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import subprocess
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.datasets.base import DatasetSpec
from pipeline.errors import DataError, PipelineError
from pipeline.io import write_json
from pipeline.kaggle.bundle import kaggle_config_dir
from pipeline.kaggle.push import TOKEN_HELP, cli_pin, find_cli, find_credentials, interpreter_bin

log = logging.getLogger(__name__)

MARKER = "download.json"  # written into a data folder that `make download` completed
PHANTOM_MARKER = "dataset.json"  # what `make data` writes into its synthetic folders
NETWORK_SIGNS = (
    "max retries exceeded",
    "failed to resolve",
    "name or service not known",
    "temporary failure in name resolution",
    "nameresolutionerror",
    "network is unreachable",
    "connection refused",
    "connectionerror",
    "connecttimeout",
    "timed out",
    "no route to host",
)
AUTH_SIGNS = ("401", "authentication required", "invalid credentials", "unauthorized")


class DownloadError(PipelineError, RuntimeError):
    """The data could not be fetched, unpacked or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a dataset's real data lives on Kaggle."""

    kind: str  # competition | dataset
    slug: str  # uw-madison-gi-tract-image-segmentation | mateuszbuda/lgg-mri-segmentation

    @property
    def url(self) -> str:
        section = "competitions" if self.kind == "competition" else "datasets"
        return f"https://www.kaggle.com/{section}/{self.slug}"

    def command(self, cli: str, folder: Path) -> list[str]:
        if self.kind == "competition":
            return [cli, "competitions", "download", "-c", self.slug, "-p", str(folder)]
        return [cli, "datasets", "download", "-d", self.slug, "-p", str(folder)]


def source_of(spec: DatasetSpec) -> Source:
    kind, slug = spec.kaggle_source
    if kind not in ("competition", "dataset") or not slug:
        raise DownloadError(
            f"dataset '{spec.name}' names no Kaggle source (kaggle_source = {spec.kaggle_source})"
        )
    return Source(kind, slug)


# --------------------------------------------------------------------------- the CLI


def run_cli_download(source: Source, folder: Path, echo: Callable[[str], Any] | None = None) -> None:
    """Run the kaggle CLI's download into ``folder``; a failure raises a one-line DownloadError.

    The CLI's output is passed to ``echo`` as it comes (its progress bar), and read afterwards to
    tell missing credentials, unaccepted rules (403), no network and the rest apart.
    """
    cli = find_cli()
    if cli is None:
        raise DownloadError(
            f"the kaggle CLI is not installed (looked in PATH and {interpreter_bin()}): run "
            f"`{interpreter_bin() / 'python'} -m pip install {cli_pin()}` (`make install` does)"
        )
    if find_credentials() is None:
        token = kaggle_config_dir() / "kaggle.json"
        raise DownloadError(f"no Kaggle credentials: {TOKEN_HELP.format(path=token)}")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = source.command(cli, folder)
    log.info("$ %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as exc:
        raise DownloadError(f"cannot run {cli}: {exc}") from None
    tail, stream = "", proc.stdout
    assert stream is not None
    for chunk in iter(lambda: stream.read(256), ""):
        tail = (tail + chunk)[-20000:]
        if echo is not None:
            echo(chunk)
    if proc.wait() != 0:
        raise DownloadError(explain_failure(source, proc.returncode, tail))


def explain_failure(source: Source, code: int, output: str) -> str:
    """One line saying why the CLI failed and what to do, from its exit code and output."""
    text = output.lower()
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "no output")
    if "403" in text or "forbidden" in text:
        if source.kind == "competition":
            return (
                f"Kaggle answered 403 Forbidden for the competition {source.slug}: accept its rules first at "
                f"{source.url}/rules (signed in as the account of your credentials), then run `make download` again"
            )
        return f"Kaggle answered 403 Forbidden for the dataset {source.slug}: open {source.url} and check you can see it"
    if any(sign in text for sign in AUTH_SIGNS):
        where = find_credentials() or "your credentials"
        return f"Kaggle refused the credentials in {where} (401): " + TOKEN_HELP.format(
            path=kaggle_config_dir() / "kaggle.json"
        )
    if "404" in text or "not found" in text:
        return f"Kaggle has no {source.kind} {source.slug} (404): check the slug at {source.url}"
    if any(sign in text for sign in NETWORK_SIGNS):
        return (
            f"no network: the kaggle CLI could not reach Kaggle's API ({last[:200]}); connect and run again"
        )
    return f"`kaggle {source.kind}s download {source.slug}` failed (exit {code}): {last[:300]}"


# --------------------------------------------------------------------------- safe unpacking


def _member_problem(info: zipfile.ZipInfo, target: Path) -> str | None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        return "is an absolute path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    resolved = (target / path).resolve()
    if resolved != target and target not in resolved.parents:
        return "leaves the target folder"
    return None


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Unpack ``archive`` into ``target`` after checking every member; the files written.

    A member that would land outside ``target`` refuses the whole archive before anything is
    written (zip-slip); a truncated or damaged archive raises a DownloadError naming it.
    """
    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
            for info in infos:
                problem = _member_problem(info, target)
                if problem:
                    raise DownloadError(
                        f"{archive}: member '{info.filename}' {problem}; refusing the whole archive "
                        "(nothing was unpacked). Is this the Kaggle download?"
                    )
            target.mkdir(parents=True, exist_ok=True)
            for info in infos:
                zf.extract(info, target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise DownloadError(
            f"{archive} is a partial or damaged archive ({exc}): run `make download` again "
            f"(or delete {archive} first to fetch it whole)"
        ) from None
    return [target / i.filename for i in infos if not i.is_dir()]


def _inner_target(archive: Path, names: list[str]) -> Path:
    """Where an archive found inside the download goes: beside it when it holds one file or one
    folder named after it (``train.zip`` -> ``train/...``), else into a folder named after it."""
    stem = archive.name.removesuffix(".zip")
    files = [n for n in names if not n.endswith("/") and not n.startswith("__MACOSX/")]
    if len(files) == 1 or all(n.startswith(f"{stem}/") for n in files):
        return archive.parent
    return archive.parent / stem


def unpack(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into ``target``, then every ``*.zip`` it held, each checked as the first."""
    pending = [p for p in safe_extract(archive, target) if p.suffix == ".zip"]
    while pending:
        inner = pending.pop(0)
        try:
            with zipfile.ZipFile(inner) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{inner} (inside {archive.name}) is damaged ({exc})") from None
        pending += [p for p in safe_extract(inner, _inner_target(inner, names)) if p.suffix == ".zip"]
        inner.unlink()


def data_root(unpacked: Path, train_folder: str, depth: int = 3) -> Path:
    """The folder holding ``train_folder`` (the shallowest one), where the dataset's layout starts."""
    for level in range(depth + 1):
        found = sorted(p for p in unpacked.glob("/".join(["*"] * level + [train_folder])) if p.is_dir())
        if found:
            return found[0].parent
    tops = sorted(p.name for p in unpacked.iterdir()) if unpacked.is_dir() else []
    raise DownloadError(
        f"the download holds no '{train_folder}/' folder (top level: {', '.join(tops[:8]) or 'nothing'}): "
        "not the layout this dataset reads"
    )


# --------------------------------------------------------------------------- checking


def summary(spec: DatasetSpec, root: Path) -> dict[str, Any]:
    """Counts of what the dataset's scanner reads under ``root`` (train, and test when present)."""
    out: dict[str, Any] = {"dataset": spec.name, "title": spec.title, "root": str(root)}
    for split in ("train", "test"):
        catalog = spec.load_split(root, split) if split == "train" else spec.scan(root, split)
        if catalog.empty:
            continue
        row: dict[str, Any] = {
            "groups": int(catalog["group"].nunique()),
            "volumes": int(catalog["volume_id"].nunique()),
            "images": len(catalog),
        }
        if spec.has_labels(catalog):
            row["labelled"] = int(spec.presence(catalog).loc[catalog["id"]].to_numpy().any(axis=1).sum())
        sizes = catalog.groupby(["height", "width"]).size().sort_values(ascending=False)
        row["sizes"] = {f"{w}x{h}": int(n) for (h, w), n in sizes.head(4).items()}
        out[split] = row
    return out


def format_summary(info: dict[str, Any]) -> str:
    """The one-screen text of :func:`summary`."""
    lines = [f"{info['title']} in {info['root']}"]
    for split in ("train", "test"):
        row = info.get(split)
        if row is None:
            lines.append(f"  {split:5s}: no images")
            continue
        text = f"  {split:5s}: {row['groups']} groups, {row['volumes']} volumes, {row['images']} images"
        if "labelled" in row:
            text += f", {row['labelled']} with a label ({100 * row['labelled'] / row['images']:.1f}%)"
        sizes = ", ".join(f"{k} ({v})" for k, v in row["sizes"].items())
        lines.append(text + f"; sizes {sizes}")
    return "\n".join(lines)


def _check(spec: DatasetSpec, root: Path) -> dict[str, Any]:
    try:
        return summary(spec, root)
    except (DataError, ValueError, KeyError, OSError) as exc:
        raise DownloadError(f"{root} does not read as {spec.title}: {' '.join(str(exc).split())}") from None


def holds_dataset(spec: DatasetSpec, root: Path) -> bool:
    """Whether ``root`` already holds ``spec``'s real data (the phantom of `make data` does not count)."""
    if (root / MARKER).is_file():
        return True
    if (root / PHANTOM_MARKER).is_file() or not (root / spec.train_folder).is_dir():
        return False
    try:
        return not spec.load_split(root, "train").empty
    except (DataError, ValueError, KeyError, OSError):
        return False


# --------------------------------------------------------------------------- the stage


def download_dataset(
    spec: DatasetSpec, out: Path, force: bool = False, echo: Callable[[str], Any] | None = None
) -> tuple[dict[str, Any], bool]:
    """Fetch, unpack and check ``spec``'s real data into ``out``; (summary, fetched now?)."""
    out = Path(out)
    if not force and holds_dataset(spec, out):
        log.info("%s already holds %s: not fetched again (FORCE=1 to fetch it anyway)", out, spec.title)
        return _check(spec, out), False
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        what = "the synthetic phantom of `make data`" if (out / PHANTOM_MARKER).is_file() else "other files"
        raise DownloadError(
            f"{out} holds {what}, not a {spec.title} download: pick another folder "
            f"(`make download DATA_DIR=data/{spec.name}-kaggle`) or empty it first"
        )
    source = source_of(spec)
    staging = out.parent / f".{out.name}.download"
    archives = sorted(staging.glob("*.zip"))
    if not archives:
        run_cli_download(source, staging, echo)
        archives = sorted(staging.glob("*.zip"))
    if not archives:
        raise DownloadError(f"the kaggle CLI wrote no .zip archive into {staging}")
    unpacked = staging / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    for archive in archives:
        log.info("unpacking %s (%.1f MiB)", archive.name, archive.stat().st_size / 2**20)
        unpack(archive, unpacked)
    root = data_root(unpacked, spec.train_folder)
    info = {**_check(spec, root), "root": str(out)}
    if root != unpacked:
        top = unpacked / root.relative_to(unpacked).parts[0]
        left = sorted(p.name for p in unpacked.iterdir() if p != top)
        if left:
            log.info("left out of %s (beside the dataset's folder in the archive): %s", out, ", ".join(left))
    write_json(root / MARKER, {"source": dataclasses.asdict(source), "archives": [a.name for a in archives],
                               "summary": info})  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(root, out)
    shutil.rmtree(staging)
    return info, True
