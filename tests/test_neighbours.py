"""Neighbours from other documents only: equal to a brute-force reference, re-searching the rows
that the first over-fetch left short, bounded by the index size."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrolm.database import index as ix
from retrolm.database.neighbours import index_search_fn, search_excluding_documents
from retrolm.errors import InputError


@pytest.fixture(autouse=True)
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # see tests/test_index.py: shared CI cores
    yield
    faiss.omp_set_num_threads(before)


def documents(doc_lengths: list[int], dim: int, seed: int, metric: str = "l2"):
    """Chunks of one document lie close together (as real chunks of one text do)."""
    rng = np.random.default_rng(seed)
    chunk_doc = np.repeat(np.arange(len(doc_lengths)), doc_lengths).astype(np.int64)
    centres = rng.standard_normal((len(doc_lengths), dim)).astype(np.float32)
    vectors = centres[chunk_doc] + 0.3 * rng.standard_normal((len(chunk_doc), dim)).astype(
        np.float32
    )
    if metric == "ip":
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ix.build_index("Flat", dim, metric, None)
    ix.add_vectors(index, vectors, np.arange(len(vectors)))
    return vectors, chunk_doc, index


def reference(vectors, chunk_doc, query_rows, k, metric):
    """Brute force: sort every chunk by distance, drop the query's own document, take k."""
    out = np.full((len(query_rows), k), -1, dtype=np.int64)
    for row, q in enumerate(query_rows):
        if metric == "ip":
            order = np.argsort(-(vectors @ vectors[q]), kind="stable")
        else:
            order = np.argsort(((vectors - vectors[q]) ** 2).sum(1), kind="stable")
        others = order[chunk_doc[order] != chunk_doc[q]][:k]
        out[row, : len(others)] = others
    return out


class CountingSearch:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, rows, kk):
        self.calls.append((np.array(rows), kk))
        return self.fn(rows, kk)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_equals_brute_force_and_never_returns_own_document(metric):
    lengths = [1, 40, 3, 25, 2, 60, 5, 1, 30, 8]  # long documents crowd their own neighbourhoods
    vectors, chunk_doc, index = documents(lengths, 16, seed=0, metric=metric)
    queries = np.arange(len(vectors))
    search_fn = CountingSearch(index_search_fn(index, vectors[queries]))
    ids, dists = search_excluding_documents(
        search_fn,
        len(queries),
        chunk_doc[queries],
        chunk_doc,
        k=6,
        max_k=index.ntotal,
        metric=metric,
    )
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == (len(queries), 6)
    assert (chunk_doc[ids] != chunk_doc[queries, None]).all()
    np.testing.assert_array_equal(ids, reference(vectors, chunk_doc, queries, 6, metric))
    true_d, true_i = ix.search(index, vectors[queries], index.ntotal)
    for row in range(len(queries)):  # the distances are those of the returned ids
        lookup = dict(zip(true_i[row], true_d[row]))
        np.testing.assert_allclose(dists[row], [lookup[i] for i in ids[row]], rtol=1e-5)
    # The first over-fetch (2k + 16 = 28 candidates) cannot satisfy chunks of documents of more
    # than 22 chunks (1, 3, 5, 8); only such rows are searched again, with more candidates.
    assert len(search_fn.calls) >= 2
    first_rows, first_kk = search_fn.calls[0]
    again_rows, again_kk = search_fn.calls[1]
    assert first_kk == 28 and again_kk > first_kk and len(again_rows) < len(first_rows)
    assert set(chunk_doc[again_rows]) <= {1, 3, 5, 8}
    assert set(np.flatnonzero(np.isin(chunk_doc, [1, 5]))) <= set(again_rows)


def test_rows_with_too_few_other_chunks_are_filled():
    vectors, chunk_doc, index = documents([20, 3], 8, seed=1)
    for metric, fill in (("l2", np.inf), ("ip", -np.inf), ("bm25", -np.inf)):
        ids, dists = search_excluding_documents(
            index_search_fn(index, vectors),
            len(vectors),
            chunk_doc,
            chunk_doc,
            k=5,
            max_k=index.ntotal,
            metric=metric,
        )
        # Chunks of document 0 have 3 others; those of document 1 have 20.
        assert (ids[:20, :3] >= 20).all() and (ids[:20, 3:] == -1).all()
        assert (dists[:20, 3:] == fill).all() and np.isfinite(dists[:20, :3]).all()
        assert (ids[20:] < 20).all() and (ids[20:] >= 0).all()


def test_search_is_bounded_by_max_k_and_stops_when_the_index_runs_dry():
    vectors, chunk_doc, index = documents([50, 2], 8, seed=2)
    search_fn = CountingSearch(index_search_fn(index, vectors))
    ids, _ = search_excluding_documents(
        search_fn, len(vectors), chunk_doc, chunk_doc, k=4, max_k=index.ntotal, first_k=5
    )
    assert max(kk for _, kk in search_fn.calls) == index.ntotal
    assert (ids[:50, :2] >= 50).all() and (ids[:50, 2:] == -1).all()
    # A search that returns -1 (exhausted) is not repeated, whatever max_k says.
    search_fn = CountingSearch(index_search_fn(index, vectors))
    search_excluding_documents(search_fn, len(vectors), chunk_doc, chunk_doc, k=4, max_k=10**6)
    assert [kk for _, kk in search_fn.calls] == [24, 96]


def test_free_queries_and_excluded_documents():
    vectors, chunk_doc, index = documents([10, 10, 10, 10], 8, seed=3)
    queries = vectors[[0, 15]]
    fn = index_search_fn(index, queries)
    ids, _ = search_excluding_documents(fn, 2, np.array([-1, -1]), chunk_doc, k=3, max_k=40)
    np.testing.assert_array_equal(ids, ix.search(index, queries, 3)[1])  # nothing excluded
    excluded = np.array([True, False, False, True])
    ids, _ = search_excluding_documents(
        fn, 2, np.array([-1, 1]), chunk_doc, k=3, max_k=40, excluded_docs=excluded
    )
    assert set(chunk_doc[ids[0]]) <= {1, 2} and set(chunk_doc[ids[1]]) == {2}


def test_bad_arguments():
    _, chunk_doc, index = documents([3, 3], 4, seed=4)
    fn = index_search_fn(index, np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="positive"):
        search_excluding_documents(fn, 2, np.zeros(2), chunk_doc, k=0, max_k=6)
    with pytest.raises(InputError, match="query_docs"):
        search_excluding_documents(fn, 2, np.zeros(3), chunk_doc, k=2, max_k=6)
    with pytest.raises(InputError, match="chunk_doc"):
        search_excluding_documents(fn, 2, np.zeros(2), chunk_doc[:2], k=2, max_k=6)
