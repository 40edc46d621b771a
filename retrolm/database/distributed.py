"""Ranks for the database build: who does which block, barriers, one-time work, the build lock.

A database build runs as one process or as the ranks of a torch.distributed job (`torchrun
--nproc-per-node N -m retrolm db build ...`, or `retrolm db build --workers N`, which starts N
local ranks through torch's elastic launcher). The unit of work is a block; which rank does a
block is a pure function of its position and the world size (`retrolm.distributed.blocks_for_rank`), so timing never
changes who does what, and the block layout itself never depends on the world size: 1, 2 or 8
ranks write the same files.

Only the main rank writes `manifest.json`. The other ranks record each finished block in a small
file under `records/` (`write_record`), which the main rank folds into the manifest after a
barrier (`merge_records`); a killed launch leaves records that the next run folds in the same
way, so no finished block is lost or done twice.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from retrolm import errors
from retrolm.distributed import Dist
from retrolm.io import atomic_open

log = logging.getLogger(__name__)

T = TypeVar("T")

RECORDS = "records"
# a rank waits this long at a barrier for the others (index training on rank 0 can take hours)
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@contextmanager
def node_threads() -> Iterator[int]:
    """torch and faiss use the threads of all the local ranks (`LOCAL_WORLD_SIZE` x this rank's
    own, at most the cores) for the length of the block, and their own again after it: for work
    one rank does while the others on its node wait at a barrier (index training), which would
    otherwise leave their cores idle. Yields the thread count used."""
    import faiss
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    want = min(os.cpu_count() or 1, torch_threads * max(local, 1))
    if want <= torch_threads:
        yield torch_threads
        return
    torch.set_num_threads(want)
    faiss.omp_set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


def current() -> Dist:
    """The Dist of a torch.distributed job already initialised in this process, else one rank."""
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover - torch is a dependency
        return Dist()
    if td.is_available() and td.is_initialized():
        return Dist(
            td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", td.get_rank()))
        )
    return Dist()


@contextmanager
def session(device: str = "cpu") -> Iterator[Dist]:
    """Join the torch.distributed job described by the environment (`RANK`, `WORLD_SIZE`, ...,
    as torchrun sets them) for the length of the block; one rank when WORLD_SIZE is unset or 1.

    gloo for CPU work; nccl when the embedder runs on CUDA GPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or current().world_size > 1:
        yield current()
        return
    import torch
    import torch.distributed as td

    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    try:
        yield current()
    finally:
        td.destroy_process_group()


def launch_local(workers: int, argv: list[str]) -> int:
    """Run `python ARGV` (e.g. `-m retrolm db build ...`) as `workers` local ranks through torch's elastic launcher
    (what `torchrun --standalone --nproc-per-node WORKERS` does), and wait for them.

    Each rank gets `OMP_NUM_THREADS` = cores / workers unless it is set. A rank that fails stops
    the launch (the launcher ends the others); rerunning the command resumes.

    Returns:
        0, or the exit code of the first rank that failed.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    log.info("starting %d local ranks", workers)
    try:
        elastic_launch(config, entrypoint=sys.executable)(*argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if code != errors.UserError.exit_code:  # a user error was already reported
            print(
                f"error: rank {rank} of {workers} failed (exit code {failure.exitcode}) and the "
                "launch was stopped; rerun the same command to resume from the finished blocks",
                file=sys.stderr,
            )
        return code
    return 0


# ----------------------------------------------------------------------------- block records


def record_path(folder: Path, stage: str, block: int) -> Path:
    return folder / RECORDS / f"{stage}-{block:06d}.json"


def write_record(folder: Path, stage: str, block: int, entry: dict[str, Any]) -> None:
    """Record one finished block of `stage` (atomically) for the main rank to merge."""
    path = record_path(folder, stage, block)
    path.parent.mkdir(exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(entry, f)


def read_records(folder: Path, stage: str) -> dict[int, dict[str, Any]]:
    """The block records of `stage` left by ranks (this run's or a killed one's), by block."""
    out: dict[int, dict[str, Any]] = {}
    for path in sorted((folder / RECORDS).glob(f"{stage}-*.json")):
        try:
            out[int(path.stem.rsplit("-", 1)[1])] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable: the block is simply done again
    return out


def clear_records(folder: Path, stage: str) -> None:
    """Delete the records of `stage` (merged into the manifest), and the folder once empty."""
    for path in (folder / RECORDS).glob(f"{stage}-*.json"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other stages' records are still there
        (folder / RECORDS).rmdir()


# ----------------------------------------------------------------------------- the build lock


@contextmanager
def build_lock(folder: Path, dist: Dist, *, create: bool = True) -> Iterator[None]:
    """Hold the database folder's writer lock on the main rank for the whole build.

    It is `retrolm.lock.folder_lock` (the `.retrolm.lock` that `db add`, training and every
    other writer take), acquired through `Dist.on_main`, so a refusal reaches every rank with
    its message instead of leaving the others waiting at a barrier. The lock dies with its
    process, so a build killed by SIGKILL never leaves a stale lock behind. (flock is per
    host: on a shared filesystem across nodes only builds started from the same node are kept
    apart.)

    Args:
        folder: the database folder, created when `create` (a new build); a stage run on a
            folder that does not exist takes no lock and lets the stage report the error.

    Raises:
        LockedError: another process holds the lock (on every rank).
    """
    from retrolm.lock import folder_lock

    held = contextlib.ExitStack()

    def acquire() -> None:
        if create or folder.is_dir():
            held.enter_context(folder_lock(folder, "database"))

    with held:
        dist.on_main(acquire)
        yield
