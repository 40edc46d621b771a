"""Indexes larger than memory: IVF shards merged into on-disk inverted lists, memory-mapped.

When even 8-byte codes of every train chunk would not fit `--index-memory`, `--index auto`
keeps only the trained parts of an IVF index in memory (the coarse centroids, the OPQ
rotation, the PQ codebooks) and puts the inverted lists in an `.ivfdata` file beside the index,
which searches memory-map (faiss `OnDiskInvertedLists`; the operating system pages in the
lists a query probes). The lists are filled as faiss contrib's `merge_ondisk` does: blocks of
codes are added to shards of bounded size, and the shards' lists merged, in block order, into
the on-disk lists; so the result equals the same index filled in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from retrolm.database import index as faiss_index
from retrolm.errors import InputError

log = logging.getLogger(__name__)

# product-quantizer bytes per vector of an on-disk index (on disk, so no need to skimp)
ONDISK_PQ_BYTES = 32


def choose_layout(num_vectors: int, dim: int, memory_budget_bytes: int) -> tuple[str, bool]:
    """The factory `--index auto` uses and whether its inverted lists live on disk.

    In memory whenever `choose_factory` finds an index that fits the budget; otherwise an
    `OPQ{M}_{D},{ivf},PQ{M}` index (`ivf` as `index.ivf_prefix` chooses the cells) whose lists
    are on disk (only its centroids and codebooks need memory).
    """
    try:
        return faiss_index.choose_factory(num_vectors, dim, memory_budget_bytes), False
    except InputError:
        if num_vectors <= 0 or dim <= 0:
            raise
    m = max(x for x in (ONDISK_PQ_BYTES, 16, 8, 4, 2, 1) if x <= dim)
    d_out = min(4 * m, dim - dim % m)
    nlist = faiss_index.ivf_nlist(num_vectors)
    trained_bytes = nlist * d_out * 4 + dim * d_out * 4
    if trained_bytes > memory_budget_bytes:
        raise InputError(
            f"even an on-disk index of {num_vectors} vectors needs {trained_bytes} bytes of "
            f"memory for its {nlist} centroids, but the memory budget is {memory_budget_bytes} "
            "bytes: raise --index-memory"
        )
    return f"OPQ{m}_{d_out},{faiss_index.ivf_prefix(num_vectors)},PQ{m}", True


def merge_blocks_ondisk(
    trained: faiss.Index,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    ivfdata_path: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    *,
    shard_bytes: int,
    load_trained: Callable[[], faiss.Index],
) -> faiss.Index:
    """Fill an on-disk IVF index from (codes, ids) blocks, in order.

    Args:
        trained: the trained, empty index; it is turned into the on-disk index and returned.
        blocks: `encode_block` codes with their global ids, in block order.
        ivfdata_path: where the inverted lists are written (its name is stored in the index,
            which is read back with `IO_FLAG_ONDISK_SAME_DIR`, so keep it beside the index).
        work_dir: folder for the temporary shards (removed as soon as they are merged).
        shard_bytes: codes per shard before it is written out (the memory this step needs).
        load_trained: a fresh copy of the trained, empty index for each shard.

    Returns:
        `trained`, now holding every block in its on-disk lists.
    """
    from faiss.contrib.ondisk import merge_ondisk

    if faiss.try_extract_index_ivf(trained) is None:
        raise InputError("on-disk inverted lists need an IVF index (e.g. 'IVF4096,PQ32')")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shard_files: list[str] = []
    shard, held = None, 0

    def flush() -> None:
        nonlocal shard, held
        if shard is not None and shard.ntotal:
            path = work / f"shard-{len(shard_files):05d}.faiss"
            faiss.write_index(shard, str(path))
            shard_files.append(str(path))
        shard, held = None, 0

    for codes, ids in blocks:
        if shard is None:
            shard = load_trained()
        faiss_index.add_encoded(shard, codes, ids)
        held += codes.nbytes
        if held >= shard_bytes:
            flush()
    flush()
    Path(ivfdata_path).unlink(missing_ok=True)
    if shard_files:
        merge_ondisk(trained, shard_files, str(ivfdata_path))
    else:  # no vectors: empty on-disk lists all the same, so that the index reads back alike
        ivf = faiss.extract_index_ivf(trained)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata_path))
        ivf.replace_invlists(lists, True)
        lists.this.disown()
    for path in shard_files:
        Path(path).unlink(missing_ok=True)
    log.info("on-disk index: %d vectors in %d shards merged", trained.ntotal, len(shard_files))
    return trained


def is_ondisk(index: faiss.Index) -> bool:
    """Whether `index` keeps its inverted lists in an on-disk (.ivfdata) file."""
    ivf = faiss.try_extract_index_ivf(faiss_index.unwrap(index))
    return ivf is not None and isinstance(
        faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists
    )
