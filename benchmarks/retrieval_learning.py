"""Can a RETRO model learn to read its neighbours in a given number of steps, on a database?

Two questions, answered side by side on one database:

1. **Neighbour quality.** For the held-out samples, the fraction of target tokens a reader of
   the visible neighbours could copy: the target and the two tokens before it appear, in that
   order, in one of the k neighbours (chunk + continuation) that the position reads through
   chunked cross-attention (chunk u's neighbours serve positions u*m+m-1 .. u*m+2m-2). Rows:
   the stored (leakage-filtered) neighbours, random train chunks (the floor), and *oracle*
   neighbours (a copy of the chunk itself followed by its true continuation: the ceiling).
2. **Learnability.** The same RETRO is trained for `--steps` steps twice with the real training
   loop (`retrolm.train.train`), once on the stored neighbours and once on oracle neighbours,
   with the same seed and data order; each is then measured on held-out samples with its
   neighbours (ON) and without (OFF). ON - OFF is what retrieval buys. With oracle neighbours
   a model that has learned to copy gets far below OFF; if even the oracle gap is small, the
   model has not yet learned to read neighbours at all, whatever their quality.

    python benchmarks/retrieval_learning.py --db DB [--steps 300] [--quality-only]
    python benchmarks/retrieval_learning.py --synthetic [--distractor] [--steps 1000]

`--synthetic` needs no database: random tokens (256 ids, chunk 16), each chunk's neighbour 0
is the chunk and its true continuation (and, with `--distractor`, neighbour 1 random tokens);
it prints the loss of the first chunk (nothing to read: ln 256 = 5.55) and of the later chunks
(everything copyable) every 50 steps, i.e. when the model starts to copy through CCA.

The model and training settings are those of `retrolm quickstart` (128x4 decoder, CCA at
layers 2 and 4, 2-layer encoder, k=2, batch 8 x 256 tokens, lr 3e-3), fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retrolm.config import RetroConfig, preset_fields
from retrolm.data import ArrayChunkSource, ChunkSource, RetroSamples
from retrolm.database import Database
from retrolm.errors import UserError
from retrolm.model import RETRO
from retrolm.train import TrainConfig, train

QUICKSTART = RetroConfig.preset("quickstart")  # the model trained here

NGRAM = 3  # target plus the two tokens before it


def oracle_source(db: Database, seed: int = 0) -> ArrayChunkSource:
    """The database's chunks, each with one oracle neighbour and one random train chunk.

    The oracle neighbour of chunk c is a copy of c in a duplicate of its document (so the
    leakage rule, which drops neighbours from the sample's own documents, keeps it), whose
    continuation is therefore the chunk that really follows c.
    """
    n = int(len(db.chunk_doc))
    ids = np.arange(n, dtype=np.int64)
    tokens = db.chunk_tokens(ids)
    split = np.full(n, "train", dtype=object)
    split[db.split_chunk_ids("valid")] = "valid"
    rng = np.random.default_rng(seed)
    stored = np.stack([ids + n, rng.choice(db.split_chunk_ids("train"), n)], axis=1)
    docs = np.asarray(db.chunk_doc, dtype=np.int64)
    return ArrayChunkSource(
        tokens=np.concatenate([tokens, tokens]),
        chunk_doc=np.concatenate([docs, docs + docs.max() + 1]),
        chunk_split=np.concatenate([split, np.full(n, "copies", dtype=object)]).astype(str),
        stored_neighbours=np.concatenate([stored, np.full_like(stored, -1)]),
        pad_id=db.pad_id,
    )


def copyable(tokens: np.ndarray, targets: np.ndarray, neighbours: np.ndarray, m: int, pad: int):
    """(copyable targets, all targets) over positions that read some chunk's neighbours."""
    hits = total = 0
    B, T = tokens.shape
    for b in range(B):
        seq = tokens[b].tolist()
        for u in range(neighbours.shape[1]):
            grams = set()
            for row in neighbours[b, u].tolist():
                grams.update(tuple(row[j : j + NGRAM]) for j in range(len(row) - NGRAM + 1))
            for p in range(u * m + m - 1, min(u * m + 2 * m - 1, T)):
                if targets[b, p] == pad or p < NGRAM - 2:
                    continue
                total += 1
                hits += (*seq[p - NGRAM + 2 : p + 1], int(targets[b, p])) in grams
    return hits, total


def quality(db: Database, oracle: ArrayChunkSource, k: int, samples: int, seed: int) -> dict:
    """Copyable fraction of held-out targets for stored, random and oracle neighbours."""
    m, pad = db.chunk_size, db.pad_id
    real = RetroSamples(db, "valid", QUICKSTART.max_seq_len, k)
    idx = np.random.default_rng(seed).permutation(len(real))[:samples]
    batch = real.get(idx)
    assert batch.neighbour_ids is not None
    rng = np.random.default_rng(seed + 1)
    random_ids = rng.choice(db.split_chunk_ids("train"), batch.neighbour_ids.shape)
    ora = RetroSamples(oracle, "valid", QUICKSTART.max_seq_len, 1).get(idx)
    assert ora.neighbours is not None and batch.neighbours is not None
    tok, tgt = batch.tokens.numpy(), batch.targets.numpy()
    out = {}
    for name, nb in (
        ("stored", batch.neighbours.numpy()),
        ("random", db.neighbour_tokens(random_ids)),
        ("oracle", ora.neighbours.numpy()),
    ):
        hits, total = copyable(tok, tgt, nb, m, pad)
        out[name] = round(hits / max(total, 1), 4)
    out["targets"] = total
    return out


def held_out_loss(model: RETRO, source: ChunkSource, k: int, samples: int, seed: int):
    """Mean held-out loss with the source's neighbours (ON) and without (OFF)."""
    data = RetroSamples(source, "valid", QUICKSTART.max_seq_len, k)
    idx = np.random.default_rng(seed).permutation(len(data))[:samples]
    on = off = 0.0
    model.eval()
    with torch.no_grad():
        for part in np.array_split(idx, max(1, len(idx) // 8)):
            b = data.get(part)
            on += model.loss(b.tokens, b.targets, b.neighbours).item() * len(part)
            off += model.loss(b.tokens, b.targets, None).item() * len(part)
    return round(on / len(idx), 4), round(off / len(idx), 4)


def synthetic(steps: int, distractor: bool, seed: int, model_cfg: dict) -> None:
    """Train the quickstart-width model on the random-token copy task; print when it copies."""
    torch.manual_seed(seed)
    m, vocab, n, batch = 16, 256, 128, 16
    k = 2 if distractor else 1
    cfg = RetroConfig(**dict(model_cfg, vocab_size=vocab, chunk_size=m, neighbour_len=2 * m,
                             num_neighbours=k, max_seq_len=n))  # fmt: skip
    model = RETRO(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps + 1):
        seq = torch.randint(1, vocab, (batch, n + 2 * m))
        x, y = seq[:, :n], seq[:, 1 : n + 1]
        nb = torch.randint(1, vocab, (batch, n // m, k, 2 * m))
        for u in range(n // m):  # neighbour 0: chunk u and the chunk that really follows it
            nb[:, u, 0] = seq[:, u * m : u * m + 2 * m]
        logits = model(x, nb)
        per = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), reduction="none"
        ).view(batch, n)
        per.mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            first, later = per[:, : m - 1].mean().item(), per[:, m - 1 :].mean().item()
            print(f"step {step}: first chunk {first:.3f}, later chunks {later:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", help="a database built with chunk size 64")
    ap.add_argument("--synthetic", action="store_true", help="the random-token copy task")
    ap.add_argument("--distractor", action="store_true", help="synthetic: add a random neighbour")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=128, help="held-out samples measured")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--quality-only", action="store_true", help="skip the two training runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cca-match", type=int, default=QUICKSTART.cca_match,
                    help="RetroConfig.cca_match of the trained models (0: the paper's CCA)")  # fmt: skip
    args = ap.parse_args()
    model_cfg = dict(preset_fields("quickstart"), cca_match=args.cca_match)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        synthetic(args.steps, args.distractor, args.seed, model_cfg)
        return
    if not args.db:
        raise SystemExit("error: give --db DB (a built database) or --synthetic")

    if args.steps < 1 or args.samples < 1:
        raise SystemExit("error: --steps and --samples must be at least 1")
    try:
        db = Database.open(args.db)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    if db.chunk_size != QUICKSTART.chunk_size:
        raise SystemExit(f"error: {args.db} has chunk size {db.chunk_size}; this needs 64")
    samples_per_split = {
        split: len(RetroSamples(db, split, QUICKSTART.max_seq_len, 0))
        for split in ("train", "valid")
    }
    if min(samples_per_split.values()) < 8:
        raise SystemExit(
            f"error: {args.db} holds {samples_per_split} samples of {QUICKSTART.max_seq_len} tokens "
            "per split; this needs at least 8 in each (build it with more documents, or a larger "
            "--valid-fraction)"
        )
    k = QUICKSTART.num_neighbours
    oracle = oracle_source(db, args.seed)
    report: dict = {"database": str(args.db), "copyable": quality(db, oracle, k, 64, args.seed)}
    print(f"copyable held-out targets ({NGRAM}-gram in a visible neighbour): {report['copyable']}")
    if not args.quality_only:
        model = dict(model_cfg, vocab_size=int(db.tokenizer.vocab_size))
        with tempfile.TemporaryDirectory() as tmp:
            for name, source in (("stored", db), ("oracle", oracle)):
                cfg = TrainConfig(
                    model=model, max_steps=args.steps, batch_size=8, seq_len=256,
                    num_neighbours=k, lr=args.lr, warmup_steps=30, bf16=False,
                    eval_every=10**9, checkpoint_every=10**9, seed=args.seed,
                )  # fmt: skip
                start = time.perf_counter()
                run = train(cfg, source, Path(tmp) / name, show_progress=False)
                seconds = time.perf_counter() - start
                on, off = held_out_loss(RETRO.load(run / "model"), source, k, args.samples, 1)
                report[name] = {"on": on, "off": off, "gain": round(off - on, 4),
                                "train_seconds": round(seconds, 1)}  # fmt: skip
                print(f"{name:>6} neighbours, {args.steps} steps: held-out loss ON {on} "
                      f"OFF {off}, gain {off - on:.4f} nats ({seconds:.0f} s)")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
