"""Nearest chunks from *other* documents: over-fetch, filter, re-search the rows still short.

A chunk's nearest neighbours are mostly chunks of its own document (overlapping topics, the
chunks around it); RETRO excludes them, or training would teach the model to copy its own
future. The search itself is a callback, so the same function serves faiss and BM25, and the
caller streams the queries block by block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from retrolm.database.index import search as index_search
from retrolm.errors import InputError

logger = logging.getLogger(__name__)

# search_fn(row_indices, kk) -> (distances (len(rows), kk), ids (len(rows), kk) int64, -1 = none)
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
SIMILARITY_METRICS = ("ip", "bm25")


def _first_allowed(
    ids: np.ndarray, dists: np.ndarray, allowed: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, per row, the first k allowed entries in search order. Returns ids, dists, counts."""
    order = np.argsort(~allowed, axis=1, kind="stable")[:, :k]  # allowed entries first, in order
    kept_ids = np.take_along_axis(ids, order, axis=1)
    kept_dists = np.take_along_axis(dists, order, axis=1)
    kept_ok = np.take_along_axis(allowed, order, axis=1)
    if kept_ids.shape[1] < k:  # kk < k: pad
        pad = k - kept_ids.shape[1]
        kept_ids = np.pad(kept_ids, ((0, 0), (0, pad)), constant_values=-1)
        kept_dists = np.pad(kept_dists, ((0, 0), (0, pad)))
        kept_ok = np.pad(kept_ok, ((0, 0), (0, pad)), constant_values=False)
    return kept_ids, kept_dists, kept_ok


def search_excluding_documents(
    search_fn: SearchFn,
    num_queries: int,
    query_docs: np.ndarray,
    chunk_doc: np.ndarray,
    k: int,
    max_k: int,
    *,
    metric: str = "l2",
    excluded_docs: np.ndarray | None = None,
    first_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest chunks of each query that belong to another document than the query's own.

    Searches `first_k` (default 2k + 16) candidates per query, drops those of the query's own
    document (and of `excluded_docs`), and searches again with 4x as many candidates, only for
    the rows still short of k, until every row has k neighbours, the search returned fewer
    candidates than asked (index exhausted for that row), or `max_k` candidates were searched.

    Args:
        search_fn: `search_fn(rows, kk) -> (dists, ids)` searches the queries `rows` (int64
            positions in 0..num_queries-1) for kk candidates each, nearest first, id -1 = none.
        num_queries: number of queries.
        query_docs: (num_queries,) int64 document index of each query; -1 for a query that
            belongs to no document (nothing is excluded for it).
        chunk_doc: (num_chunks,) int64 document index of every chunk id the index can return.
        k: neighbours wanted per query.
        max_k: the most candidates ever searched per query (normally the index size).
        metric: "l2" (smaller is closer) or "ip" / "bm25" (larger is closer): sets the fill
            distance, +inf or -inf, where fewer than k neighbours exist.
        excluded_docs: optional boolean mask over documents never to return (for any query).
        first_k: candidates of the first search (default 2k + 16).

    Returns:
        ids (num_queries, k) int64 with -1 where none, and distances (num_queries, k) float32.

    Raises:
        InputError: inconsistent shapes or non-positive k / max_k.
    """
    query_docs = np.asarray(query_docs, dtype=np.int64)
    chunk_doc = np.asarray(chunk_doc, dtype=np.int64)
    if k <= 0 or max_k <= 0:
        raise InputError(f"k and max_k must be positive, got k={k}, max_k={max_k}")
    if query_docs.shape != (num_queries,):
        raise InputError(f"query_docs has shape {query_docs.shape}, expected ({num_queries},)")
    fill = -np.inf if metric in SIMILARITY_METRICS else np.inf
    out_ids = np.full((num_queries, k), -1, dtype=np.int64)
    out_dists = np.full((num_queries, k), fill, dtype=np.float32)
    rows = np.arange(num_queries, dtype=np.int64)
    kk = min(max_k, first_k if first_k is not None else 2 * k + 16)
    while len(rows):
        dists, ids = search_fn(rows, kk)
        ids = np.asarray(ids, dtype=np.int64)
        dists = np.asarray(dists, dtype=np.float32)
        found = ids >= 0
        if found.any() and ids.max() >= len(chunk_doc):
            raise InputError(
                f"the search returned chunk id {int(ids.max())} but chunk_doc has only "
                f"{len(chunk_doc)} entries"
            )
        docs = chunk_doc[np.where(found, ids, 0)]
        allowed = found & (docs != query_docs[rows, None])
        if excluded_docs is not None:
            allowed &= ~excluded_docs[docs]
        kept_ids, kept_dists, kept_ok = _first_allowed(ids, dists, allowed, k)
        out_ids[rows] = np.where(kept_ok, kept_ids, -1)
        out_dists[rows] = np.where(kept_ok, kept_dists, fill)
        # A row is done when it has k neighbours or the search ran dry (a -1 among the results).
        short = (kept_ok.sum(axis=1) < k) & found.all(axis=1)
        if kk >= max_k or not short.any():
            break
        rows = rows[short]
        kk = min(max_k, kk * 4)
        logger.debug("re-searching %d queries with %d candidates", len(rows), kk)
    return out_ids, out_dists


def index_search_fn(
    index: object, queries: np.ndarray, cells: tuple[np.ndarray, np.ndarray] | None = None
) -> SearchFn:
    """A `search_fn` over a faiss index for the given (n, dim) query vectors, and optionally
    their nearest IVF cells (`index.encode_with_cells`; found again where absent)."""

    def search_fn(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        known = None if cells is None else (cells[0][rows], cells[1][rows])
        return index_search(index, queries[rows], kk, known)

    return search_fn
