"""The coarse quantizer of an IVF index, side by side: which cell does each vector go to, how
fast, and how often is it the nearest one?

    python benchmarks/coarse_assign.py [--cells 4096 16384 65536] [--db DB] [--json]

For each number of cells, on the same vectors and centroids, in one process:

- faiss: `IndexFlatIP` / `IndexFlatL2` search for the nearest centroid (what faiss's IVF does
  with a flat quantizer);
- torch: `CellFinder` (retrolm's exact cells, float32 matrix products), the way `db build`
  encodes and searches an IVF with a flat quantizer;
- hnsw: an `IndexHNSWFlat` graph over the centroids (M=32, built on one thread as
  `--index IVFn_HNSW32,...` does) at the efSearch `assignment_ef` measures (the least power of
  two from 16 that finds the exact nearest cell for 99% of a sample), and at faiss's default 16.

Data: the scale benchmark's synthetic embeddings (`database_scale.Synthetic`: unit vectors
around equidistant random topic centres, the hard case for a graph), with the topic centres
(and, past their number, further sample vectors) as centroids; or, with --db, a database's
stored embeddings with centroids from `kmeans` on them (real text). Prints microseconds per
vector, the agreement of each with the exact nearest cell, and the speed ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from database_scale import Synthetic  # noqa: E402

from retrolm.database import index as ix  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def synthetic_case(cells: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    data = Synthetic(cells * 256, 384, 16384, seed)  # the benchmark's topics per cell
    centres = data.centres / np.linalg.norm(data.centres, axis=1, keepdims=True)
    extra = data.training_sample(max(0, cells - len(centres)))
    centroids = np.concatenate([centres, extra])[:cells].astype(np.float32)
    return np.ascontiguousarray(centroids), data.vectors(1)[:queries]


def database_case(folder: Path, cells: int, queries: int, seed: int) -> tuple[np.ndarray, ...]:
    files = sorted((folder / "embeddings").glob("emb-*.npy"))
    if not files:
        raise SystemExit(f"error: no embeddings/emb-*.npy in {folder}: pass a built database")
    x = np.concatenate([np.load(f).astype(np.float32) for f in files])
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) < 8 * cells:
        raise SystemExit(f"error: {len(x)} embeddings are too few for {cells} cells (8 each)")
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), min(len(x), 64 * cells), replace=False)]
    centroids = ix.kmeans(sample, cells, seed=seed, spherical=True, niter=4)
    return centroids, x[rng.choice(len(x), min(queries, len(x)), replace=False)]


def measure(centroids: np.ndarray, x: np.ndarray) -> dict:
    d = centroids.shape[1]
    flat = faiss.IndexFlatIP(d)
    flat.add(centroids)
    (_, faiss_cells), faiss_s = timed(flat.search, x, 1)
    ivf = faiss.IndexIVFFlat(flat, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
    finder = ix.CellFinder(ivf)
    (_, torch_cells), torch_s = timed(finder.cells, x, 1)
    exact = torch_cells[:, 0]
    graph = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 40
    ix._single_threaded_add(graph, centroids)
    ef, _ = ix.assignment_ef(graph, x[: ix.ASSIGN_SAMPLE])
    result = {
        "cells": len(centroids),
        "vectors": len(x),
        "us_per_vector": {"faiss_flat": 1e6 * faiss_s / len(x), "torch": 1e6 * torch_s / len(x)},
        "agreement": {"faiss_flat": float(np.mean(faiss_cells[:, 0] == exact)), "torch": 1.0},
        "hnsw_ef": ef,
    }
    for name, value in (("hnsw_ef16", 16), ("hnsw", ef)):
        graph.hnsw.efSearch = value
        (_, cells), seconds = timed(graph.search, x, 1)
        result["us_per_vector"][name] = 1e6 * seconds / len(x)
        result["agreement"][name] = float(np.mean(cells[:, 0] == exact))
    us = result["us_per_vector"]
    result["speedup_torch_over"] = {k: us[k] / us["torch"] for k in ("faiss_flat", "hnsw")}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cells", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--queries", type=int, default=20_000, help="vectors assigned per case")
    p.add_argument("--db", type=Path, help="a built database: its embeddings instead")
    p.add_argument("--threads", type=int, default=0, help="faiss and torch threads (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    results = []
    for cells in args.cells:
        if args.db:
            centroids, x = database_case(args.db, cells, args.queries, args.seed)
        else:
            centroids, x = synthetic_case(cells, args.queries, args.seed)
        r = measure(centroids, x)
        us, agree = r["us_per_vector"], r["agreement"]
        print(
            f"{cells:6d} cells: "
            + ", ".join(f"{k} {us[k]:.0f} us ({agree[k]:.4f})" for k in us)
            + f"; hnsw efSearch {r['hnsw_ef']}; torch is {r['speedup_torch_over']['faiss_flat']:.1f}x"
            f" faiss flat, {r['speedup_torch_over']['hnsw']:.1f}x hnsw"
        )
        results.append(r)
    if args.json:
        print(json.dumps({"data": str(args.db or "synthetic"), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
