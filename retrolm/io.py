"""Atomic file writes and checksums, shared by the database and the training checkpoints.

Every artifact is written to a temporary file in the destination folder and then renamed over
the final name (`os.replace` is atomic on POSIX), so a process killed at any moment leaves
either the old file, the new file, or a stray `*.tmp-*` file that no reader ever opens.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrolm.errors import WriteError

TMP_MARK = ".tmp-"
CACHE_ENV = "RETROLM_CACHE"  # where derived files shared between runs are kept


def cache_root() -> Path:
    """`$RETROLM_CACHE`, else `$XDG_CACHE_HOME/retrolm`, else `~/.cache/retrolm`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "retrolm"


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is the operating system saying there is no room left for a write.

    numpy's `tofile` (behind `np.save`) reports a short write as a bare `OSError` without an
    errno ("N requested and M written"), so that message counts as well.
    """
    if not isinstance(e, OSError):
        return False
    if e.errno in DISK_FULL_ERRNOS:
        return True
    return e.errno is None and "requested and" in str(e) and "written" in str(e)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def existing_folder(path: str | os.PathLike[str]) -> Path:
    """The nearest folder on the way to `path` that exists (`path` itself if it is one)."""
    where = Path(path)
    while not where.is_dir() and where != where.parent:
        where = where.parent
    return where


def disk_full_error(path: str | os.PathLike[str], needed: int | None = None) -> WriteError:
    """The one-line error for a write to `path` that ran out of space: where, how much is free,
    how much the write needed (when known), and that a rerun resumes."""
    folder = existing_folder(Path(path).parent)
    try:
        free = f"{_mib(shutil.disk_usage(folder).free)} free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    need = f", {_mib(needed)} needed for this file" if needed else ""
    return WriteError(
        f"cannot write {path}: the disk is full ({free}{need}); free some space or choose "
        "another folder, then rerun the same command (finished work is kept)"
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`.

    On an exception the temporary file (or folder) is removed and `path` is left untouched; a
    full disk becomes a `WriteError` naming `path`, the free space and `needed` bytes if given.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=final.name + TMP_MARK, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if is_disk_full(e):
            raise disk_full_error(final, needed) from e
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces `path` only when closed without error."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it becomes `path`.

    An existing `path` is replaced only after the new folder is complete: it is first renamed
    aside, the new folder renamed in, and the old one deleted. A kill in between leaves at worst
    an `*.tmp-*` folder beside a complete `path` (or beside the old one), never a partial `path`.
    On an exception the temporary folder is removed and `path` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + TMP_MARK, dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=final.name + TMP_MARK + "old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(final) from e
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """Save `array` as .npy atomically and return the sha256 of the written file."""
    with atomic_path(path, needed=array.nbytes) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        digest = sha256_file(tmp)
    return digest


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remove_stale_tmp(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a killed writer in `folder` (not recursive). Returns count."""
    count = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        if TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            count += 1
    return count


def check_writable(path: str | os.PathLike[str], what: str = "--out") -> None:
    """Check, before any work, that a file or folder can be created at `path`.

    The nearest existing folder on the way to `path` must accept a new file (a temporary one is
    created and removed), so that a result is not computed only to be lost.

    Raises:
        WriteError: naming the path, the reason and what to do.
    """
    target = Path(path)
    if target.is_dir():
        where = target
    else:
        where = target.parent
        while not where.exists() and where != where.parent:
            where = where.parent
    if not where.is_dir():
        raise WriteError(f"cannot write {what} {path}: {where} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check" + TMP_MARK, dir=where)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise WriteError(
            f"cannot write {what} {path}: {e.strerror or e} ({where}); choose a folder you can "
            "write"
        ) from e


@contextlib.contextmanager
def write_guard(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a library's failure to write `path` (faiss and torch raise RuntimeError) into a
    `WriteError` that says what happened and what to do."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if not _is_write_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        folder = Path(path).parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise WriteError(
            f"cannot write {path} ({first}); the disk may be full ({free}) or the folder "
            "unwritable: free some space or choose another folder, then rerun (finished work "
            "is kept)"
        ) from e


def _is_write_failure(e: Exception) -> bool:
    """A RuntimeError (faiss, torch's zip writer) or a safetensors error raised by a writer."""
    return isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"


def allocate(path: str | os.PathLike[str], nbytes: int | None = None) -> None:
    """Reserve the disk blocks of `path` (its current size, or `nbytes`) before it is written
    through a memory map: a full disk is then a `WriteError` here instead of a SIGBUS that kills
    the process on the first page written. Filesystems without `fallocate` are left as they are.
    """
    size = os.path.getsize(path) if nbytes is None else nbytes
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, size) from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
