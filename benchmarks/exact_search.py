"""The exact search of the search-params stage (the ground truth its tuning is scored against),
side by side: retrolm's `exact_search_blocks` (torch matrix products for 2k candidates a block,
their distances then computed directly) against a faiss flat index per block, on the same
queries and blocks, in one process.

    python benchmarks/exact_search.py [--chunks 2000000] [--queries 1000] [--threads 2] [--json]

Data: the scale benchmark's synthetic embeddings (`database_scale.Synthetic`), inner product as
its indexes use; the queries are sampled chunks, as the tuning samples them. Prints seconds and
vectors/s of each, the speed ratio, and how many of the ids agree.
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


def faiss_flat_blocks(queries, blocks, k):
    """Exact search with a faiss flat index per block, results merged (the other way)."""
    best_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for vectors, ids in blocks:
        flat = faiss.IndexFlatIP(queries.shape[1])
        flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
        d, i = flat.search(queries, k)
        all_d = np.concatenate([best_d, d], axis=1)
        all_i = np.concatenate([best_i, ids[i]], axis=1)
        order = np.argsort(-all_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(all_d, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_d, best_i


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chunks", type=int, default=2_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=18, help="as the benchmark's 10 + a document's 8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    data = Synthetic(args.chunks, 384, 16384, 0)
    blocks = [(data.vectors(b), data.ids(b)) for b in range(data.blocks)]  # made once, not timed
    rng = np.random.default_rng(1)
    picks = np.sort(rng.choice(args.chunks, args.queries, replace=False))
    queries = np.concatenate([v[np.isin(ids, picks)] for v, ids in blocks])
    seconds, found = {}, {}
    for name, fn in [
        ("faiss flat", lambda: faiss_flat_blocks(queries, blocks, args.k)),
        ("torch", lambda: ix.exact_search_blocks(queries, blocks, args.k, "ip")),
        ("faiss flat, again", lambda: faiss_flat_blocks(queries, blocks, args.k)),
        ("torch, again", lambda: ix.exact_search_blocks(queries, blocks, args.k, "ip")),
    ]:
        t = time.perf_counter()
        found[name] = fn()
        seconds[name] = time.perf_counter() - t
    faiss_s = min(seconds["faiss flat"], seconds["faiss flat, again"])
    torch_s = min(seconds["torch"], seconds["torch, again"])
    (fd, fi), (td, ti) = found["faiss flat"], found["torch"]
    result = {
        "chunks": args.chunks,
        "queries": len(queries),
        "k": args.k,
        "threads": args.threads,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "faiss_over_torch": round(faiss_s / torch_s, 2),
        "same_ids": float(np.mean(fi == ti)),
        "max_distance_difference": float(np.abs(fd - td).max()),
    }
    for name, s in seconds.items():
        print(f"{name:18s} {s:8.2f} s  {args.chunks * len(queries) / s / 1e9:6.2f} G pairs/s")
    print(
        f"torch is {result['faiss_over_torch']}x faiss flat (best of two each); ids agree for "
        f"{result['same_ids']:.4%}; largest distance difference {result['max_distance_difference']:.2e}"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
