"""Atomic writes (a file is either absent or complete, never half written), run-folder locks, and
``.npy`` / ``.npz`` reads that are safe in threads."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import RunLockedError

LOCK_FILE = ".lock"
# NumPy parses every .npy header with ast.literal_eval, and CPython 3.11 (ours: 3.11.7) raises a
# spurious "SystemError: AST constructor recursion depth mismatch" when two threads build an AST at
# the same time (python/cpython#106905): every header is parsed under this one lock
_NPY_HEADER_LOCK = threading.Lock()
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, frame: Any, **kwargs: Any) -> Path:
    """Write a pandas DataFrame atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(path)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Atomic write through any ``writer(tmp_path)`` (np.save, torch.save, fig.savefig...)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on a run folder while a process writes it.

    A second process asking for the same folder (``make train-seg`` started twice) stops at once
    with :class:`~pipeline.errors.RunLockedError` naming the folder and the process holding it.
    The lock is the kernel's (``flock``): a killed process releases it, no stale lock is left.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{folder} is being written by another process ({owner}); wait for it to finish or stop it "
            "(two runs writing one folder would mix their checkpoints)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode()
        )
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------- arrays in threads


def load_npy(path: str | os.PathLike, mmap_mode: Literal["r+", "r", "w+", "c"] | None = None) -> np.ndarray:
    """``np.load`` of one ``.npy`` file, safe in any thread (see ``_NPY_HEADER_LOCK``).

    The header is parsed under a process-wide lock; the data is memory-mapped (``mmap_mode``, an
    ``np.memmap`` as ``np.load`` gives) or read outside it. Object arrays (pickles) are refused.
    """
    with open(path, "rb") as fp:
        version = np.lib.format.read_magic(fp)
        reader = _HEADER_READERS.get(version)
        if reader is None:  # format 3.0 (non-latin-1 field names): numpy's own reader, all of it locked
            with _NPY_HEADER_LOCK:
                return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        with _NPY_HEADER_LOCK:
            shape, fortran_order, dtype = reader(fp)
        if dtype.hasobject:
            raise ValueError(f"{path}: holds Python objects; only plain arrays are read")
        order: Literal["C", "F"] = "F" if fortran_order else "C"
        if mmap_mode is not None:
            return np.memmap(path, dtype=dtype, mode=mmap_mode, shape=shape, order=order, offset=fp.tell())
        count = int(np.prod(shape, dtype=np.int64))
        data = np.fromfile(fp, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"{path}: truncated, {data.size} of {count} values of a {shape} array")
    return data.reshape(shape, order=order)


def load_npz(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` archive, safe in any thread.

    Each member's header sits inside its (compressed) stream, so the whole read holds the lock of
    :func:`load_npy`: keep it for archives read once (an OOF file decoded into its cache).
    """
    with _NPY_HEADER_LOCK, np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in keys}
