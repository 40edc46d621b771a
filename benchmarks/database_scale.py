"""The index and neighbour stages of `retrolm db build` at scale, on synthetic embeddings.

    python benchmarks/database_scale.py --chunks 1000000 --out /tmp/scale [--workers 2] [--json]

Seeded, clustered, normalised embeddings (documents of 8 consecutive chunks on one topic, a
topic per 256 chunks, noise 1.5x the centres' scale; so the same-document exclusion has work to
do and the nearest other documents are the ~31 others of the topic) are generated block by block on the fly, never all at
once, and go through the functions `db build` calls for its index and neighbour stages:
`choose_layout` (in memory or on-disk lists), `build_index` on a seeded sample,
`encode_with_cells` per rank (codes, and each chunk's nearest cells kept for its search),
`add_encoded` in block order (or `merge_blocks_ondisk`), `choose_search_params`, and per rank
`search_excluding_documents` against the memory-mapped index with the kept cells
(from a cold page cache for the run's files; then the sampled blocks again, warm, each
block timed, --warm-passes times; with
--compare-cells, once more with the cells found afresh). A run stopped before its add stage
ended continues with --resume (the trained index and the encoded blocks kept; it builds the very
index an uninterrupted run builds); one that ended reruns its search-params and neighbour stages
with --reuse-index. Ranks run as in `db build --workers N` (torch's elastic launcher, gloo); each stage is
timed on rank 0 between barriers.

Prints per stage seconds and chunks/s, peak RSS (the largest rank and all ranks together; and
the anonymous part, without the memory-mapped files that ru_maxrss counts), the index chosen, its code bytes, and recall@10 of the stored neighbours against an exact search
(same-document exclusion included) for 1,000 sampled chunks. With --json the last line is one
JSON object with at least chunks, seconds, peak_rss_mb, recall_at_10 and index.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrolm.database import distributed
from retrolm.database import index as ix
from retrolm.database.config import DatabaseConfig, parse_bytes
from retrolm.database.neighbours import index_search_fn, search_excluding_documents
from retrolm.database.ondisk import choose_layout, merge_blocks_ondisk
from retrolm.database.store import gather_rows
from retrolm.distributed import Dist
from retrolm.io import read_json, save_npy, write_json

DOC_CHUNKS = 8  # chunks per synthetic document
TOPIC_CHUNKS = 256  # chunks per topic (cluster centre) on average: 32 documents
NOISE = 1.5  # noise scale against unit-variance centres (per dimension)
SAMPLE_BLOCKS = 8  # the recall sample is drawn from this many blocks


class Synthetic:
    """Block `b` of a seeded clustered database, made on demand (the same every time)."""

    def __init__(self, chunks: int, dim: int, block_rows: int, seed: int) -> None:
        self.chunks, self.dim, self.block_rows, self.seed = chunks, dim, block_rows, seed
        rng = np.random.default_rng([seed, 0])
        self.topics = max(64, chunks // TOPIC_CHUNKS)
        self.centres = rng.standard_normal((self.topics, dim)).astype(np.float32)
        self.blocks = -(-chunks // block_rows)

    def rows(self, b: int) -> tuple[int, int]:
        start = b * self.block_rows
        return start, min(start + self.block_rows, self.chunks)

    def ids(self, b: int) -> np.ndarray:
        return np.arange(*self.rows(b), dtype=np.int64)

    def vectors(self, b: int) -> np.ndarray:
        ids = self.ids(b)
        return self._make(ids // DOC_CHUNKS, np.random.default_rng([self.seed, 1, b]))

    def training_sample(self, size: int) -> np.ndarray:
        """Fresh draws from the same distribution (faiss benchmarks train on a learn set too),
        float16 as a database stores embeddings and `_plan_index` reads its sample."""
        rng = np.random.default_rng([self.seed, 2])
        docs = rng.integers(0, max(self.chunks // DOC_CHUNKS, 1), size)
        return self._make(docs, rng, np.float16)

    def _make(
        self, docs: np.ndarray, rng: np.random.Generator, dtype: type = np.float32
    ) -> np.ndarray:
        """Unit vectors for `docs`, made a slice at a time (a 2M-row training sample would
        otherwise hold three float32 copies at once; the draws are the same either way)."""
        out = np.empty((len(docs), self.dim), dtype)
        for start in range(0, len(docs), 1 << 16):
            part = docs[start : start + (1 << 16)]
            topics = (part * 2654435761 + self.seed) % (1 << 32) % self.topics
            v = self.centres[topics]
            v += NOISE * rng.standard_normal((len(part), self.dim), np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            out[start : start + len(part)] = v
        return out


class StoredVectors:
    """`vectors_of(ids)` over the float16 embedding blocks written in the encode stage, memory-
    mapped and read as a database's `BlockStore.embeddings_of_ids` reads them (`gather_rows`;
    each block opened once)."""

    def __init__(self, out: Path, data: Synthetic) -> None:
        self.out, self.dim = out, data.dim
        self.starts = np.arange(data.blocks, dtype=np.int64) * data.block_rows
        self.maps: dict[int, np.ndarray] = {}

    def block(self, b: int) -> np.ndarray:
        if b not in self.maps:
            self.maps[b] = np.load(self.out / f"emb-{b:06d}.npy", mmap_mode="r")
        return self.maps[b]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return gather_rows(self.block, self.starts, ids, self.dim)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """The largest anonymous RSS (`RssAnon` of /proc/self/status: the process's own memory,
    not the memory-mapped index and embedding files that ru_maxrss also counts), sampled
    every 0.2 s by a daemon thread; 0 where /proc is missing."""

    def __init__(self) -> None:
        self.peak_kb = self.stage_kb = 0
        threading.Thread(target=self._run, daemon=True).start()

    def sample(self) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    now = int(line.split()[1])
                    self.peak_kb = max(self.peak_kb, now)
                    self.stage_kb = max(self.stage_kb, now)
        except OSError:
            pass

    def stage_mb(self) -> float:
        """The peak since the last call (a stage's), then start the next stage's."""
        self.sample()
        peak, self.stage_kb = self.stage_kb, 0
        return peak / 1024

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(0.2)

    def mb(self) -> float:
        self.sample()
        return self.peak_kb / 1024


def reusable(args: argparse.Namespace) -> str | None:
    """Why --out cannot stand for this run's setup to add stages (--reuse-index), or None."""
    out = Path(args.out)
    data = Synthetic(args.chunks, args.dim, args.block_rows, args.seed)
    names = ["chunk_doc.npy", "index.faiss"]
    names += [
        f"{kind}-{b:06d}.npy" for kind in ("emb", "cells", "celldis") for b in range(data.blocks)
    ]
    missing = [name for name in names if not (out / name).is_file()]
    if missing:
        return f"{out / missing[0]} is missing ({len(missing)} of the {len(names)} files a finished run leaves)"
    if (out / "trained.faiss").exists() or list(out.glob("codes-*.npy")):
        return f"{out} holds a run stopped before its search-params stage ended"
    index = ix.load_index(out / "index.faiss", mmap=True)
    emb = np.load(out / f"emb-{data.blocks - 1:06d}.npy", mmap_mode="r")
    last = data.rows(data.blocks - 1)
    if (
        index.ntotal != args.chunks
        or index.d != args.dim
        or emb.shape != (last[1] - last[0], args.dim)
    ):
        return (
            f"{out} holds a run of {index.ntotal} chunks of dim {index.d}, not {args.chunks} of "
            f"dim {args.dim} (or another --block-rows)"
        )
    return None


SETTINGS = ("chunks", "dim", "block_rows", "index", "index_memory", "index_train_size", "seed")


def resumable(args: argparse.Namespace) -> str | None:
    """Why --out cannot be resumed by this run (--resume), or None."""
    path = Path(args.out) / "run.json"
    if not path.is_file():
        return f"{path} is missing: no run of this benchmark was started in {args.out}"
    earlier = read_json(path)
    differ = [k for k in SETTINGS if earlier.get(k) != getattr(args, k)]
    if differ:
        return f"{path} was started with other settings ({', '.join(differ)})"
    out = Path(args.out)
    if (out / "index.faiss").is_file() and not (out / "trained.faiss").exists():
        return f"the run in {out} ended: rerun its search and neighbour stages with --reuse-index"
    return None


def run(args: argparse.Namespace, dist: Dist) -> dict | None:
    anon = AnonPeak()
    out = Path(args.out)
    if dist.is_main and not (args.reuse_index or args.resume):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        write_json(out / "run.json", {k: getattr(args, k) for k in SETTINGS})
    dist.barrier()
    stages_path = out / "stages.json"  # each finished stage's seconds, for a resumed run
    earlier = read_json(stages_path) if args.resume and stages_path.is_file() else {}
    data = Synthetic(args.chunks, args.dim, args.block_rows, args.seed)
    chunk_doc_path = out / "chunk_doc.npy"
    times: dict[str, float] = {}
    stage_anon: dict[str, float] = {}  # rank 0's
    clock = [time.perf_counter()]

    def stage(name: str, record: bool = True) -> None:
        """End stage `name`: its time and rank 0's anonymous peak; `record` it in stages.json
        for a later --resume (not a stage this run skipped, or did only a part of)."""
        dist.barrier()
        now = time.perf_counter()
        times[name] = now - clock[0]
        clock[0] = now
        stage_anon[name] = anon.stage_mb()
        if dist.is_main and record:
            recorded = read_json(stages_path) if stages_path.is_file() else {}
            write_json(stages_path, {**recorded, name: times[name]})  # atomic: killable
        if dist.is_main:  # as it goes: a 4M run takes an hour before its report
            print(
                f"[{time.strftime('%H:%M:%S')}] {name}: {times[name]:.1f} s, anonymous RSS peak "
                f"{stage_anon[name]:.0f} MB",
                file=sys.stderr,
            )

    if args.index == "auto":
        factory, ondisk = choose_layout(args.chunks, args.dim, parse_bytes(args.index_memory))
    else:
        factory, ondisk = args.index, False
    trained_path = out / "trained.faiss"
    kmeans_path = out / "kmeans.npz"  # the k-means' state between iterations, as db build's
    index_path = out / "index.faiss"
    if args.reuse_index:  # the filled index of an earlier run (`reusable` checked it)
        if dist.is_main:
            index = ix.load_index(index_path, ondisk=ondisk)
        stage("load reused index")
    else:
        # the chunk -> document map, memory-mapped like a database's chunk_doc.npy
        if dist.is_main:
            mapping = np.lib.format.open_memmap(chunk_doc_path, "w+", np.int64, (args.chunks,))
            for b in range(data.blocks):
                start, end = data.rows(b)
                mapping[start:end] = np.arange(start, end) // DOC_CHUNKS
            mapping.flush()
            del mapping
        stage("setup")

        # train (rank 0), as _plan_index does; not again when resumed after it
        trained_before = args.resume and trained_path.is_file()
        kmeans_resumed = args.resume and kmeans_path.is_file()  # this run does only a part
        if dist.is_main and not trained_before:
            size = ix.training_sample_size(factory, args.chunks, args.index_train_size)
            sample = data.training_sample(size) if size else None
            with distributed.node_threads():  # as _plan_index: the waiting ranks' cores too
                trained = ix.build_index(
                    factory, args.dim, "ip", sample, seed=args.seed, checkpoint=kmeans_path
                )
            del sample  # as _plan_index returns: held to the end, it was 1.5 GB of the 4M peak
            ix.save_index(trained, trained_path)
            kmeans_path.unlink(missing_ok=True)
        stage("train", record=not (trained_before or kmeans_resumed))
        if kmeans_resumed and not trained_before:  # the log has each k-means iteration's time
            times["train (this run, k-means resumed)"] = times.pop("train")
        if trained_before:
            del times["train"]
            if "train" in earlier:
                times["train (earlier run)"] = earlier["train"]

        # encode (every rank, its blocks), as _build_faiss does; when resumed, the blocks whose
        # embeddings were written (each file atomically, the embeddings last) are not again
        trained = ix.load_index(trained_path, mmap=True)
        done = {
            b
            for b in range(data.blocks)
            if args.resume and all((out / f"{k}-{b:06d}.npy").is_file() for k in ("codes", "emb"))
        }
        for b in dist.mine(list(range(data.blocks))):
            if b in done:
                continue
            vectors = data.vectors(b)
            codes, cells = ix.encode_with_cells(trained, vectors, ix.KEPT_CELLS)
            save_npy(out / f"codes-{b:06d}.npy", codes)
            if cells is not None:  # kept for the neighbour stage, as _build_faiss keeps them
                save_npy(out / f"celldis-{b:06d}.npy", cells[0])
                save_npy(out / f"cells-{b:06d}.npy", cells[1])
            save_npy(out / f"emb-{b:06d}.npy", vectors.astype(np.float16))  # as a database stores
        del trained
        stage("encode", record=not done)
        if done:  # the time above is this run's part only (a stopped run's part is not known)
            times[f"encode (this run: {data.blocks - len(done)} of {data.blocks} blocks)"] = (
                times.pop("encode")
            )
            if "encode" in earlier:
                times["encode (earlier run)"] = earlier["encode"]

        # add in block order (rank 0), as _add_codes does
        if dist.is_main:
            index = ix.load_index(trained_path)
            coded = ((np.load(out / f"codes-{b:06d}.npy"), data.ids(b)) for b in range(data.blocks))
            if ondisk:
                merge_blocks_ondisk(
                    index,
                    coded,
                    out / "lists.ivfdata",
                    out / "shards",
                    shard_bytes=parse_bytes(args.index_memory) // 4,
                    load_trained=lambda: ix.load_index(trained_path),
                )
            else:
                kept = [out / f"cells-{b:06d}.npy" for b in range(data.blocks)]
                ivf = faiss.try_extract_index_ivf(index)
                if ivf is not None and all(path.is_file() for path in kept):  # as _add_codes
                    nearest = (np.load(path, mmap_mode="r")[:, 0] for path in kept)
                    ix.reserve_lists(
                        index, sum(np.bincount(c, minlength=ivf.nlist) for c in nearest)
                    )
                for codes, ids in coded:
                    ix.add_encoded(index, codes, ids)
            for b in range(data.blocks):
                (out / f"codes-{b:06d}.npy").unlink()
        stage("add")

    # search parameters and the exact ground truth of the recall sample (rank 0)
    rng = np.random.default_rng([args.seed, 3])
    sample_blocks = np.sort(
        rng.choice(data.blocks, min(args.search_blocks or SAMPLE_BLOCKS, data.blocks), False)
    )
    per_block = -(-args.sample // len(sample_blocks))
    picks = []
    for b in sample_blocks:
        start, end = data.rows(int(b))
        picks.append(np.sort(rng.choice(np.arange(start, end), min(per_block, end - start), False)))
    sample_ids = np.concatenate(picks)[: args.sample]
    recall_truth, params, tuned_recall, code_bytes = None, None, None, None
    if dist.is_main:
        with distributed.node_threads():  # as _add_codes
            queries = np.concatenate(
                [
                    data.vectors(int(b))[p - data.rows(int(b))[0]]
                    for b, p in zip(sample_blocks, picks)
                ]
            )[: args.sample]
            k_exact = args.neighbours + DOC_CHUNKS
            stream = ((data.vectors(b), data.ids(b)) for b in range(data.blocks))
            _, exact = ix.exact_search_blocks(queries, stream, k_exact, "ip")
            params, tuned_recall = ix.choose_search_params(
                index,
                factory,
                queries,
                true_ids=exact,
                k=args.neighbours,
                vectors_of=None if args.no_rerank else StoredVectors(out, data),
            )
            same_doc = (exact // DOC_CHUNKS) == (sample_ids // DOC_CHUNKS)[:, None]
            recall_truth = [row[~same][: args.neighbours] for row, same in zip(exact, same_doc)]
            code_bytes = _code_bytes(index)
            ix.save_index(index, index_path)
            del index
            trained_path.unlink(missing_ok=True)  # absent when reused
    stage("search params")

    # neighbours (every rank, its blocks, against the memory-mapped index), as _run_neighbours;
    # from a cold page cache for this run's files, whatever earlier stages left in it
    evict_from_page_cache(out)
    dist.barrier()
    clock[0] = time.perf_counter()  # the eviction (and its fsync) is not the stage's time
    index = ix.searchable(ix.load_index(index_path, mmap=not ondisk, ondisk=ondisk))
    box = [params if dist.is_main else None]
    if dist.world_size > 1:
        import torch.distributed as td

        td.broadcast_object_list(box, src=0)
    if ix.K_FACTOR in box[0]:  # compressed codes re-ranked with the stored embeddings
        index = ix.RerankedIndex(index, StoredVectors(out, data), box[0][ix.K_FACTOR])
    ix.apply_search_params(index, box[0])
    chunk_doc = np.load(chunk_doc_path, mmap_mode="r")
    searched = [int(b) for b in sample_blocks] if args.search_blocks else list(range(data.blocks))

    def neighbours(index: Any, b: int, kept_cells: bool) -> tuple[np.ndarray, np.ndarray]:
        start, end = data.rows(b)
        cells = None
        if kept_cells and (out / f"cells-{b:06d}.npy").is_file():
            cells = (np.load(out / f"celldis-{b:06d}.npy"), np.load(out / f"cells-{b:06d}.npy"))
        return search_excluding_documents(
            index_search_fn(index, data.vectors(b), cells),
            end - start,
            chunk_doc[start:end],
            chunk_doc,
            args.neighbours,
            int(index.ntotal),
            metric="ip",
        )

    for b in dist.mine(searched):
        ids, dists = neighbours(index, b, kept_cells=True)
        save_npy(out / f"ids-{b:06d}.npy", ids)
        save_npy(out / f"dists-{b:06d}.npy", dists)
    stage("neighbours")
    # the sampled blocks again, the files now in the page cache: the steady state of a build whose
    # index and embeddings fit in memory (the first pass over 8 blocks is mostly disk reads)
    again = [int(b) for b in sample_blocks]
    same_ids = True
    block_ms: dict[int, float] = {}  # each block's warm ms a chunk: the spread of the mean
    for _ in range(args.warm_passes):
        for b in dist.mine(again):
            began = time.perf_counter()
            ids, _ = neighbours(index, b, kept_cells=True)
            ms = 1000 * (time.perf_counter() - began) / len(ids)
            block_ms[b] = min(ms, block_ms.get(b, ms))  # best of the passes
            same_ids &= bool(np.array_equal(ids, np.load(out / f"ids-{b:06d}.npy")))
    stage("neighbours, warm", record=False)
    if args.compare_cells:  # the same blocks, warm too, every chunk's cells found afresh
        for b in dist.mine(again):
            ids, _ = neighbours(index, b, kept_cells=False)
            same_ids &= bool(np.array_equal(ids, np.load(out / f"ids-{b:06d}.npy")))
        stage("neighbours, cells found again", record=False)
    del index

    rss, anon_mb, same, blocks_ms = [peak_rss_mb()], [anon.mb()], [same_ids], [block_ms]
    if dist.world_size > 1:
        import torch.distributed as td

        rss, anon_mb, same = (
            [None] * dist.world_size,
            [None] * dist.world_size,
            [None] * dist.world_size,
        )
        blocks_ms = [None] * dist.world_size
        td.all_gather_object(rss, peak_rss_mb())
        td.all_gather_object(anon_mb, anon.mb())
        td.all_gather_object(same, same_ids)
        td.all_gather_object(blocks_ms, block_ms)
    if not dist.is_main:
        return None
    found = []
    for b, p in zip(sample_blocks, picks):
        found.append(np.load(out / f"ids-{int(b):06d}.npy")[p - data.rows(int(b))[0]])
    found = np.concatenate(found)[: args.sample]
    recall = ix.recall_at_k(found, np.array(recall_truth))
    warm = times.pop("neighbours, warm") / args.warm_passes
    by_block = {b: round(ms, 4) for part in blocks_ms for b, ms in sorted(part.items())}
    found_again = times.pop("neighbours, cells found again", None)
    work = {k: v for k, v in times.items() if k != "setup"}
    searched_chunks = sum(data.rows(b)[1] - data.rows(b)[0] for b in searched)
    warm_chunks = sum(data.rows(int(b))[1] - data.rows(int(b))[0] for b in sample_blocks)

    def ms_per_chunk(seconds: float, chunks: int) -> float:
        return round(1000 * seconds / chunks * dist.world_size, 4)

    compared = {}
    if found_again is not None:
        compared = {
            "neighbour_ms_per_chunk_cells_found_again": ms_per_chunk(found_again, warm_chunks),
            "cells_found_again_over_kept": round(found_again / warm, 3),
        }
    return {
        "chunks": args.chunks,
        "dim": args.dim,
        "ranks": dist.world_size,
        "threads_per_rank": args.threads,
        "index": factory,
        "ondisk": ondisk,
        "reused_index": args.reuse_index,
        "search_params": box[0],
        "index_recall_at_10": None if tuned_recall is None else round(tuned_recall, 4),
        "code_bytes": code_bytes,
        "index_file_mb": round(
            sum(p.stat().st_size for p in out.glob("index.faiss")) / 2**20
            + sum(p.stat().st_size for p in out.glob("lists.ivfdata")) / 2**20,
            1,
        ),
        "seconds": round(sum(work.values()), 2),
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "stage_chunks_per_s": {
            k: round((searched_chunks if k == "neighbours" else args.chunks) / v)
            for k, v in work.items()
            if v > 0 and "this run:" not in k
        },
        "neighbours_searched_chunks": searched_chunks,
        "neighbour_ms_per_chunk": ms_per_chunk(times["neighbours"], searched_chunks),
        "neighbour_ms_per_chunk_warm": ms_per_chunk(warm, warm_chunks),
        "neighbour_seconds_warm": round(warm, 2),
        "neighbour_ms_per_chunk_warm_by_block": by_block,  # ranks' own, best of the passes
        **compared,
        "same_neighbours_every_pass": all(same),
        "peak_rss_mb": round(max(rss), 1),
        "peak_rss_mb_all_ranks": round(sum(rss), 1),
        "peak_anon_rss_mb": round(max(anon_mb), 1),
        "stage_peak_anon_rss_mb_rank0": {k: round(v, 1) for k, v in stage_anon.items()},
        "recall_at_10": round(recall, 4),
    }


def evict_from_page_cache(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (written back first), so that the neighbour
    stage starts from the same state at every size: without it a small run's index is still
    cached from its add stage and a large one's was pushed out by its encode stage."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _code_bytes(index: faiss.Index) -> int:
    """Bytes of codes and ids the filled index holds (what grows with the database)."""
    ivf = faiss.try_extract_index_ivf(index)
    per_vector = (ivf.code_size if ivf is not None else 4 * index.d) + 8
    return int(index.ntotal) * per_vector


def report(result: dict, as_json: bool) -> None:
    print(
        f"{result['chunks']} chunks of dim {result['dim']}, {result['ranks']} rank(s) x "
        f"{result['threads_per_rank']} thread(s): index {result['index']!r}"
        f"{' (on-disk lists)' if result['ondisk'] else ''}, search {result['search_params']}"
        + (
            " (the filled index of an earlier run: no setup, train, encode, add)"
            if result["reused_index"]
            else ""
        )
    )
    for name, seconds in result["stage_seconds"].items():
        rate = result["stage_chunks_per_s"].get(name)
        print(f"  {name:14s} {seconds:9.2f} s" + (f"  {rate:12,d} chunks/s" if rate else ""))
    print(
        f"  total {result['seconds']:.1f} s; peak RSS {result['peak_rss_mb']:.0f} MB (largest "
        f"rank), {result['peak_rss_mb_all_ranks']:.0f} MB (all ranks), anonymous (not "
        f"mapped files) {result['peak_anon_rss_mb']:.0f} MB (largest rank); index files "
        f"{result['index_file_mb']} MB; recall@10 of the stored neighbours "
        f"{result['recall_at_10']:.4f} (index alone {result['index_recall_at_10']})"
    )
    print(
        f"  neighbours {result['neighbour_ms_per_chunk']} ms/chunk from a cold page cache, "
        f"{result['neighbour_ms_per_chunk_warm']} ms/chunk warm (the sampled blocks again)"
        + (
            f"; cells found again (warm) {result['neighbour_ms_per_chunk_cells_found_again']} "
            f"ms/chunk: {result['cells_found_again_over_kept']}x the kept cells"
            if "cells_found_again_over_kept" in result
            else ""
        )
        + f"; same neighbours every pass: {result['same_neighbours_every_pass']}"
    )
    by_block = list(result["neighbour_ms_per_chunk_warm_by_block"].values())
    print(
        f"  warm, by block: {min(by_block):.4f} to {max(by_block):.4f} ms/chunk, median "
        f"{float(np.median(by_block)):.4f} over {len(by_block)} blocks"
    )
    if as_json:
        print(json.dumps(result))


def compare_embed_dtypes(corpus: list[str], out: Path, as_json: bool) -> None:
    """Build one database's chunks, embed them with float32 and with bfloat16 autocast (the
    default MiniLM embedder), search exact neighbours for both, and report the recall@10 of the
    bfloat16 neighbours against the float32 ones, and the embedding time of each."""
    from retrolm.database import (
        DatabaseConfig,
        chunk_stage,
        embed_stage,
        index_stage,
        neighbours_stage,
    )
    from retrolm.database.manifest import load_manifest
    from retrolm.database.store import BlockStore

    shutil.rmtree(out, ignore_errors=True)
    config = DatabaseConfig(vocab_size=4096, glob="**/*.py", index="Flat", embed_dtype="float32")
    base = chunk_stage(corpus, out / "float32", config, show_progress=False)
    shutil.copytree(base, out / "bfloat16")
    ids, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        folder = out / dtype
        start = time.perf_counter()
        embed_stage(folder, overrides={"embed_dtype": dtype}, show_progress=False)
        seconds[dtype] = time.perf_counter() - start
        index_stage(folder, show_progress=False)
        neighbours_stage(folder, show_progress=False)
        store = BlockStore(folder, load_manifest(folder))
        written = store.manifest.neighbours.blocks
        ids[dtype] = np.concatenate(
            [np.load(folder / written[b.index].ids_file) for b in store.blocks]
        )
    result = {
        "corpus": corpus,
        "chunks": int(len(ids["float32"])),
        "embed_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "bf16_speedup": round(seconds["float32"] / seconds["bfloat16"], 3),
        "recall_at_10": round(ix.recall_at_k(ids["bfloat16"], ids["float32"]), 4),
    }
    print(
        f"{result['chunks']} chunks: embedding float32 {seconds['float32']:.1f} s, bfloat16 "
        f"{seconds['bfloat16']:.1f} s ({result['bf16_speedup']}x); recall@10 of the bfloat16 "
        f"neighbours against the float32 ones {result['recall_at_10']:.4f}"
    )
    if as_json:
        print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chunks", type=int, help="database size in chunks")
    p.add_argument("--out", required=True, help="work folder (emptied first)")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (MiniLM: 384)")
    p.add_argument("--block-rows", type=int, default=16384, help="chunks per block (as db build)")
    p.add_argument("--index", default="auto", help="'auto' or a faiss factory string")
    p.add_argument("--index-memory", default="4G", help="--index auto memory budget (as db build)")
    p.add_argument(
        "--index-train-size",
        type=int,
        default=DatabaseConfig.index_train_size,
        help="as db build (default %(default)s)",
    )
    p.add_argument("--neighbours", type=int, default=10)
    p.add_argument("--sample", type=int, default=1000, help="chunks whose recall is measured")
    p.add_argument("--workers", type=int, default=1, help="local ranks (elastic launcher)")
    p.add_argument("--threads", type=int, default=1, help="faiss threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-rerank",
        action="store_true",
        help="search compressed (PQ) codes without re-ranking by the stored embeddings",
    )
    p.add_argument(
        "--search-blocks",
        type=int,
        default=0,
        metavar="N",
        help="search the neighbours of N sampled blocks only (the recall sample's), to time the "
        "neighbour stage per chunk at a size where searching every block takes hours "
        "(default: every block)",
    )
    p.add_argument(
        "--reuse-index",
        action="store_true",
        help="skip the setup, train, encode and add stages: take the filled index, embeddings "
        "and kept cells that a run with the same --chunks, --dim, --block-rows, --index and "
        "--seed left in --out, and rerun the search-params and neighbour stages (after a "
        "change to them; a 16M run takes 2 h to get there)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that was stopped before its add stage ended in --out (same "
        "settings): the trained index is not trained again and the blocks already encoded are "
        "not encoded again; stage times of earlier runs are reported as such",
    )
    p.add_argument(
        "--warm-passes",
        type=int,
        default=1,
        help="search the sampled blocks this many times warm (the figure is the mean pass; "
        "each block's best pass is in the JSON)",
    )
    p.add_argument(
        "--compare-cells",
        action="store_true",
        help="search the same blocks a second time with every chunk's cells found afresh "
        "(not the ones the encode stage kept) and report the time ratio, and whether the "
        "neighbours are the same",
    )
    p.add_argument(
        "--compare-embed-dtypes",
        nargs="+",
        metavar="CORPUS",
        help="instead: embed CORPUS with float32 and with bfloat16 (MiniLM) and report the "
        "recall@10 of the bfloat16 neighbours against the float32 ones",
    )
    args = p.parse_args(argv)
    if args.compare_embed_dtypes:
        compare_embed_dtypes(args.compare_embed_dtypes, Path(args.out), args.json)
        return 0
    if args.chunks is None:
        p.error("--chunks is required")
    if args.chunks < args.sample or args.chunks < 1000:
        p.error("--chunks must be at least 1000 and at least --sample")
    if args.warm_passes < 1:
        p.error(f"--warm-passes must be at least 1, got {args.warm_passes}")
    if args.reuse_index and (why := reusable(args)):
        p.error(f"--reuse-index: {why}; run once without it")
    if args.resume and args.reuse_index:
        p.error(
            "--resume and --reuse-index exclude each other: a run whose add stage ended "
            "is reused, not resumed"
        )
    if args.resume and (why := resumable(args)):
        p.error(f"--resume: {why}; run without --resume to start afresh")
    if args.workers > 1 and "WORLD_SIZE" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        rest = list(argv if argv is not None else sys.argv[1:])
        i = rest.index("--workers")
        del rest[i : i + 2]
        return distributed.launch_local(args.workers, [os.path.abspath(__file__), *rest])
    faiss.omp_set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the index's choices
    with distributed.session() as dist:
        result = run(args, dist)
    if result is not None:
        report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
