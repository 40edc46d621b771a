"""Load test of `retrolm serve`: N concurrent streaming clients for a bounded time.

Starts `retrolm serve RUN --db DB` on 127.0.0.1 (a free port), then for each N in --clients
(default 1, 4, 16) runs N clients that each send streaming completion requests back to back
(prompts cut from the database's documents, --max-tokens new tokens each, greedy) for
--seconds after a warm-up. Reports requests/s, generated tokens/s, latency p50/p95/p99, time
to first token (first text piece) and errors, then the batching gain:
tokens/s at the largest N divided by tokens/s at 1 client.

Without --run, a run is made for 2 steps on DB (speed does not depend on the weights; greedy
decoding of an untrained model rarely ends early at <eos>): retrolm's own model of --preset
(default `small`), or with --retrofit BASE a RETRO-fitted Hugging Face model. BASE is what
`retrolm train --retrofit` takes (a folder, a .gguf file, `smollm2`; DB built with its
tokenizer), or `tiny-llama`: a random 8-layer Llama of width 256 (4 heads, 2 key-value heads)
made here with DB's own tokenizer.

    python benchmarks/serve_load.py --db DB [--run RUN | --retrofit BASE] [--clients 1 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def make_run(db: Path, preset: str, out: Path, retrofit: str | None = None) -> Path:
    model = ["--preset", preset]
    if retrofit == "tiny-llama":
        retrofit = str(make_tiny_llama(db, out.parent / "tiny-llama"))
    if retrofit is not None:
        model = ["--retrofit", retrofit, "--model", "max_seq_len=1024"]
    cmd = [
        sys.executable, "-m", "retrolm", "-q", "train", "--db", str(db), "--out", str(out),
        *model, "--steps", "2", "--batch-size", "2", "--seq-len", "256", "--eval-every", "0",
        "--no-progress",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


def make_tiny_llama(db_path: Path, folder: Path) -> Path:
    """A random Llama folder whose vocabulary is the database's tokenizer (copied in)."""
    import shutil

    import torch
    import transformers

    from retrolm.database import Database

    tokenizer = Database.open(db_path).tokenizer
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=8, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=768, vocab_size=tokenizer.vocab_size, max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    shutil.copy(db_path / "tokenizer.json", folder / "tokenizer.json")
    return folder


def make_prompts(db_path: Path, tokens: int, count: int = 64) -> list[str]:
    from retrolm.database import Database

    db = Database.open(db_path)
    m = db.chunk_size
    need = -(-tokens // m)
    docs = [d for d in db.documents if d.num_chunks >= need]
    prompts = []
    for d in docs[:count]:
        ids = db.chunk_tokens(np.arange(d.first_chunk, d.first_chunk + need)).reshape(-1)
        prompts.append(db.tokenizer.decode(ids[:tokens].tolist()))
    if not prompts:
        raise SystemExit(
            f"error: no document of {tokens} tokens in {db_path}; lower --prompt-tokens"
        )
    return prompts


async def client(url: str, prompts: list[str], offset: int, args, stop_at: float, out: list):
    async with httpx.AsyncClient(timeout=300) as http:
        i = offset
        while time.perf_counter() < stop_at:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True}  # fmt: skip
            i += 7
            t0 = time.perf_counter()
            first = None
            tokens, error = 0, None
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}"
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"]["type"]
                            break
                        if first is None and event["choices"][0]["text"]:
                            first = time.perf_counter() - t0
                        if "usage" in event:
                            tokens = event["usage"]["completion_tokens"]
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            end = time.perf_counter()
            out.append({"start": t0, "end": end, "ttft": first, "tokens": tokens, "error": error})


async def load(url: str, prompts: list[str], n: int, args) -> dict:
    warm: list = []
    t_warm = time.perf_counter() + args.warmup
    await asyncio.gather(*(client(url, prompts, j, args, t_warm, warm) for j in range(n)))
    records: list = []
    t0 = time.perf_counter()
    await asyncio.gather(
        *(client(url, prompts, 1000 + j, args, t0 + args.seconds, records) for j in range(n))
    )
    wall = time.perf_counter() - t0  # requests started before the deadline are finished
    ok = [r for r in records if r["error"] is None]
    lat = np.array([r["end"] - r["start"] for r in ok]) if ok else np.zeros(1)
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None]) if ok else np.zeros(1)
    return {
        "clients": n,
        "seconds": wall,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50": float(np.percentile(lat, 50)),
        "latency_p95": float(np.percentile(lat, 95)),
        "latency_p99": float(np.percentile(lat, 99)),
        "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p95": float(np.percentile(ttft, 95)),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--run", type=Path, help="a trained run (default: train `small` 2 steps)")
    p.add_argument("--preset", default="small")
    p.add_argument("--retrofit", help="RETRO-fit this base (or `tiny-llama`) instead of --preset")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per client count")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(args.db, args.preset, Path(tmp) / "run", args.retrofit)
        prompts = make_prompts(args.db, args.prompt_tokens)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "retrolm", "-q", "serve", str(run), "--db", str(args.db),
               "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
               "--max-batch", str(max(args.clients)), "--max-queue", str(4 * max(args.clients)),
               "--reload-interval", "0"]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            for _ in range(1200):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"error: the server exited with {server.returncode}")
                time.sleep(0.1)
            else:
                raise SystemExit("error: the server did not start in 120 s")
            health = httpx.get(f"{url}/health").json()
            model = httpx.get(f"{url}/v1/models").json()["data"][0]
            print(f"machine: {os.cpu_count()} cpus; load average before: {os.getloadavg()}")
            print(
                f"model: {run} (max_seq_len {model['max_seq_len']}, chunk {model['chunk_size']}); "
                f"database {health['database']['chunks']} chunks"
            )
            print(
                f"requests: prompts of {args.prompt_tokens} tokens, {args.max_tokens} new tokens, "
                f"greedy, streamed; {args.seconds:g} s per client count after {args.warmup:g} s "
                "warm-up"
            )
            results = [asyncio.run(load(url, prompts, n, args)) for n in args.clients]
        finally:
            server.terminate()
            code = server.wait(timeout=60)
    print(f"load average after: {os.getloadavg()}; server exit status {code}")
    print()
    print(
        "| clients | requests/s | tokens/s | latency p50 / p95 / p99 (s) | TTFT p50 / p95 (s) | errors |"
    )
    print("|---:|---:|---:|---|---|---:|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['latency_p50']:.2f} / {r['latency_p95']:.2f} / {r['latency_p99']:.2f} | "
            f"{r['ttft_p50']:.3f} / {r['ttft_p95']:.3f} | {r['errors']} |"
        )
    base = results[0]
    top = results[-1]
    if base["tokens_per_s"] > 0:
        print(
            f"\ntokens/s at {top['clients']} clients / at {base['clients']}: "
            f"{top['tokens_per_s'] / base['tokens_per_s']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
