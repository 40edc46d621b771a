"""RETRO-fitting a Hugging Face model against fully fine-tuning it: tokens/s and peak memory.

Side by side, in one run, on the same randomly initialised base (GPT-2-small-shaped by default:
12 layers, width 768, 12 heads, 50,257 tokens, 124M parameters), same batch and sequence
length, same AdamW:

1. full: every base weight trained (plain language-model loss, no retrieval).
2. retrofit: the base frozen, retrolm's encoder + CCA (default cca_layers: 6, 9, 12 of 12; enc_dim 896,
   2 encoder layers; k = 2 neighbours of 128 tokens per 64-token chunk) trained.
3. retrofit + gradient checkpointing (`gradient_checkpointing=True`).

Each runs in its own subprocess, so that its peak memory is its own: peak RSS (CPU; getrusage)
or `torch.cuda.max_memory_allocated` (GPU), and the memory of the loaded model before training,
so that the training's own share (activations, gradients, optimizer state) is the difference.

    python benchmarks/retrofit_speed.py [--steps 4] [--batch-size 2] [--seq-len 256]
        [--layers 12 --width 768 --heads 12 --vocab 50257] [--enc-dim 896 --enc-heads 14]
        [--device cpu] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("full", "retrofit", "retrofit_ckpt")


def make_base(folder: Path, args: argparse.Namespace) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab,
        n_positions=max(1024, args.seq_len), bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_mode(mode: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train `args.steps` steps in `mode`; the first `args.warmup` are not timed."""
    from retrolm.hf import retrofit_hf

    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = "bfloat16" if args.bf16 else "float32"
    settings = {"cca_layers": ()} if mode == "full" else {}  # default: every third from the middle
    model = retrofit_hf(
        folder,
        chunk_size=64,
        max_seq_len=args.seq_len,
        enc_dim=args.enc_dim,
        enc_heads=args.enc_heads,
        dtype=dtype,
        gradient_checkpointing=mode == "retrofit_ckpt",
        **settings,
    ).to(device)
    if mode == "full":
        model.base.requires_grad_(True)  # full fine-tuning: every weight trained
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    loaded = peak_bytes(device)
    B, n, m = args.batch_size, args.seq_len, 64
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, args.vocab, (B, n + 1), generator=g).to(device)
    neighbours = None
    if mode != "full":
        neighbours = torch.randint(1, args.vocab, (B, n // m, 2, 2 * m), generator=g).to(device)
    times = []
    model.train()
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model.loss(tokens[:, :-1], tokens[:, 1:], neighbours)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup :])
    return {
        "mode": mode,
        "trained_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_s": step_s,
        "tokens_per_s": B * n / step_s,
        "loaded_bytes": loaded,
        "peak_bytes": peak_bytes(device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256, help="a multiple of 64")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--enc-dim", type=int, default=896, help="retrieval encoder width d'")
    p.add_argument("--enc-heads", type=int, default=14)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="the base in bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one subprocess's mode
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.base, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make_base(base, args)
        results = []
        for mode in MODES:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--base", str(base)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; device {args.device}"
        f"{', base bf16' if args.bf16 else ''}"
    )
    print(
        f"base: GPT-2 shape, {args.layers} layers, width {args.width}, {args.heads} heads, "
        f"vocab {args.vocab}; encoder width {args.enc_dim}; batch {args.batch_size} x "
        f"{args.seq_len} tokens; k = 2 neighbours of 128 tokens per 64-token chunk; "
        f"{args.steps} timed steps (median) after {args.warmup}"
    )
    print(
        "| mode | trained params | tokens/s | step s | memory loaded | peak memory | training's |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gib = 2**30
        print(
            f"| {r['mode']} | {r['trained_params'] / 1e6:.1f}M of {r['total_params'] / 1e6:.1f}M "
            f"| {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['loaded_bytes'] / gib:.2f} GiB "
            f"| {r['peak_bytes'] / gib:.2f} GiB | {(r['peak_bytes'] - r['loaded_bytes']) / gib:.2f} "
            "GiB |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
