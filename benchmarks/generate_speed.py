"""Generation throughput with real retrieval in the loop, and the share of time in retrieval.

`retrolm.generate.generate_text` continues a 64-token prompt (the start of a held-out document)
by 512 tokens; at every completed chunk its text is embedded with the database's embedder and
searched in its index (`db.search_chunks`), then the neighbours + continuations are gathered.
The run is trained for a couple of steps only (speed does not depend on the weights) with
max_seq_len 1024 so that 64 + 512 tokens fit.

    python benchmarks/generate_speed.py --db DB [--preset small] [--new-tokens 512]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_run(db: Path, preset: str, out: Path) -> Path:
    cmd = [
        sys.executable, "-m", "retrolm", "-q", "train", "--db", str(db), "--out", str(out),
        "--preset", preset, "--steps", "2", "--batch-size", "2", "--seq-len", "512",
        "--model", "max_seq_len=1024", "--eval-every", "0", "--no-progress",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from retrolm.database import Database
    from retrolm.generate import generate_text
    from retrolm.model import RETRO

    db = Database.open(args.db)
    doc = next(
        d
        for d in db.documents
        if d.split == "valid" and d.num_chunks * db.chunk_size > args.prompt_tokens
    )
    first = db.chunk_tokens(list(range(doc.first_chunk, doc.first_chunk + 2))).reshape(-1)
    prompt = db.tokenizer.decode(first[: args.prompt_tokens].tolist())
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(args.db, args.preset, Path(tmp) / "run")
        model = RETRO.load(run / "model")
        generate_text(run, db, prompt, max_new_tokens=64, model=model)  # loads embedder + index
        results = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = generate_text(run, db, prompt, max_new_tokens=args.new_tokens, model=model)
            results.append((time.perf_counter() - t0, r))
    wall, best = min(results, key=lambda x: x[0])
    chunks = len(best.attribution)
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"load average: {os.getloadavg()}")
    print(
        f"database: {db.num_chunks} chunks, index {db.manifest.index.factory}, embedder {db.manifest.embeddings.spec}"
    )
    print(
        f"model: preset {args.preset}, {model.num_params() / 1e6:.1f}M parameters, chunk {db.chunk_size}, k {model.cfg.num_neighbours}"
    )
    print(f"prompt {best.prompt_tokens} tokens + {args.new_tokens} new tokens, {chunks} retrievals")
    print(
        f"end to end          : {args.new_tokens / wall:8.1f} tokens/s ({wall:.2f} s, best of {args.repeats})"
    )
    print(
        f"retrieval (embed + search + gather): {best.retrieval_seconds:.2f} s = {100 * best.retrieval_seconds / best.seconds:.1f}% of generation, {1000 * best.retrieval_seconds / max(1, chunks):.1f} ms per chunk"
    )
    print(
        f"without retrieval time: {args.new_tokens / (best.seconds - best.retrieval_seconds):8.1f} tokens/s"
    )


if __name__ == "__main__":
    main()
