"""faiss indexes over chunk embeddings: pick a factory by size, train, fill, search, save, load.

All functions are pure apart from `save_index`; the database stages call them block by block.
Ids are global chunk ids (int64), so an index can be filled from any number of embedding blocks
and searched without a separate id table.

Distances follow faiss: for metric "ip" (normalized embeddings) they are inner products (higher
is closer); for metric "l2" they are squared Euclidean distances (lower is closer). Where an
index has fewer than k results for a query the id is -1 and the distance is -inf ("ip") or +inf
("l2").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrolm.database.config import DatabaseConfig
from retrolm.errors import CorruptArtifactError, InputError
from retrolm.io import atomic_path

logger = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# Below this many vectors an exact search is cheap enough (about 1 ms per query per 100k x 384).
EXACT_MAX_VECTORS = 100_000
# Training points per IVF centroid and per PQ centroid (256 per codebook; faiss warns below 39),
# up to `db build`'s default --index-train-size, 4M (3 GB at 384-d as float16): 64 per cell at
# 65536 cells (16M vectors).
POINTS_PER_CENTROID = 64
MAX_TRAIN_SAMPLE = DatabaseConfig.index_train_size
# IVF cells hold about this many vectors (more cells as the database grows), so that a probe
# scans the same number of codes at any size and the neighbour stage's time per chunk stays flat.
CELL_VECTORS = 256
MAX_NLIST = 1 << 16


def _metric_type(metric: str) -> int:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}: use 'ip' (normalized embeddings) or 'l2'")
    return METRICS[metric]


def metric_of(index: faiss.Index) -> str:
    """The metric name ("ip" or "l2") of a faiss index."""
    return "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"


def ivf_nlist(num_vectors: int) -> int:
    """Number of IVF cells: a power of two near the larger of 4 * sqrt(num_vectors) (faiss's
    rule for small indexes) and num_vectors / `CELL_VECTORS`, between 64 and `MAX_NLIST`."""
    n = max(num_vectors, 1)
    target = max(4 * math.sqrt(n), n / CELL_VECTORS)
    return int(min(MAX_NLIST, max(64, 2 ** round(math.log2(target)))))


def ivf_prefix(num_vectors: int) -> str:
    """The coarse part of an auto-chosen IVF factory: `IVF{nlist}`, a flat quantizer at every
    size. Its cells are found by exact matrix products (`CellFinder`): at 16384 cells that
    cost 78 us a vector on 2 cores here, where an HNSW quantizer needed efSearch 128 (491 us)
    to find the nearest cell of 99% of the benchmark's vectors (docs/results.md, the section on
    the database at scale)."""
    return f"IVF{ivf_nlist(num_vectors)}"


def choose_factory(num_vectors: int, dim: int, memory_budget_bytes: int) -> str:
    """Pick a faiss index_factory string for `num_vectors` vectors of `dim` floats.

    - `Flat` (exact) when there are fewer than 100k vectors and they fit the budget;
    - otherwise IVF (`ivf_prefix`: cells of about `CELL_VECTORS` vectors) over the most precise
      codes whose bytes (plus 8-byte ids) fit the budget: `SQ8` (1 byte per dimension), `SQ4`,
      then `OPQ{M}_{D},...,PQ{M}` (M bytes per vector, for the largest M that fits).

    Every code is compressed: searches re-rank their candidates with the stored embeddings
    (`RerankedIndex`), so the stored neighbours carry exact distances while the index holds
    a quarter (SQ8) or less of the raw vectors' bytes.

    Args:
        num_vectors: how many vectors the index will hold.
        dim: vector dimension.
        memory_budget_bytes: memory the index may use when searched.

    Raises:
        InputError: for non-positive sizes or a budget too small even for 8-byte codes.
    """
    if num_vectors <= 0 or dim <= 0 or memory_budget_bytes <= 0:
        raise InputError(
            f"choose_factory needs positive sizes, got num_vectors={num_vectors}, dim={dim}, "
            f"memory_budget_bytes={memory_budget_bytes}"
        )
    raw_bytes = num_vectors * (dim * 4 + 8)  # vectors plus int64 ids
    if raw_bytes <= memory_budget_bytes and num_vectors < EXACT_MAX_VECTORS:
        return "Flat"
    ivf = ivf_prefix(num_vectors)
    for bits in (8, 4):
        if num_vectors * (-(-dim * bits // 8) + 8) <= memory_budget_bytes:
            return f"{ivf},SQ{bits}"
    for m in (64, 48, 32, 24, 16, 8):
        if m <= dim and num_vectors * (m + 8) <= memory_budget_bytes:
            # OPQ rotates into D = 4M dimensions (at most dim), a multiple of M as PQ requires.
            d_out = min(4 * m, dim - dim % m)
            return f"OPQ{m}_{d_out},{ivf},PQ{m}"
    raise InputError(
        f"an index of {num_vectors} vectors needs at least {num_vectors * 16} bytes "
        f"(8-byte codes and ids) but the memory budget is {memory_budget_bytes} bytes: "
        "raise --index-memory"
    )


def training_sample_size(factory: str, num_vectors: int, most: int = MAX_TRAIN_SAMPLE) -> int:
    """How many vectors to train `factory` on: `POINTS_PER_CENTROID` a cell (and a codebook
    centroid), at most `most` (`--index-train-size`) and `num_vectors`; 0 when it needs no
    training. The default `most`, 4M, gives 65536 cells 64 points each; 2M would give them 32,
    and such cells split ~9% of the benchmark's true neighbours at 16M chunks (docs/results.md,
    the section on the database at scale)."""
    need = 0
    if m := re.search(r"IVF(\d+)", factory):
        need = max(need, POINTS_PER_CENTROID * int(m.group(1)))
    if re.search(r"PQ\d+", factory):
        need = max(need, POINTS_PER_CENTROID * 256)
    if "OPQ" in factory or re.search(r"PCA", factory):
        need = max(need, 20_000)
    return min(num_vectors, need, most)


def sample_rows(num_vectors: int, sample_size: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a seeded random sample (sorted so blocks are read in order)."""
    rng = np.random.default_rng(seed)
    size = min(sample_size, num_vectors)
    return np.sort(rng.choice(num_vectors, size=size, replace=False)).astype(np.int64)


def _configure_training(index: Any, seed: int) -> None:
    """Seed every k-means inside `index` so that training is reproducible, and bound its cost.

    OPQ runs 20 alternations (faiss's default of 50 gains little after ~10 and costs minutes
    on large training samples); polysemous code ordering is skipped (searches never use it).
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf = faiss.downcast_index(ivf)
        pq = getattr(ivf, "pq", None)
        if pq is not None:
            pq.cp.seed = seed + 1
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = 20


KMEANS_ITERATIONS = 10  # as faiss trains IVF centroids
KMEANS_SCORES_BYTES = 256 << 20  # a slice's (rows, k) float32 scores in the exact k-means
KMEANS_SLICE = 1 << 14  # sample rows summed in float64 at once (one 24 MB buffer at 384-d)
# The codes (SQ ranges, PQ codebooks: 256 centroids each) train on at most this many of the
# sample's vectors: faiss computes the residuals of every training vector, a second copy of a
# sample that reaches 3 GB at 2M x 384 floats. faiss's PQ k-means uses at most 256 x 256 points
# anyway; at 256k rows the subset and its residuals would be 768 MB of the 4M benchmark's peak.
CODES_TRAIN_SAMPLE = 1 << 16
QUANTIZER_EF_SEARCH = 64  # HNSW quantizer: the least efSearch a search gives it
# An HNSW quantizer's efSearch for assigning vectors to cells (encode, add, k-means is exact):
# the least power of two from 16 whose nearest cell equals the exact one for this share of a
# sample. faiss's default (16) put a third of the vectors of a 16384-cell index in the wrong
# cell on the benchmark's data (equidistant topics, the hard case for a graph): recall 0.88 at
# any nprobe.
ASSIGN_AGREEMENT = 0.99
ASSIGN_SAMPLE = 4096
MAX_ASSIGN_EF = 4096


def _hnsw_quantizer(index: Any) -> Any:
    """The HNSW coarse quantizer of an `IVF{n}_HNSW{m}` index (through a pre-transform), or None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def _single_threaded_add(index: Any, vectors: np.ndarray) -> None:
    """Add to an HNSW graph on one thread: faiss's parallel add takes locks per node, so its
    links may depend on timing, and the same build must give the same index (resume, ranks).
    (Four 2-thread builds of a 4096-vector graph were byte-identical here: a precaution.)"""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(vectors)
    finally:
        faiss.omp_set_num_threads(threads)


def _nearest(x: Any, centroids: Any, half_norms: Any, n: int) -> tuple[Any, Any]:
    """The n nearest centroids of each row of `x` by exact float32 matrix products (torch,
    on the centroids' device), a slice of rows at a time so that the (rows, k) scores stay
    within `KMEANS_SCORES_BYTES`. Scores are inner products, minus |c|^2 / 2 for l2
    (`half_norms`, None for ip): higher is nearer. Returns (scores (len, n), ids (len, n))."""
    import torch

    rows = max(1, min(len(x), KMEANS_SCORES_BYTES // (4 * centroids.shape[0])))
    top_scores = torch.empty((len(x), n), dtype=torch.float32, device=centroids.device)
    top_ids = torch.empty((len(x), n), dtype=torch.int64, device=centroids.device)
    # one buffer for every slice: a fresh product per slice holds two slices at once (the next
    # computed before the last is freed), 512 MB of the 1M benchmark's 1.1 GB training peak
    buffer = torch.empty((rows, centroids.shape[0]), dtype=torch.float32, device=centroids.device)
    # a float16 sample's slices as float32, into one buffer too (fresh ones fragment the heap)
    as_float = (
        None if x.dtype == torch.float32 else torch.empty((rows, x.shape[1]), device=x.device)
    )
    for start in range(0, len(x), rows):
        part = x[start : start + rows]
        if as_float is not None:
            part = as_float[: len(part)].copy_(part)
        scores = torch.matmul(part, centroids.T, out=buffer[: len(part)])
        if half_norms is not None:  # l2: |x - c|^2 = |x|^2 - 2 (x.c - |c|^2 / 2)
            scores -= half_norms
        if n == 1:
            top_scores[start : start + rows, 0], top_ids[start : start + rows, 0] = scores.max(1)
        else:
            top_scores[start : start + rows], top_ids[start : start + rows] = scores.topk(n, 1)
    return top_scores, top_ids


def nearest_centroids(x: Any, centroids: Any, *, spherical: bool) -> Any:
    """Exact nearest centroid of each row (torch tensors on one device): int64 (n,)."""
    half_norms = None if spherical else 0.5 * (centroids * centroids).sum(1)
    return _nearest(x, centroids, half_norms, 1)[1][:, 0]


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    spherical: bool,
    niter: int = KMEANS_ITERATIONS,
    device: str = "cpu",
    checkpoint: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Lloyd's k-means with exact assignments, computed as float32 matrix products by torch.

    The IVF centroids of every index with a flat or HNSW quantizer. Exact assignment costs
    2 k d flops per point and iteration, which torch's matrix product runs at ~200 GFLOP/s on
    2 cores here, ~6x faiss's own flat search (~33 GFLOP/s, measured side by side); assigning
    through a graph over the centroids is cheaper only where the graph needs few candidates,
    which the benchmark's data does not allow (efSearch 32 put 15% of the points of a
    16384-cell k-means in a wrong cell). `device` may be a GPU.
    Initialised with k seeded sample points; a cell left empty takes a seeded random point, as
    faiss's k-means re-seeds empty cells; sums are accumulated in float64 in row order.

    With `checkpoint` (a file path), the centroids and the random state are saved there
    (atomically) after every iteration, and a call that finds a checkpoint of the same sample,
    k, seed and metric starts after its iteration: a k-means killed at any moment and run again
    gives the centroids of an uninterrupted one. The caller deletes the file once the trained
    index is saved (at 16M chunks one iteration took ~17 minutes on 2 cores here).

    Returns:
        (k, d) float32 centroids (unit norm when `spherical`).
    """
    import torch

    x = _training_array(x)  # float16 stays so: read a slice at a time as float32 below
    n, d = x.shape
    if n < k:
        raise InputError(
            f"k-means of {k} index cells needs at least {k} training vectors, got {n}: "
            "raise --index-train-size"
        )
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(x).to(device)
    key = _kmeans_key(x, k, seed, spherical) if checkpoint is not None else ""
    done, spent = 0, 0.0  # iterations and seconds before this call (a resumed k-means)
    resumed = _load_kmeans_checkpoint(checkpoint, key, (k, d), niter) if checkpoint else None
    if resumed is not None:
        done, spent, saved, rng.bit_generator.state = resumed
        centroids = torch.from_numpy(saved).to(xt.device)
        logger.info("k-means resumed after iteration %d of %d from %s", done, niter, checkpoint)
    else:
        first = torch.from_numpy(np.sort(rng.choice(n, k, replace=False))).to(xt.device)
        centroids = xt[first].float()  # a copy (indexed rows), float32
    wide = torch.empty((min(n, KMEANS_SLICE), d), dtype=torch.float64, device=xt.device)
    for iteration in range(done, niter):
        started = time.perf_counter()
        assign = nearest_centroids(xt, centroids, spherical=spherical)
        sums = torch.zeros((k, d), dtype=torch.float64, device=xt.device)
        for start in range(0, n, KMEANS_SLICE):  # float64 a slice at a time, not a 2x copy
            part = xt[start : start + KMEANS_SLICE]
            sums.index_add_(0, assign[start : start + len(part)], wide[: len(part)].copy_(part))
        counts = torch.bincount(assign, minlength=k)
        centroids = (sums / counts.clamp(min=1)[:, None].double()).float()
        empty = np.flatnonzero(counts.cpu().numpy() == 0)
        if len(empty):
            pick = torch.from_numpy(rng.choice(n, len(empty), replace=False)).to(xt.device)
            centroids[torch.from_numpy(empty).to(xt.device)] = xt[pick].float()
        if spherical:
            centroids /= centroids.norm(dim=1, keepdim=True).clamp(min=1e-12)
        spent += time.perf_counter() - started
        if checkpoint is not None:
            _save_kmeans_checkpoint(checkpoint, key, iteration + 1, spent, centroids, rng)
        logger.info(
            "k-means of %d vectors into %d cells: iteration %d of %d, %.1f s, %d empty cells",
            n,
            k,
            iteration + 1,
            niter,
            time.perf_counter() - started,
            len(empty),
        )
    if resumed is not None:
        logger.info("k-means: %.1f s over its %d iterations, in all its runs", spent, niter)
    return centroids.cpu().numpy()


def _kmeans_key(x: np.ndarray, k: int, seed: int, spherical: bool) -> str:
    """What a k-means checkpoint must match: the sample's bytes, shape and dtype, k, seed and
    metric (sha256; ~2 s for a 3 GB sample, against hours of k-means)."""
    digest = hashlib.sha256(f"{x.shape} {x.dtype} {k} {seed} {spherical}".encode())
    view = x.reshape(-1).view(np.uint8)
    step = 1 << 28
    for start in range(0, len(view), step):
        digest.update(view[start : start + step])
    return digest.hexdigest()


def _save_kmeans_checkpoint(
    path: str | os.PathLike[str],
    key: str,
    done: int,
    seconds: float,
    centroids: Any,
    rng: np.random.Generator,
) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            centroids=centroids.cpu().numpy(),
            done=np.int64(done),
            seconds=np.float64(seconds),
            key=np.str_(key),
            rng=np.str_(json.dumps(rng.bit_generator.state)),
        )


def _load_kmeans_checkpoint(
    path: str | os.PathLike[str], key: str, shape: tuple[int, int], niter: int
) -> tuple[int, float, np.ndarray, dict] | None:
    """(iterations done, their seconds, centroids, random state) of the checkpoint at `path`,
    or None when there is none or it belongs to another k-means (logged; it starts afresh)."""
    if not Path(path).is_file():
        return None
    try:
        with np.load(path) as saved:
            found = (
                str(saved["key"]),
                int(saved["done"]),
                saved["centroids"],
                str(saved["rng"]),
                float(saved["seconds"]),
            )
    except (OSError, ValueError, KeyError, EOFError) as e:
        logger.warning("k-means checkpoint %s unreadable (%s): starting afresh", path, e)
        return None
    if found[0] != key or found[2].shape != shape or found[1] > niter:
        logger.warning(
            "k-means checkpoint %s is of another sample or setting: starting afresh", path
        )
        return None
    return found[1], found[4], np.ascontiguousarray(found[2], np.float32), json.loads(found[3])


def assignment_ef(quantizer: Any, sample: np.ndarray) -> tuple[int, float]:
    """The least efSearch (16, 32, ... `MAX_ASSIGN_EF`) at which the HNSW `quantizer` gives
    the exact nearest cell of at least `ASSIGN_AGREEMENT` of `sample`'s rows; left set on the
    quantizer (a saved index keeps it, and faiss assigns with it when vectors are encoded or
    added). Returns (efSearch, agreement reached)."""
    import torch

    x = np.ascontiguousarray(sample[:ASSIGN_SAMPLE], dtype=np.float32)
    centroids = faiss.rev_swig_ptr(
        faiss.downcast_index(quantizer.storage).get_xb(), quantizer.ntotal * quantizer.d
    ).reshape(quantizer.ntotal, quantizer.d)
    spherical = quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    exact = nearest_centroids(
        torch.from_numpy(x), torch.from_numpy(np.array(centroids)), spherical=spherical
    ).numpy()
    ef, agreement = 16, 0.0
    while True:
        quantizer.hnsw.efSearch = ef
        agreement = float(np.mean(quantizer.search(x, 1)[1][:, 0] == exact))
        if agreement >= ASSIGN_AGREEMENT or ef >= MAX_ASSIGN_EF:
            return ef, agreement
        ef *= 2


def _train_ivf(
    index: Any,
    sample: np.ndarray,
    seed: int,
    device: str = "cpu",
    checkpoint: str | os.PathLike[str] | None = None,
) -> None:
    """Train an IVF index with a flat or HNSW quantizer (optionally behind a pre-transform
    such as OPQ): the transforms on the sample, the centroids by the exact `kmeans` (torch;
    faiss's own k-means runs its flat search at ~1/6 of the speed here), added to the
    quantizer (an HNSW graph on one thread, its assignment efSearch measured by
    `assignment_ef`), then the codes (SQ / PQ) by faiss on the transformed sample."""
    inner = faiss.downcast_index(index)
    x = sample
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            vt.train(x)
            x = vt.apply(x)
        ivf = faiss.downcast_index(inner.index)
    else:
        ivf = inner
    centroids = kmeans(
        x,
        ivf.nlist,
        seed=seed,
        spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT,
        device=device,
        checkpoint=checkpoint,
    )
    quantizer = _hnsw_quantizer(index)
    if quantizer is None:
        ivf.quantizer.add(centroids)
    else:
        _single_threaded_add(quantizer, centroids)
        rows = np.random.default_rng(seed + 2).choice(len(x), min(len(x), ASSIGN_SAMPLE), False)
        ef, agreement = assignment_ef(quantizer, x[np.sort(rows)])
        logger.info(
            "HNSW quantizer of %d cells: assignment efSearch %d (nearest cell exact for %.4f "
            "of a sample)",
            ivf.nlist,
            ef,
            agreement,
        )
    ivf.quantizer.is_trained = True
    if len(x) > CODES_TRAIN_SAMPLE:  # residual codes copy their sample: a seeded share will do
        keep = np.random.default_rng(seed + 3).choice(len(x), CODES_TRAIN_SAMPLE, replace=False)
        x = x[np.sort(keep)]
    ivf.train(x)  # the quantizer holds nlist centroids: faiss trains only the codes now
    index.is_trained = True


def _trains_own_centroids(index: Any) -> bool:
    """Whether `_train_ivf` trains `index`: an IVF whose quantizer is flat or HNSW."""
    return _flat_quantized(index) is not None or _hnsw_quantizer(index) is not None


def _supports_ids(index: Any) -> bool:
    """Whether add_with_ids works on `index` (IVF indexes store ids themselves)."""
    return faiss.try_extract_index_ivf(index) is not None or isinstance(
        faiss.downcast_index(index), faiss.IndexIDMap | faiss.IndexIDMap2
    )


def _training_array(sample: Any) -> np.ndarray:
    """A training sample as float16 when given so (half the memory; `kmeans` reads it a slice
    at a time as float32) and float32 otherwise."""
    sample = np.asarray(sample)
    if sample.dtype == np.float16:
        return np.ascontiguousarray(sample)
    return np.ascontiguousarray(sample, dtype=np.float32)


def build_index(
    factory: str,
    dim: int,
    metric: str,
    train_sample: np.ndarray | None,
    *,
    seed: int = 0,
    device: str = "cpu",
    checkpoint: str | os.PathLike[str] | None = None,
) -> faiss.Index:
    """Create an empty, trained faiss index that accepts global chunk ids.

    Args:
        factory: any faiss `index_factory` string ("Flat", "IVF1024,Flat", "HNSW32", ...).
        dim: vector dimension.
        metric: "ip" or "l2".
        train_sample: (n, dim) float32 or float16 vectors to train on (a seeded random sample
            of the database, see `sample_rows`); may be None for indexes that need no training.
        seed: seed of the k-means / PQ training.
        device: torch device of the IVF k-means (`kmeans`), e.g. "cuda:0".
        checkpoint: file where the IVF k-means saves its state after every iteration and
            resumes from (`kmeans`); the caller deletes it once the trained index is saved.

    Returns:
        A trained index with no vectors; indexes that cannot store ids are wrapped in IDMap2.

    Raises:
        InputError: a factory string faiss does not accept, or a missing / too small sample.
    """
    metric_type = _metric_type(metric)
    try:
        index = faiss.index_factory(dim, factory, metric_type)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise InputError(
            f"faiss cannot build index {factory!r} for dimension {dim}: {first}; "
            "see https://github.com/facebookresearch/faiss/wiki/The-index-factory"
        ) from None
    if not _supports_ids(index):
        index = faiss.index_factory(dim, "IDMap2," + factory, metric_type)
    if not index.is_trained:
        if train_sample is None or len(train_sample) == 0:
            raise InputError(f"index {factory!r} needs training vectors, but none were given")
        sample = _training_array(train_sample)
        if sample.ndim != 2 or sample.shape[1] != dim:
            raise InputError(f"training sample has shape {sample.shape}, expected (n, {dim})")
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(sample) < ivf.nlist:
            raise InputError(
                f"index {factory!r} has {ivf.nlist} IVF cells but only {len(sample)} training "
                "vectors: use fewer cells or a smaller database index (--index Flat)"
            )
        _configure_training(index, seed)
        logger.info("training the faiss index %s on %d vectors", factory, len(sample))
        try:
            if _trains_own_centroids(index):
                _train_ivf(index, sample, seed, device, checkpoint)
            else:
                index.train(sample)  # faiss's wrapper takes float16 as float32
        except RuntimeError as e:
            raise InputError(f"training index {factory!r} failed: {str(e).strip()}") from None
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add one block of vectors with their global ids (int64) to `index`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or vectors.shape[1] != index.d:
        raise InputError(f"vectors have shape {vectors.shape}, index expects (n, {index.d})")
    if len(ids) != len(vectors):
        raise InputError(f"{len(vectors)} vectors but {len(ids)} ids")
    if _code_target(index) is not None:  # one way into an IVF: its cells as `encode_block` finds
        if len(ids):
            add_encoded(index, encode_block(index, vectors), ids)
        return
    index.add_with_ids(vectors, ids)


def _code_target(index: faiss.Index) -> Any:
    """The index that takes `sa_encode` codes through `add_sa_codes`, or None.

    IVF indexes do (the codes carry the list number); an OPQ / PCA pre-transform in front of
    one does too, its inner IVF index taking the codes that the outer `sa_encode` makes.
    Flat (IDMap2) and HNSW indexes do not: their blocks are passed on as float32 vectors.
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexIVF) else None


# Nearest cells kept per encoded vector (`encode_with_cells`), for the neighbour stage to search
# the same vectors without finding them again: 8 bytes each, 128 bytes a chunk until it ends.
KEPT_CELLS = 16
# the nearest cells of some vectors, nearest first: (coarse distances (n, c) float32, cell ids
# (n, c) int; -1 ids where unknown)
Cells = tuple[np.ndarray, np.ndarray]


def _flat_quantized(index: Any) -> Any:
    """The IVF inside `index` when its coarse quantizer is a flat (exact) index, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    return ivf if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat) else None


class CellFinder:
    """The nearest IVF cells of vectors, found by exact float32 matrix products in torch.

    What faiss's flat coarse quantizer computes, ~6x faster on this CPU (torch's matrix product
    ran at ~200 GFLOP/s on 2 cores, faiss's flat search at ~33, side by side), and on a GPU
    when `device` is one. Encoding and searching an IVF index with a flat quantizer go through
    it (`encode_block`, `ExactCellsIndex`); faiss then encodes (`encode_vectors`) and scans
    (`search_preassigned`) the cells it names, as its own search would.
    """

    def __init__(self, index: faiss.Index, device: str = "cpu") -> None:
        import torch

        ivf = _flat_quantized(index)
        if ivf is None:
            raise InputError("CellFinder needs an IVF index with a flat coarse quantizer")
        self.ivf = ivf
        inner = faiss.downcast_index(index)
        self.transforms = (
            [faiss.downcast_VectorTransform(inner.chain.at(i)) for i in range(inner.chain.size())]
            if isinstance(inner, faiss.IndexPreTransform)
            else []
        )
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        self.l2 = ivf.metric_type == faiss.METRIC_L2
        self.centroids = torch.from_numpy(centroids).to(device)
        self.half_norms = 0.5 * (self.centroids * self.centroids).sum(1) if self.l2 else None

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """`vectors` through the index's pre-transforms (OPQ, PCA): what the IVF sees."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        for vt in self.transforms:
            x = vt.apply(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def cells(self, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The `n` nearest cells of each transformed row, nearest first, with faiss's coarse
        distances (inner products for ip, squared L2 for l2): ((rows, n) float32, int64)."""
        import torch

        xt = torch.from_numpy(x).to(self.centroids.device)
        scores, ids = _nearest(xt, self.centroids, self.half_norms, n)
        if self.l2:  # |x|^2 - 2 (x.c - |c|^2 / 2)
            scores = (xt * xt).sum(1, keepdim=True) - 2 * scores
        return scores.cpu().numpy(), ids.cpu().numpy()


class SearchWrapper:
    """A faiss index (`self.index`) behind a search of its own: its size, dimension and
    metric read through, so that it stands wherever a faiss index is searched."""

    index: Any

    def search(
        self, queries: np.ndarray, k: int, cells: Cells | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric_type(self) -> int:
        return int(self.index.metric_type)


class ExactCellsIndex(SearchWrapper):
    """An IVF index with a flat coarse quantizer, searched with its cells from `CellFinder`.

    Returns what the wrapped index's own `search` returns (the same cells, scanned by faiss's
    `search_preassigned`); stands wherever a faiss index is searched. Search parameters
    (nprobe) are set on the wrapped index (`apply_search_params` does).
    """

    def __init__(self, index: faiss.Index, device: str = "cpu") -> None:
        self.index, self.finder = index, CellFinder(index, device)

    def search(
        self, queries: np.ndarray, k: int, cells: Cells | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`k` nearest of each query; `cells`, when given, are each query's nearest cells as
        `CellFinder.cells` gave them (nearest first, at least nprobe columns; rows whose first
        cell is -1 are found here), so that searching a chunk encoded earlier (the neighbour
        stage) does not find its cells a second time."""
        ivf = self.finder.ivf
        x = self.finder.transform(queries)
        nprobe = max(1, min(int(ivf.nprobe), int(ivf.nlist)))
        if cells is None or cells[1].shape[1] < nprobe:
            coarse_dis, found = self.finder.cells(x, nprobe)
        else:
            coarse_dis = np.array(cells[0][:, :nprobe], dtype=np.float32)  # copies: filled below
            found = np.array(cells[1][:, :nprobe], dtype=np.int64)
            missing = np.flatnonzero(found[:, 0] < 0)
            if len(missing):
                coarse_dis[missing], found[missing] = self.finder.cells(x[missing], nprobe)
        # faiss runs search_preassigned on one thread at parallel_mode 0 (IndexIVF.search
        # spreads the queries over threads itself before calling it); 3 spreads the queries
        mode = int(ivf.parallel_mode)
        ivf.parallel_mode = 3
        try:
            return ivf.search_preassigned(x, k, found, coarse_dis)
        finally:
            ivf.parallel_mode = mode


def searchable(index: faiss.Index, device: str = "cpu") -> Any:
    """`index` as searches should use it: an IVF with a flat quantizer as an `ExactCellsIndex`
    (its cells found by torch), any other index as it is."""
    return ExactCellsIndex(index, device) if _flat_quantized(index) is not None else index


def encode_block(index: faiss.Index, vectors: np.ndarray, device: str = "cpu") -> np.ndarray:
    """One block of vectors as the codes `add_encoded` adds: (n, code_size) uint8 `sa_encode`
    codes for IVF indexes, the float32 vectors themselves for the others.

    Encoding is the costly part of an add (the coarse assignment, by `CellFinder` on `device`
    where the quantizer is flat, and the compression), and it needs only the trained index, so
    ranks encode their blocks in parallel; adding the codes in block order then gives the very
    index a serial `add_vectors` of the blocks gives.
    """
    return encode_with_cells(index, vectors, 1, device)[0]


def encode_with_cells(
    index: faiss.Index, vectors: np.ndarray, keep: int, device: str = "cpu"
) -> tuple[np.ndarray, Cells | None]:
    """`encode_block`'s codes, and where `CellFinder` found the cells (a flat quantizer), each
    vector's `keep` nearest cells with their coarse distances ((n, keep) float32 and int32),
    for a later search of the same vectors (`ExactCellsIndex.search`); None otherwise."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != index.d:
        raise InputError(f"vectors have shape {vectors.shape}, index expects (n, {index.d})")
    target = _code_target(index)
    if target is None or len(vectors) == 0:
        return vectors, None
    if _flat_quantized(index) is None:  # e.g. an HNSW quantizer: faiss assigns the cells
        return index.sa_encode(vectors), None
    finder = CellFinder(index, device)
    x = finder.transform(vectors)
    coarse_dis, cells = finder.cells(x, max(1, min(keep, int(target.nlist))))
    nearest = np.ascontiguousarray(cells[:, 0])
    codes = np.empty((len(x), index.sa_code_size()), dtype=np.uint8)
    target.encode_vectors(
        len(x), faiss.swig_ptr(x), faiss.swig_ptr(nearest), faiss.swig_ptr(codes), True
    )
    return codes, (coarse_dis.astype(np.float32), cells.astype(np.int32))


def reserve_lists(index: faiss.Index, counts: np.ndarray) -> bool:
    """Make room in each inverted list of `index` for `counts[l]` more entries at once, so that
    adding them block by block does not grow the lists by doubling (faiss's per-list vectors
    held 1.47x the codes of 1M chunks added to an `IVF16384,SQ8` block by block; 1.02x with
    the room made first). Contents are unchanged. False, and nothing done, where the index has
    no in-memory lists (on-disk lists, no IVF) or `counts` does not have one count per list."""
    target = _code_target(index)
    if target is None or len(counts) != target.nlist:
        return False
    lists = faiss.downcast_InvertedLists(target.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return False
    for list_no in np.flatnonzero(counts):
        size = lists.list_size(int(list_no))
        lists.resize(int(list_no), size + int(counts[list_no]))  # allocates exactly this much
        lists.resize(int(list_no), size)  # and keeps it: a std::vector shrinks in size only
    return True


def add_encoded(index: faiss.Index, codes: np.ndarray, ids: np.ndarray) -> None:
    """Add one block made by `encode_block` with its global ids (int64)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != len(codes):
        raise InputError(f"{len(codes)} codes but {len(ids)} ids")
    target = _code_target(index)
    if target is None or codes.dtype != np.uint8:
        add_vectors(index, codes, ids)
        return
    if len(ids) == 0:
        return
    target.add_sa_codes(np.ascontiguousarray(codes), ids)
    index.ntotal = target.ntotal  # a pre-transform's count follows its inner index


# Compressed (PQ) codes rank candidates by approximate distances: the nearest vectors are among
# the first few dozen results but not in order, and probing more cells barely helps (4M chunks:
# nprobe 512 for recall 0.9, hours of search). Re-ranking K_FACTOR x k candidates with the exact
# distances of the stored embeddings restores the order at a small nprobe.
K_FACTOR = "k_factor"
RERANK_FACTOR = 4

VectorsOf = Callable[[np.ndarray], np.ndarray]  # ids (n,) int64 >= 0 -> vectors (n, d)


def is_compressed(factory: str) -> bool:
    """Whether an index built from `factory` stores lossy codes (PQ / scalar quantisers)."""
    return bool(re.search(r"(?<!O)PQ\d+|SQ\d+", factory))


class RerankedIndex(SearchWrapper):
    """A faiss index whose candidates are re-scored with exact distances and re-sorted.

    `search(x, k)` asks the wrapped index for `k_factor * k` candidates, fetches their stored
    vectors with `vectors_of(ids)`, and returns the k best by exact inner product or squared
    L2 distance (the metric of the wrapped index), in faiss's (distances, ids) form, so it
    can stand wherever a faiss index is searched (`search`, `index_search_fn`).
    """

    def __init__(self, index: faiss.Index, vectors_of: VectorsOf, k_factor: int) -> None:
        if k_factor < 1:
            raise InputError(f"k_factor must be >= 1, got {k_factor}")
        self.index, self.vectors_of, self.k_factor = index, vectors_of, int(k_factor)

    def search(
        self, queries: np.ndarray, k: int, cells: Cells | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        kk = min(max(k * self.k_factor, k), max(self.ntotal, 1))
        # the candidates' vectors of `rows` queries at a time: (rows, kk, d) float32 <= 64 MB
        rows = max(1, (64 << 20) // (kk * self.d * 4))
        parts = [
            self._search_rows(
                queries[s : s + rows],
                k,
                kk,
                None if cells is None else (cells[0][s : s + rows], cells[1][s : s + rows]),
            )
            for s in range(0, len(queries), rows)
        ]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def _search_rows(
        self, queries: np.ndarray, k: int, kk: int, cells: Cells | None
    ) -> tuple[np.ndarray, np.ndarray]:
        _, ids = _search_index(self.index, queries, kk, cells)  # (n, kk) in approximate order
        found = ids >= 0
        if found.any():
            # a -1 (a list shorter than kk) reads a found row in its place, its score masked
            # below: a scatter of (n * kk, d) rows through the mask took 1.6x the gather (the
            # 1M benchmark at nprobe 1, where most slices of queries meet a short list)
            asked = ids if found.all() else np.where(found, ids, ids[found][0])
            vectors = np.asarray(self.vectors_of(asked.ravel()), dtype=np.float32)
            vectors = vectors.reshape(*ids.shape, self.d)  # (n, kk, d)
        else:
            vectors = np.zeros((*ids.shape, self.d), dtype=np.float32)
        if self.metric_type == faiss.METRIC_INNER_PRODUCT:
            scores = np.einsum("nkd,nd->nk", vectors, queries)  # (n, kk), higher is closer
            order_key, worst = -scores, -np.inf
        else:  # squared L2 from the differences (the expanded form cancels at small distances)
            vectors -= queries[:, None, :]
            scores = np.einsum("nkd,nkd->nk", vectors, vectors)  # lower is closer
            order_key, worst = scores, np.inf
        order_key = np.where(found, order_key, np.inf)
        order = np.argsort(order_key, axis=1, kind="stable")[:, :k]  # (n, k)
        top_ids = np.take_along_axis(ids, order, axis=1)
        top = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        top[top_ids < 0] = worst
        if top.shape[1] < k:  # a tiny index: fewer candidates than k
            pad = k - top.shape[1]
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=worst)
            top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        return top, top_ids


def default_search_params(factory: str, num_vectors: int) -> dict[str, int]:
    """Search parameters that reach recall@10 >= 0.95 against exact search (see the tests).

    IVF: probe 1/8 of the cells, at least 16 (32 with PQ codes, whose distances are coarser);
    HNSW: efSearch 128 (an IVF's HNSW quantizer gets its own from nprobe in `apply_search_params`).
    Exact indexes have none.
    """
    params: dict[str, int] = {}
    if m := re.search(r"IVF(\d+)", factory):
        nlist = int(m.group(1))
        floor = 32 if re.search(r"PQ\d+", factory) else 16
        params["nprobe"] = min(nlist, max(floor, nlist // 8))
    if "HNSW" in factory and "IVF" not in factory:  # an HNSW quantizer: apply_search_params
        params["efSearch"] = 128
    return params


def unwrap(index: Any) -> faiss.Index:
    """The faiss index inside the search wrappers (`SearchWrapper`s)."""
    while isinstance(index, SearchWrapper):
        index = index.index
    return index


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set search parameters (nprobe, efSearch, ...) through any wrapper (IDMap, OPQ, ...).

    `k_factor` (re-ranking, see `RerankedIndex`) is set on a `RerankedIndex` and ignored on a
    bare faiss index, which has nothing to re-rank with.
    """
    params = dict(params)
    k_factor = params.pop(K_FACTOR, None)
    if isinstance(index, RerankedIndex) and k_factor is not None:
        index.k_factor = int(k_factor)
    index = unwrap(index)
    needs_ef = "nprobe" in params and "quantizer_efSearch" not in params
    if needs_ef and _hnsw_quantizer(index) is not None:  # the graph must return nprobe cells
        params["quantizer_efSearch"] = max(QUANTIZER_EF_SEARCH, 2 * int(params["nprobe"]))
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError as e:
            raise InputError(f"cannot set search parameter {name}={value}: {e}") from None


def _search_index(
    index: Any, queries: np.ndarray, k: int, cells: Cells | None
) -> tuple[np.ndarray, np.ndarray]:
    """`index.search`, with the queries' known cells where the index takes them."""
    if cells is not None and isinstance(index, SearchWrapper):
        return index.search(queries, k, cells)
    return index.search(queries, k)


def search(
    index: faiss.Index, queries: np.ndarray, k: int, cells: Cells | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Search `k` nearest neighbours of each query (`cells`: their nearest IVF cells, when
    known; see `ExactCellsIndex.search`).

    Returns:
        distances (n, k) float32 and ids (n, k) int64; where fewer than k results exist the id is
        -1 and the distance -inf (metric "ip") or +inf (metric "l2").
    """
    if k <= 0:
        raise InputError(f"k must be positive, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise InputError(f"queries have shape {queries.shape}, index expects (n, {index.d})")
    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    dists, ids = _search_index(index, queries, k, cells)
    dists = dists.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    dists[ids < 0] = -np.inf if metric_of(index) == "ip" else np.inf
    return dists, ids


def exact_search_blocks(
    queries: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force k nearest neighbours of `queries` over a stream of (vectors, ids) blocks.

    Memory stays at one block plus the running (n, k) results, whatever the database size: the
    ground truth for `choose_search_params` on a database that does not fit in memory. Torch's
    float32 matrix products (`_nearest`, as the k-means) rank each block (a faiss flat search
    per block is most of a large build's search-params stage: benchmarks/exact_search.py);
    for l2 the distances of 2k candidates are then computed directly. Rows at equal distance
    keep block order.

    Returns:
        distances (n, k) float32 and ids (n, k) int64, like `search`.
    """
    import torch

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    similarity = _metric_type(metric) == faiss.METRIC_INNER_PRODUCT
    q = torch.from_numpy(queries)
    worst = -np.inf if similarity else np.inf
    best_d = np.full((len(queries), k), worst, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for vectors, ids in blocks:
        if len(vectors) == 0:
            continue
        v = torch.from_numpy(np.ascontiguousarray(vectors)).float()
        if similarity:  # the products are the scores
            scores, rows = _nearest(q, v, None, min(k, len(v)))
            d = scores.numpy()
        else:  # |q|^2 - 2 q.v + |v|^2 loses a small distance's digits: 2k candidates by the
            # products, then their distances computed directly
            _, rows = _nearest(q, v, 0.5 * (v * v).sum(1), min(2 * k, len(v)))
            d = ((q[:, None, :] - v[rows]) ** 2).sum(-1).numpy()
        i = np.asarray(ids, dtype=np.int64)[rows.numpy()]
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, i], axis=1)
        order = np.argsort(-all_d if similarity else all_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(all_d, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_d, best_i


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of each row's true neighbours (ids >= 0) that were found."""
    hits, total = 0, 0
    for found, true in zip(found_ids, true_ids):
        true_set = {int(t) for t in true if t >= 0}
        hits += len(true_set.intersection(int(f) for f in found))
        total += len(true_set)
    return hits / total if total else 1.0


# Databases larger than this tune their search parameters on a sample (smaller ones keep the
# defaults, whose recall the tests establish, and are exact or nearly so anyway).
TUNE_MIN_VECTORS = EXACT_MAX_VECTORS
TUNE_QUERIES = 1000
TUNE_TARGET_RECALL = 0.95
TUNE_PLATEAU = 0.01
# A doubling of nprobe (of the search's cost) that gains less recall than this ends the search
# for a better setting: at 16M synthetic chunks recall crept from 0.90 at nprobe 2 to 0.96 at
# 4096 (a doubling gained 0.002 to 0.012), and the target was met at 33 ms a query against 0.5.
TUNE_MIN_GAIN = 0.005
# below this the tuned recall is logged as a warning (the index's cells are too coarse)
TUNE_LOW_RECALL = 0.9


def choose_search_params(
    index: faiss.Index,
    factory: str,
    queries: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    k: int = 10,
    true_ids: np.ndarray | None = None,
    vectors_of: VectorsOf | None = None,
) -> tuple[dict[str, int], float | None]:
    """The search parameters a database records: `default_search_params`, lowered on a large
    index to the cheapest setting whose recall@k on `queries` against exact search reaches
    `TUNE_TARGET_RECALL` (the default probes nlist/8 cells: hours of neighbour search at a few
    million chunks, for a recall that a few dozen cells already give). Settings are tried in
    powers of two until one reaches the target, the default is reached, or a doubling gains
    less than `TUNE_MIN_GAIN` (recall that creeps up with the cells probed is not worth twice
    the search each time); then the cheapest setting within `TUNE_PLATEAU` of the best recall
    tried (PQ codes may never reach the target: their distances are approximate).

    Args:
        index: the filled index; left set to the returned parameters.
        factory: its factory string.
        queries: (n, d) sampled database vectors.
        blocks: the database as (vectors, ids) blocks, for the exact search (or `true_ids`).
        true_ids: (n, >= k) exact neighbours of `queries`, when the caller has them already.
        vectors_of: the stored vectors of given ids; with compressed codes (`is_compressed`)
            the parameters then include `k_factor` (`RERANK_FACTOR`): searches re-rank that
            many candidates per neighbour exactly (`RerankedIndex`), and nprobe is tuned so.

    An index with an HNSW quantizer, as trained (its quantizer's efSearch is the one
    `assignment_ef` measured), records `quantizer_efSearch` too: at least that, and 2 nprobe.

    Returns:
        (params, recall@k reached), recall None when the defaults were kept untested.
    """
    quantizer = _hnsw_quantizer(index)
    assign_ef = int(quantizer.hnsw.efSearch) if quantizer is not None else 0

    def with_ef(params: dict[str, int]) -> dict[str, int]:
        """An HNSW quantizer searches with at least the efSearch it was trained to assign
        with (`assignment_ef`, kept in the index) and twice the cells it must return."""
        if assign_ef and "nprobe" in params:
            ef = max(QUANTIZER_EF_SEARCH, assign_ef, 2 * int(params["nprobe"]))
            params = {**params, "quantizer_efSearch": ef}
        return params

    default = default_search_params(factory, int(index.ntotal))
    index = searchable(index)
    if vectors_of is not None and is_compressed(factory):
        default[K_FACTOR] = RERANK_FACTOR
        index = RerankedIndex(index, vectors_of, RERANK_FACTOR)
    if index.ntotal <= TUNE_MIN_VECTORS or not set(default) - {K_FACTOR} or len(queries) == 0:
        default = with_ef(default)
        apply_search_params(index, default)
        return default, None
    if true_ids is None:
        if blocks is None:
            raise InputError("choose_search_params needs the database blocks or true_ids")
        true_ids = exact_search_blocks(queries, blocks, k, metric_of(index))[1]
    true_ids = true_ids[:, :k]
    name = "nprobe" if "nprobe" in default else "efSearch"
    top = default[name]
    tried: list[tuple[int, float]] = []
    value = 1 if name == "nprobe" else max(16, k)
    while True:  # powers of two up to the default
        value = min(value, top)
        apply_search_params(index, with_ef({name: value}))
        tried.append((value, recall_at_k(search(index, queries, k)[1], true_ids)))
        if tried[-1][1] >= TUNE_TARGET_RECALL or value == top:
            break
        if len(tried) > 1 and tried[-1][1] - tried[-2][1] < TUNE_MIN_GAIN:
            break  # flattened: the next doublings would cost more than they give
        value *= 2
    best = max(r for _, r in tried)
    # the target, or where the recall flattens below it, within 0.01 of the best reached
    goal = min(TUNE_TARGET_RECALL, best - TUNE_PLATEAU)
    value, recall = next((v, r) for v, r in tried if r >= goal)
    params = with_ef({**default, name: value})
    apply_search_params(index, params)
    curve = ", ".join(f"{v}: {r:.4f}" for v, r in tried)
    logger.log(
        logging.WARNING if recall < TUNE_LOW_RECALL else logging.INFO,
        f"search parameters: {name} {value}, recall@{k} {recall:.4f} on {len(queries)} sampled "
        f"vectors ({name} tried: {curve})"
        + (
            f"; below {TUNE_LOW_RECALL}: the index's cells split near neighbours (too few "
            f"training vectors a cell? {POINTS_PER_CENTROID} a cell needs --index-train-size "
            f"{POINTS_PER_CENTROID} x nlist)"
            if recall < TUNE_LOW_RECALL
            else ""
        ),
    )
    return params, recall


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Write `index` to `path` atomically (a killed write never leaves a partial index)."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(
    path: str | os.PathLike[str], mmap: bool = False, *, ondisk: bool = False
) -> faiss.Index:
    """Read an index written by `save_index`.

    Args:
        path: the index file.
        mmap: memory-map the vectors / inverted lists instead of reading them into memory
            (read-only); falls back to a normal read for index types that do not support it.
        ondisk: the index has on-disk inverted lists in a `.ivfdata` file beside it.

    Raises:
        InputError: `path` does not exist.
        CorruptArtifactError: the file is not a readable faiss index.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no faiss index at {path}: build it first (retrolm db index)")
    if ondisk:
        # on-disk inverted lists (see `retrolm.database.ondisk`): their .ivfdata file lies
        # beside the index and is memory-mapped, wherever the database folder was moved
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError as e:
            raise CorruptArtifactError(
                f"{path} is not a readable on-disk faiss index ({str(e).strip().splitlines()[-1]}): "
                "delete it and rerun `retrolm db index`"
            ) from None
    if mmap:
        for flag in (faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP):
            try:
                return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                continue
        logger.debug("index %s cannot be memory-mapped; reading it into memory", path)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise CorruptArtifactError(
            f"{path} is not a readable faiss index ({str(e).strip().splitlines()[-1]}): "
            "delete it and rerun `retrolm db index`"
        ) from None
