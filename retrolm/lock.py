"""Advisory locks that keep two writers out of one database or run folder.

A writer holds `fcntl.flock` on the file `.retrolm.lock` inside the folder for as long as it
works there, and writes its pid, command line and start time into it (emptied on release; the
file itself stays, unless the folder holds nothing else). A second writer is refused
at once (`LockedError`, naming the holder) rather than made to wait: a build or a training run
can take hours, and a command that silently hangs looks like a bug. The kernel releases the lock
when the holder exits, however it exits (SIGKILL included), so a stale lock never needs deleting.

Locks are re-entrant within a process (a caller that holds a folder's lock may call a stage
that takes it again): the process keeps one open lock file per folder and a hold count. The
database build and `db add` take it through `retrolm.database.distributed.build_lock`, which
tells every rank of a refusal. Under
torchrun only rank 0 locks (the ranks of one job are one writer). Readers take no lock: every
file a writer replaces is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrolm.errors import LockedError, WriteError

LOCK_FILE = ".retrolm.lock"

# folder (resolved) -> [open lock file, hold count]; one process-wide table because flock
# locks belong to open files: a second open of the same file in this process would conflict
_held: dict[str, list[Any]] = {}


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']}: {info['command']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "folder") -> Iterator[Path]:
    """Hold the writer's lock of `folder` (created if missing) for the duration of the block.

    Args:
        folder: the database or run folder.
        what: how messages name it ("database", "run folder").

    Raises:
        LockedError: another process holds the lock; the message names it.
    """
    folder = Path(folder)
    if not _is_rank_zero():
        yield folder
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(
            f"cannot create the {what} {folder}: {e.strerror or e} ({e.filename}); choose "
            "another path"
        ) from e
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    path = folder / LOCK_FILE
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (kept open while held)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LockedError(
            f"the {what} {folder} is in use by another retrolm process ({_holder(path)}); "
            "wait for it to finish, or stop it, then rerun"
        ) from None
    except OSError:
        f.close()
        raise
    try:
        f.seek(0)
        f.truncate()
        info = {"pid": os.getpid(), "command": " ".join(sys.argv), "started": time.time()}
        f.write(json.dumps(info) + "\n")
        f.flush()
        _held[key] = [f, 1]
        yield folder
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()
            if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()  # the writer left nothing: leave no folder it made either
                if created:
                    folder.rmdir()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


# names that count as lock files: `LOCK_FILE`, and `.build.lock`, which distributed database
# builds of older retrolm versions leave in a folder (such a folder holds nothing but locks)
LOCK_FILES = (LOCK_FILE, ".build.lock")


def is_lock_file(path: Path) -> bool:
    return path.name in LOCK_FILES
