"""faiss index helpers: exact search equals brute force, approximate recall bounds, custom
factory strings, atomic save and (memory-mapped) load."""

from __future__ import annotations

import contextlib
import logging

import faiss
import numpy as np
import pytest

from retrolm.database import index as ix
from retrolm.errors import CorruptArtifactError, InputError


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin-wait at every barrier: on a shared, oversubscribed CI machine
    k-means then runs 5-10x slower with 2 threads than with 1. Results do not depend on it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Gaussian clusters whose spread (per dimension) equals the spread of their centres at
    spread=1.0: neighbourhoods cross cell boundaries, as in real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    assign = rng.integers(0, n_clusters, n)
    return centres[assign] + spread * rng.standard_normal((n, d)).astype(np.float32)


def brute_force(db: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, ...]:
    if metric == "ip":
        scores = q.astype(np.float64) @ db.T.astype(np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((q[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def built(factory, db, metric, ids=None, seed=0, train_size=None):
    """An index of `factory` over `db`, trained on a seeded sample, filled in blocks."""
    n, d = db.shape
    ids = np.arange(n) if ids is None else ids
    size = train_size or ix.training_sample_size(factory, n)
    sample = db[ix.sample_rows(n, size, seed)] if size else None
    index = ix.build_index(factory, d, metric, sample, seed=seed)
    for start in range(0, n, 7000):  # filled block by block, as the database stage does
        ix.add_vectors(index, db[start : start + 7000], ids[start : start + 7000])
    ix.apply_search_params(index, ix.default_search_params(factory, n))
    return index


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_search_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    db = rng.standard_normal((3000, 24)).astype(np.float32)
    q = rng.standard_normal((50, 24)).astype(np.float32)
    if metric == "ip":
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert ix.choose_factory(len(db), 24, 1 << 30) == "Flat"
    ids = np.arange(len(db), dtype=np.int64) + 10_000  # global ids, not row numbers
    index = built("Flat", db, metric, ids)
    dists, found = ix.search(index, q, 10)
    true_d, true_rows = brute_force(db, q, 10, metric)
    assert found.dtype == np.int64 and dists.dtype == np.float32
    np.testing.assert_array_equal(found, true_rows + 10_000)
    np.testing.assert_allclose(dists, true_d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric,fill", [("ip", -np.inf), ("l2", np.inf)])
def test_fewer_results_than_k_give_minus_one(metric, fill):
    db = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    index = built("Flat", db, metric)
    dists, ids = ix.search(index, db[:2], 8)
    assert (ids[:, :5] >= 0).all() and (ids[:, 5:] == -1).all()
    assert (dists[:, 5:] == fill).all() and np.isfinite(dists[:, :5]).all()


@pytest.mark.parametrize("metric,d", [("ip", 32), pytest.param("l2", 64, marks=pytest.mark.slow)])
def test_auto_index_for_100k_vectors_reaches_recall_95(metric, d):
    n = 100_000
    x = clustered(n + 400, d, 2000, spread=1.0, seed=2)
    if metric == "ip":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    db, q = x[:n], x[n:]
    factory = ix.choose_factory(n, d, memory_budget_bytes=1 << 30)
    assert factory == "IVF1024,SQ8"  # 1 byte per dimension
    # a database re-ranks compressed codes with its stored vectors (`choose_search_params`)
    index = ix.RerankedIndex(built(factory, db, metric), lambda ids: db[ids], ix.RERANK_FACTOR)
    _, found = ix.search(index, q, 10)
    _, true_rows = _exact(db, q, metric)
    assert ix.recall_at_k(found, true_rows) >= 0.95


def _exact(db, q, metric):
    return ix.search(built("Flat", db, metric), q, 10)


@pytest.mark.slow
def test_opq_pq_index_when_vectors_exceed_the_budget():
    n, d = 60_000, 64
    x = clustered(n + 200, d, 500, spread=0.5, seed=3)
    db, q = x[:n], x[n:]
    budget = n * 24  # 24 bytes per vector: raw float32 (256 B) does not fit, 16-byte codes do
    factory = ix.choose_factory(n, d, budget)
    assert factory == "OPQ16_64,IVF1024,PQ16"
    index = built(factory, db, "l2", train_size=20_000)
    _, found = ix.search(index, q, 10)
    _, true_rows = _exact(db, q, "l2")
    recall = ix.recall_at_k(found, true_rows)
    assert recall >= 0.5, recall  # 16-byte codes: a bound, not exactness
    assert index.ntotal == n


def test_small_opq_pq_index_builds_and_searches():
    """The OPQ + IVF-PQ path at test size (4-bit codes train fast); the slow test above
    checks the factory `choose_factory` picks, at a realistic size."""
    db = clustered(6000, 32, 60, spread=0.5, seed=8)
    q = db[:100] + 0.01
    index = built("OPQ8_32,IVF16,PQ8x4", db, "l2", train_size=2000)
    _, found = ix.search(index, q, 10)
    _, true_rows = _exact(db, q, "l2")
    assert ix.recall_at_k(found, true_rows) >= 0.3  # 4 bytes per vector: coarse but useful
    assert (found[:, 0] == np.arange(100)).mean() >= 0.5  # the query's own vector, mostly


def test_training_sample_is_64_a_cell_up_to_index_train_size():
    """64 vectors a cell, capped by --index-train-size (default 4M): the default gives 16M
    chunks' 65536 cells 64 each; a smaller cap trades recall for k-means time."""
    n = 16_000_000
    assert ix.training_sample_size("IVF65536,SQ4", n) == ix.MAX_TRAIN_SAMPLE == 64 * 65536
    assert ix.training_sample_size("IVF65536,SQ4", n, 1 << 21) == 32 * 65536
    assert ix.training_sample_size("IVF65536,SQ4", n, 1 << 23) == 64 * 65536  # no more needed
    assert ix.training_sample_size("IVF4096,SQ8", 100_000, 1 << 22) == 100_000  # all there is
    assert ix.training_sample_size("OPQ16_64,IVF1024,PQ16", n, 1000) == 1000
    assert ix.training_sample_size("Flat", n, 1 << 22) == 0


def test_choose_factory_by_size_and_budget():
    assert ix.choose_factory(50_000, 384, 1 << 30) == "Flat"
    # Cells of ~256 vectors (a flat quantizer, its cells found by torch, at every size); the
    # most precise codes that fit: SQ8, SQ4, then OPQ + PQ.
    assert ix.choose_factory(1_000_000, 384, 8 << 30) == "IVF4096,SQ8"
    assert ix.choose_factory(4_000_000, 384, 4 << 30) == "IVF16384,SQ8"
    assert ix.choose_factory(16_000_000, 384, 4 << 30) == "IVF65536,SQ4"
    assert ix.choose_factory(10_000_000, 384, 1 << 30) == "OPQ64_256,IVF32768,PQ64"
    # Small databases that do not fit are compressed too.
    assert ix.choose_factory(50_000, 384, 10_000_000) == "IVF1024,SQ4"
    assert ix.choose_factory(50_000, 384, 4_000_000) == "OPQ64_256,IVF1024,PQ64"
    with pytest.raises(InputError, match="index-memory"):
        ix.choose_factory(10_000_000, 384, 1 << 20)
    with pytest.raises(InputError):
        ix.choose_factory(0, 384, 1 << 20)


@pytest.mark.parametrize(
    "factory,min_recall",
    [("HNSW32", 0.95), ("IVF64,SQ8", 0.9), ("IDMap,Flat", 1.0), ("PCA32,IVF64,Flat", 0.5)],
)
def test_custom_factory_strings_work_with_global_ids(factory, min_recall):
    n, d = 8000, 48
    x = clustered(n + 100, d, 100, spread=0.5, seed=4)
    db, q = x[:n], x[n:]
    ids = np.arange(n, dtype=np.int64) * 3 + 7  # sparse global ids
    index = built(factory, db, "l2", ids)
    _, found = ix.search(index, q, 10)
    _, true_rows = _exact(db, q, "l2")
    assert set(np.unique(found)) <= set(ids)
    assert ix.recall_at_k(found, true_rows * 3 + 7) >= min_recall


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "OPQ8_32,IVF16,PQ8x4", "HNSW16"])
def test_save_load_and_mmap_give_identical_results(tmp_path, factory):
    db = clustered(12_000, 32, 50, spread=0.5, seed=5)
    # (OPQ trains 8-bit codebooks whatever the index's code size: keep its sample small here)
    index = built(factory, db, "ip", np.arange(len(db)) + 5, train_size=3000)
    dists, ids = ix.search(index, db[:40], 7)
    path = tmp_path / "sub" / "index.faiss"
    ix.save_index(index, path)
    assert [p.name for p in path.parent.iterdir()] == ["index.faiss"]  # no temporary left
    for mmap in (False, True):
        loaded = ix.load_index(path, mmap=mmap)
        d2, i2 = ix.search(loaded, db[:40], 7)
        np.testing.assert_array_equal(i2, ids)
        np.testing.assert_array_equal(d2, dists)
        assert ix.metric_of(loaded) == "ip" and loaded.ntotal == len(db)


def test_training_is_deterministic_for_a_seed():
    db = clustered(20_000, 32, 200, spread=1.0, seed=6)
    a = ix.search(built("IVF64,Flat", db, "l2", seed=3), db[:50], 10)[1]
    b = ix.search(built("IVF64,Flat", db, "l2", seed=3), db[:50], 10)[1]
    np.testing.assert_array_equal(a, b)


def test_hnsw_quantizer_training_is_deterministic_and_matches_exact_kmeans():
    """`IVF{n}_HNSW32` (the auto choice from 16384 cells) is trained by a k-means whose
    assignment searches a graph: the same seed must give the same bytes with 2 threads (ranks,
    resume), and the cells must be as good as faiss's exact k-means."""
    db = clustered(20_000, 32, 400, spread=1.0, seed=9)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:200] + 0.01
    faiss.omp_set_num_threads(2)  # a multi-threaded graph build would differ run to run
    a, b = (built("IVF256_HNSW32,Flat", db, "ip", seed=3) for _ in range(2))
    assert faiss.serialize_index(a).tobytes() == faiss.serialize_index(b).tobytes()
    exact = built("IVF256,Flat", db, "ip", seed=3)
    _, true_rows = _exact(db, q, "ip")
    for nprobe in (1, 4):
        ix.apply_search_params(a, {"nprobe": nprobe})
        ix.apply_search_params(exact, {"nprobe": nprobe})
        got = ix.recall_at_k(ix.search(a, q, 10)[1], true_rows)
        want = ix.recall_at_k(ix.search(exact, q, 10)[1], true_rows)
        assert got >= want - 0.03, (nprobe, got, want)
    # the graph must hand the IVF search nprobe cells: efSearch follows nprobe
    ix.apply_search_params(a, {"nprobe": 200})
    assert faiss.downcast_index(faiss.extract_index_ivf(a).quantizer).hnsw.efSearch >= 200
    # and the recorded defaults hold no efSearch of their own for it (it would be overridden)
    assert ix.default_search_params("IVF16384_HNSW32,SQ8", 4_000_000) == {"nprobe": 2048}
    assert ix.default_search_params("HNSW32", 4_000_000) == {"efSearch": 128}


def _equidistant_topics(n: int, topics: int, d: int, seed: int) -> np.ndarray:
    """The benchmark's kind of data: unit vectors around random, equidistant topic centres
    (no lower-dimensional structure), the hard case for an HNSW graph over the centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    x = centres[rng.integers(0, topics, n)] + 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _list_numbers(index, codes):
    """The cell each `sa_encode` code was assigned to (its leading little-endian bytes)."""
    ivf = faiss.extract_index_ivf(index)
    lists = np.zeros(len(codes), np.int64)
    for b in range(ivf.coarse_code_size()):
        lists |= codes[:, b].astype(np.int64) << (8 * b)
    return lists


def _centroids(index):
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    return quantizer, faiss.rev_swig_ptr(
        faiss.downcast_index(quantizer.storage).get_xb(), quantizer.ntotal * quantizer.d
    ).reshape(quantizer.ntotal, quantizer.d).copy()


def test_hnsw_quantizer_assigns_vectors_to_their_nearest_cell():
    """faiss searches an HNSW quantizer with efSearch 16 unless told otherwise, and encoding
    (`sa_encode`) and adding assign with it: on equidistant topics that put 6% of these vectors
    (a third at 16384 cells) in a wrong cell, which no nprobe repairs. Training measures the
    efSearch that assigns as an exact search does, the index keeps it, and the search
    parameters never go below it."""
    import torch

    db = _equidistant_topics(60_000, 4096, 64, seed=11)
    index = ix.build_index("IVF2048_HNSW32,Flat", 64, "ip", db[:40_000], seed=0)
    quantizer, centroids = _centroids(index)
    trained_ef = quantizer.hnsw.efSearch
    assert trained_ef > 16  # measured, not faiss's default
    exact = ix.nearest_centroids(
        torch.from_numpy(db), torch.from_numpy(centroids), spherical=True
    ).numpy()
    lists = _list_numbers(index, ix.encode_block(index, db))
    assert np.mean(lists == exact) >= 0.985
    # the recorded search parameters keep at least that efSearch for the quantizer
    for start in range(0, len(db), 20_000):
        ix.add_encoded(
            index,
            ix.encode_block(index, db[start : start + 20_000]),
            np.arange(start, min(start + 20_000, len(db))),
        )
    params, _ = ix.choose_search_params(index, "IVF2048_HNSW32,Flat", db[:0])
    assert params["quantizer_efSearch"] >= trained_ef
    assert quantizer.hnsw.efSearch == params["quantizer_efSearch"]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "OPQ8_32,IVF64,PQ8"])
def test_exact_cells_equal_faiss_flat_quantizer(factory, metric):
    """Encoding and searching an IVF with a flat quantizer find the cells by torch
    (`CellFinder`) instead of faiss: the same codes as faiss's `sa_encode` and the same
    results as faiss's own search, pre-transforms and residual codes included."""
    db = clustered(12_000, 32, 100, spread=1.0, seed=13)
    if metric == "ip":
        db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:300] + 0.05
    index = ix.build_index(factory, 32, metric, db[ix.sample_rows(len(db), 8000)], seed=0)
    codes = ix.encode_block(index, db)
    np.testing.assert_array_equal(codes, index.sa_encode(db))
    ix.add_encoded(index, codes, np.arange(len(db)))
    wrapped = ix.searchable(index)
    assert isinstance(wrapped, ix.ExactCellsIndex)
    for nprobe in (1, 8):
        ix.apply_search_params(wrapped, {"nprobe": nprobe})
        assert faiss.extract_index_ivf(index).nprobe == nprobe
        d_got, i_got = ix.search(wrapped, q, 10)
        d_want, i_want = ix.search(index, q, 10)
        np.testing.assert_array_equal(i_got, i_want)
        np.testing.assert_allclose(d_got, d_want, rtol=1e-4, atol=1e-4)  # float rounding


def _lloyd(x, k, seed, spherical, niter):
    """Reference k-means in float64 numpy, with `ix.kmeans`'s seeded initialisation."""
    rng = np.random.default_rng(seed)
    c = x[np.sort(rng.choice(len(x), k, replace=False))].astype(np.float64)
    x64 = x.astype(np.float64)
    for _ in range(niter):
        if spherical:
            assign = (x64 @ c.T).argmax(1)
        else:
            assign = ((x64[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x64)
        c = sums / np.maximum(counts, 1)[:, None]
        assert (counts > 0).all()  # the reference does not re-seed empty cells
        if spherical:
            c /= np.linalg.norm(c, axis=1, keepdims=True)
    return c


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_equals_plain_lloyd(spherical, monkeypatch):
    """`ix.kmeans` (torch matrix products, in slices) is Lloyd's algorithm with exact
    assignments: the same centroids as a float64 brute force from the same start."""
    x = clustered(3000, 16, 24, spread=0.3, seed=12)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(ix, "KMEANS_SCORES_BYTES", 4 * 24 * 700)  # several score slices
    monkeypatch.setattr(ix, "KMEANS_SLICE", 1000)  # several float64 sums
    got = ix.kmeans(x, 24, seed=5, spherical=spherical, niter=6)
    want = _lloyd(x, 24, seed=5, spherical=spherical, niter=6)
    np.testing.assert_allclose(got, want, atol=1e-5)


class Killed(Exception):
    """Stands for a SIGKILL right after a k-means checkpoint was written."""


def _kill_after_saves(monkeypatch, saves: int) -> list[int]:
    """Make `ix.kmeans` die right after its `saves`-th checkpoint; returns the iterations saved."""
    real, saved = ix._save_kmeans_checkpoint, []

    def save(path, key, done, *args):
        real(path, key, done, *args)
        saved.append(done)
        if len(saved) == saves:
            raise Killed

    monkeypatch.setattr(ix, "_save_kmeans_checkpoint", save)
    return saved


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_killed_after_any_iteration_resumes_to_the_uninterrupted_centroids(
    spherical, tmp_path, monkeypatch
):
    """A k-means (hours at 16M chunks) killed after an iteration and run again starts after that
    iteration and ends with the centroids of an uninterrupted run, bit for bit, also where empty
    cells drew random points (the random state is in the checkpoint)."""
    # 48 distinct points for 64 cells: every iteration leaves cells empty, which draw points
    x = np.repeat(clustered(48, 8, 6, spread=0.2, seed=2), 25, axis=0)
    if spherical:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    want = ix.kmeans(x, 64, seed=3, spherical=spherical, niter=6)
    path = tmp_path / "kmeans.npz"
    for saves, done in [(2, [1, 2]), (3, [3, 4, 5])]:  # killed after 2, then after 5
        with monkeypatch.context() as patch:
            saved = _kill_after_saves(patch, saves)
            with pytest.raises(Killed):
                ix.kmeans(x, 64, seed=3, spherical=spherical, niter=6, checkpoint=path)
        assert saved == done
    with monkeypatch.context() as patch:
        saved = _kill_after_saves(patch, 99)
        got = ix.kmeans(x, 64, seed=3, spherical=spherical, niter=6, checkpoint=path)
    assert saved == [6]  # only the last iteration ran again
    np.testing.assert_array_equal(got, want)
    with np.load(path) as state:
        assert int(state["done"]) == 6  # kept until the caller has saved the trained index
    assert not list(tmp_path.glob("*.tmp-*"))


@contextlib.contextmanager
def index_records():
    """The records `ix.logger` emits meanwhile (INFO and up), through a handler of the test's
    own: the CLI's set-up, in an earlier test, stops "retrolm" propagating to caplog."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level, propagate = ix.logger.level, ix.logger.propagate
    ix.logger.addHandler(handler)
    ix.logger.setLevel(logging.INFO)
    ix.logger.propagate = False  # these records are the test's alone
    try:
        yield records
    finally:
        ix.logger.removeHandler(handler)
        ix.logger.setLevel(level)
        ix.logger.propagate = propagate


def said(records: list[logging.LogRecord], text: str) -> bool:
    return any(text in r.getMessage() for r in records)


def test_kmeans_checkpoint_of_another_sample_or_seed_is_not_used(tmp_path, monkeypatch):
    x = clustered(1000, 8, 20, spread=0.2, seed=4)
    path = tmp_path / "kmeans.npz"
    with monkeypatch.context() as patch:
        _kill_after_saves(patch, 3)
        with pytest.raises(Killed):
            ix.kmeans(x, 16, seed=1, spherical=False, niter=5, checkpoint=path)
    other = x.copy()
    other[7, 3] += 1e-3  # one number differs
    for sample, seed in [(other, 1), (x, 2)]:
        with index_records() as records:
            got = ix.kmeans(sample, 16, seed=seed, spherical=False, niter=5, checkpoint=path)
        assert said(records, "another sample or setting")
        want = ix.kmeans(sample, 16, seed=seed, spherical=False, niter=5)
        np.testing.assert_array_equal(got, want)
    ix.kmeans(x, 16, seed=1, spherical=False, niter=5, checkpoint=path)  # 5 iterations saved
    with index_records() as records:
        got = ix.kmeans(x, 16, seed=1, spherical=False, niter=3, checkpoint=path)  # fewer asked
    assert said(records, "another sample or setting")
    np.testing.assert_array_equal(got, ix.kmeans(x, 16, seed=1, spherical=False, niter=3))
    path.write_bytes(b"not a checkpoint")
    with index_records() as records:
        got = ix.kmeans(x, 16, seed=1, spherical=False, niter=5, checkpoint=path)
    assert said(records, "unreadable")
    np.testing.assert_array_equal(got, ix.kmeans(x, 16, seed=1, spherical=False, niter=5))


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "OPQ4_16,IVF32,PQ4", "IVF32_HNSW8,Flat", "PQ4"])
def test_float16_sample_trains_the_index_its_float32_copy_trains(factory, monkeypatch):
    """`db build` hands the stored float16 embeddings to training as they are (half the memory
    of float32); the k-means reads them a slice at a time as float32, so the index is byte for
    byte the one their float32 copy trains."""
    x16 = clustered(4000, 16, 40, spread=0.5, seed=3).astype(np.float16)
    monkeypatch.setattr(ix, "KMEANS_SCORES_BYTES", 4 * 32 * 700)  # several score slices
    monkeypatch.setattr(ix, "CODES_TRAIN_SAMPLE", 1500)  # a codes subset too
    half = ix.build_index(factory, 16, "l2", x16, seed=1)
    full = ix.build_index(factory, 16, "l2", x16.astype(np.float32), seed=1)
    assert faiss.serialize_index(half).tobytes() == faiss.serialize_index(full).tobytes()


def test_streamed_exact_search_equals_flat_search():
    db = clustered(30_000, 32, 300, spread=1.0, seed=7)
    q = db[:100] + 0.01
    blocks = (
        (db[s : s + 4096], np.arange(s, min(s + 4096, len(db)))) for s in range(0, 30_000, 4096)
    )
    d_stream, i_stream = ix.exact_search_blocks(q, blocks, 10, "l2")
    d_flat, i_flat = _exact(db, q, "l2")
    np.testing.assert_array_equal(i_stream, i_flat)
    np.testing.assert_allclose(d_stream, d_flat, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_streamed_exact_search_equals_float64_brute_force(metric):
    """Uneven blocks (one of 7 rows, fewer than k; one empty), ids not 0..n, near-duplicate
    queries whose l2 distances are small: ids and distances as a float64 brute force gives."""
    x = clustered(9_007, 48, 90, spread=0.8, seed=11)
    ids = np.arange(len(x)) * 3 + 5
    q = np.concatenate([x[:40] + 1e-3, clustered(40, 48, 90, spread=0.8, seed=12)])
    cuts = [0, 4000, 4007, 4007, 9007]
    blocks = [(x[a:b], ids[a:b]) for a, b in zip(cuts, cuts[1:])]
    d, i = ix.exact_search_blocks(q, blocks, 10, metric)
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        full = ((q64[:, None, :] - x64[None]) ** 2).sum(-1)
    else:
        full = -(q64 @ x64.T)
    order = np.argsort(full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(i, ids[order])
    want = np.take_along_axis(full, order, axis=1)
    np.testing.assert_allclose(d, want if metric == "l2" else -want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "curve, chosen, probed",
    [
        # creeping, as 16M synthetic chunks did: stop where a doubling gains < TUNE_MIN_GAIN
        ({1: 0.80, 2: 0.88, 4: 0.884, 8: 0.95, 16: 0.96, 32: 0.97}, 2, [1, 2, 4]),
        # steady gains reach the target
        ({1: 0.80, 2: 0.88, 4: 0.92, 8: 0.951, 16: 0.96, 32: 0.97}, 8, [1, 2, 4, 8]),
        # flat from the start: the cheapest
        ({1: 0.90, 2: 0.902, 4: 0.95, 8: 0.96, 16: 0.97, 32: 0.98}, 1, [1, 2]),
    ],
)
def test_tuning_stops_where_recall_flattens(curve, chosen, probed, monkeypatch):
    """The tuning doubles nprobe until the target, the default, or a doubling that gains less
    than TUNE_MIN_GAIN; then picks the cheapest setting within TUNE_PLATEAU of the best tried.
    (A recall that creeps up with nprobe ran the 16M benchmark's tuning to nprobe 4096.)"""
    monkeypatch.setattr(ix, "TUNE_MIN_VECTORS", 0)
    db = clustered(20_000, 16, 200, spread=1.0, seed=3)
    index = built("IVF256,Flat", db, "l2")  # default nprobe: 256 / 8 = 32
    queries, true = db[:100], np.arange(1000).reshape(100, 10)
    asked = []

    def fake_search(index, queries, k, cells=None):  # ids whose recall is curve[nprobe]
        nprobe = int(ix.unwrap(index).nprobe)
        asked.append(nprobe)
        found = true.copy().ravel()
        found[round(curve[nprobe] * found.size) :] = -1
        return np.zeros(true.shape, np.float32), found.reshape(true.shape)

    monkeypatch.setattr(ix, "search", fake_search)
    with index_records() as records:
        params, recall = ix.choose_search_params(index, "IVF256,Flat", queries, true_ids=true)
    assert asked == probed
    assert params == {"nprobe": chosen} and recall == pytest.approx(curve[chosen])
    assert index.nprobe == chosen
    low = recall < ix.TUNE_LOW_RECALL
    assert [r.levelname for r in records] == ["WARNING" if low else "INFO"]
    assert f"tried: {', '.join(f'{v}: {curve[v]:.4f}' for v in probed)}" in records[0].getMessage()


def test_bad_inputs_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="faiss cannot build index 'NoSuchIndex9'"):
        ix.build_index("NoSuchIndex9", 16, "l2", None)
    with pytest.raises(InputError, match="unknown metric"):
        ix.build_index("Flat", 16, "cosine", None)
    with pytest.raises(InputError, match="needs training vectors"):
        ix.build_index("IVF16,Flat", 16, "l2", None)
    with pytest.raises(InputError, match="IVF cells"):
        ix.build_index("IVF64,Flat", 16, "l2", np.zeros((10, 16), np.float32))
    index = ix.build_index("Flat", 16, "l2", None)
    with pytest.raises(InputError, match="expects"):
        ix.add_vectors(index, np.zeros((3, 8), np.float32), np.arange(3))
    with pytest.raises(InputError, match="ids"):
        ix.add_vectors(index, np.zeros((3, 16), np.float32), np.arange(2))
    with pytest.raises(InputError, match="expects"):
        ix.search(index, np.zeros((3, 8), np.float32), 2)
    with pytest.raises(InputError, match="no faiss index"):
        ix.load_index(tmp_path / "missing.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index at all")
    with pytest.raises(CorruptArtifactError, match="not a readable faiss index"):
        ix.load_index(bad)
    good = tmp_path / "good.faiss"
    ix.add_vectors(index, np.ones((4, 16), np.float32), np.arange(4))
    ix.save_index(index, good)
    good.write_bytes(good.read_bytes()[:-20])  # truncated
    for mmap in (False, True):
        with pytest.raises(CorruptArtifactError):
            ix.load_index(good, mmap=mmap)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_reranked_pq_search_returns_exact_distances_and_beats_raw_codes(metric):
    """Re-ranking PQ candidates with the stored vectors: every returned distance is the exact
    one of its id, rows are sorted, and recall against exact search is far above the raw
    codes' at the same nprobe."""
    db = clustered(6000, 32, 60, spread=1.0, seed=9)
    q = db[:200] + 0.01
    index = built("OPQ8_32,IVF16,PQ8x4", db, metric, train_size=2000)
    ix.apply_search_params(index, {"nprobe": 4})
    _, true_rows = _exact(db, q, metric)
    raw = ix.recall_at_k(ix.search(index, q, 10)[1], true_rows)
    reranked = ix.RerankedIndex(index, lambda ids: db[ids], ix.RERANK_FACTOR)
    dists, found = ix.search(reranked, q, 10)
    assert (found >= 0).all()
    if metric == "ip":
        exact = np.einsum("nkd,nd->nk", db[found], q)
        assert (np.diff(dists, axis=1) <= 1e-6).all()  # best first
    else:
        exact = ((db[found] - q[:, None]) ** 2).sum(-1)
        assert (np.diff(dists, axis=1) >= -1e-6).all()
    np.testing.assert_allclose(dists, exact, rtol=1e-5, atol=1e-5)
    assert ix.recall_at_k(found, true_rows) >= raw + 0.2, (raw, ix.recall_at_k(found, true_rows))
    # the wrapper passes search parameters through to the index it wraps
    ix.apply_search_params(reranked, {"nprobe": 16, ix.K_FACTOR: 2})
    assert reranked.k_factor == 2 and faiss.extract_index_ivf(index).nprobe == 16


def test_reranking_fewer_vectors_than_asked():
    db = clustered(300, 16, 4, spread=1.0, seed=10)
    index = ix.build_index("IVF4,PQ4x4", 16, "l2", db, seed=0)
    ix.add_vectors(index, db[:5], np.arange(5))
    ix.apply_search_params(index, {"nprobe": 4})
    dists, ids = ix.search(ix.RerankedIndex(index, lambda i: db[i], 4), db[:3], 8)
    assert sorted(ids[0][:5]) == [0, 1, 2, 3, 4] and (ids[:, 5:] == -1).all()
    assert np.isinf(dists[:, 5:]).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_reranking_where_some_lists_are_shorter_than_asked(metric):
    """At nprobe 1 a query whose cell holds fewer vectors than the k_factor * k candidates asked
    gets -1s among them, in the same slice as queries that get all: each query's result is
    its raw candidates ranked by exact distance (float64), padded with -1 / worst distance."""
    sizes = [2, 3, 40, 60]  # cells shorter than the 8 results asked (and the 8 * 4 candidates)
    db = np.concatenate(
        [c + 0.05 * np.random.default_rng(i).standard_normal((n, 16)).astype(np.float32)
         for i, (n, c) in enumerate(zip(sizes, 4 * np.eye(16, dtype=np.float32)[:4]))]
    )  # fmt: skip
    if metric == "ip":
        db /= np.linalg.norm(db, axis=1, keepdims=True)
    index = ix.build_index("IVF4,Flat", 16, metric, db, seed=0)
    ix.add_vectors(index, db, np.arange(len(db)) * 3 + 1)  # ids that are not rows
    ix.apply_search_params(index, {"nprobe": 1})
    vectors = {i * 3 + 1: v.astype(np.float64) for i, v in enumerate(db)}
    queries = db[[0, 4, 10, 70, 1, 9]] + 0.01  # short and full cells mixed in one slice
    reranked = ix.RerankedIndex(index, lambda ids: np.stack([vectors[i] for i in ids]), 4)
    dists, ids = ix.search(reranked, queries, 8)
    _, candidates = ix.search(index, queries, 32)
    for q, row_ids, row_dists, cands in zip(queries, ids, dists, candidates):
        cands = cands[cands >= 0]
        exact = np.array([
            -(vectors[c] @ q) if metric == "ip" else ((vectors[c] - q) ** 2).sum() for c in cands
        ])  # fmt: skip
        want = cands[np.argsort(exact, kind="stable")[:8]]
        assert list(row_ids[: len(want)]) == list(want)
        assert (row_ids[len(want) :] == -1).all()
        want_dists = np.sort(exact)[: len(want)] * (-1 if metric == "ip" else 1)
        np.testing.assert_allclose(row_dists[: len(want)], want_dists, rtol=1e-5, atol=1e-6)
        worst = -np.inf if metric == "ip" else np.inf
        assert (row_dists[len(want) :] == worst).all()
    assert (ids == -1).any() and (ids != -1).all(axis=1).any()  # both kinds were searched


def test_tuning_compressed_codes_with_reranking(monkeypatch):
    """With the stored vectors at hand, compressed indexes record k_factor and are tuned with
    re-ranking: the target recall at a small nprobe, where the raw codes plateau far below."""
    monkeypatch.setattr(ix, "TUNE_MIN_VECTORS", 1000)
    db = clustered(6000, 32, 60, spread=1.0, seed=11)
    q = db[ix.sample_rows(len(db), 300, 1)]
    factory = "OPQ8_32,IVF64,PQ8"
    _, true_rows = _exact(db, q, "ip")
    index = built(factory, db, "ip", train_size=4000)
    raw_params, raw_recall = ix.choose_search_params(index, factory, q, true_ids=true_rows)
    assert ix.K_FACTOR not in raw_params  # nothing to re-rank with
    params, recall = ix.choose_search_params(
        index, factory, q, true_ids=true_rows, vectors_of=lambda ids: db[ids]
    )
    assert params[ix.K_FACTOR] == ix.RERANK_FACTOR
    assert recall >= ix.TUNE_TARGET_RECALL > raw_recall + 0.2
    assert params["nprobe"] <= ix.default_search_params(factory, len(db))["nprobe"]
    # flat (uncompressed) codes are exact already: no re-ranking recorded
    flat = built("IVF64,Flat", db, "ip")
    assert (
        ix.K_FACTOR
        not in ix.choose_search_params(
            flat, "IVF64,Flat", q, true_ids=true_rows, vectors_of=lambda ids: db[ids]
        )[0]
    )
