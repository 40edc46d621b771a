"""retrolm's RETRO against lucidrains' RETRO-pytorch (PyPI `retro-pytorch` 0.3.9), side by side.

Measures, in one run and with the two implementations interleaved so that machine noise hits
both alike:
1. training tokens/s (forward + backward + AdamW step), fp32 and with bf16 autocast, on the
   `small` preset's configuration: decoder 384 x 6 (CCA at 3, 6), encoder 256 x 2, sequence 512,
   chunk 64, k = 2 neighbours of r = 128 tokens, batch 4, vocabulary 28996; plus achieved
   GFLOP/s (model FLOPs from `RetroConfig.flops_per_token`, the same count for both sides) against
   a measured matmul peak of this machine;
2. generation tokens/s: 512 new tokens after a 64-token prompt, batch 1 (--gen-batch), greedy,
   retrieval at every chunk (a `retrieve` that returns random tokens, so only the models are
   timed). retrolm: `RETRO.generate` (KV cache). RETRO-pytorch: the way its
   `TrainingWrapper.generate` decodes, i.e. its model's full forward over the whole sequence
   for every new token, with the neighbours of every completed chunk. --slow-stride n times
   only every n-th of its steps (spread over all lengths) and multiplies by n.

RETRO-pytorch needs `numpy<2` and `pyarrow<15` (its autofaiss dependency), so it lives in a
separate environment, never as a retrolm dependency. Create it once (the folder is gitignored):

    python3 -m venv /work/main/.bench-env        # no --system-site-packages: keeps numpy 2 out
    /work/main/.bench-env/bin/pip install torch==2.13.0 'numpy<2' 'pyarrow<15' retro-pytorch==0.3.9
    /work/main/.bench-env/bin/pip install -e /work/main --no-deps   # retrolm.model needs torch, numpy

and run:

    /work/main/.bench-env/bin/python benchmarks/model_speed.py            # ~10 minutes on 2 cores
    /work/main/.bench-env/bin/python benchmarks/model_speed.py --quick    # a smoke run

`import retro_pytorch` does not touch the network: its BERT tokenizer/model are loaded lazily
by `retro_pytorch.retrieval` only when text is embedded, which this script never does; we
import `retro_pytorch.retro_pytorch.RETRO` alone. Configuration notes for a fair comparison:
RETRO-pytorch uses one `heads`/`dim_head` for decoder and encoder, so with heads=6, dim_head=64
its encoder attention is 384 wide inside a 256-wide encoder (retrolm: 4 heads of 64); it embeds
tokens at the encoder width and projects to the decoder, adds learned absolute positions and
uses rotary on 32 of 64 head dimensions; retrolm embeds at the decoder width and projects
neighbour embeddings to the encoder width. Both compute the same loss (cross-entropy over
4 x 512 targets), each through its own training path (retrolm: `RETRO.loss`, which fuses the
output layer and the loss in row blocks; RETRO-pytorch: `model(seq, retrieved,
return_loss=True)`), and use the same optimizer (torch.optim.AdamW(lr=1e-4, fused=True)). An extra row
trains retrolm through `model(tokens, neighbours)` logits + `F.cross_entropy`, so the gain of
the fused loss is visible on its own.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from retrolm.config import RetroConfig
from retrolm.model import RETRO

VOCAB, SEQ, CHUNK, K, R, BATCH = 28996, 512, 64, 2, 128, 4
PROMPT, NEW = 64, 512


def retrolm_config(max_seq_len: int) -> RetroConfig:
    return RetroConfig(
        vocab_size=VOCAB,
        chunk_size=CHUNK,
        num_neighbours=K,
        neighbour_len=R,
        dec_dim=384,
        dec_depth=6,
        dec_heads=6,
        cca_layers=(3, 6),
        enc_dim=256,
        enc_depth=2,
        enc_heads=4,
        max_seq_len=max_seq_len,
    )


def theirs_model(max_seq_len: int) -> torch.nn.Module:
    from retro_pytorch.retro_pytorch import RETRO as TheirRETRO  # no tokenizer import

    return TheirRETRO(
        num_tokens=VOCAB,
        max_seq_len=max_seq_len,
        enc_dim=256,
        enc_depth=2,
        dec_dim=384,
        dec_depth=6,
        dec_cross_attn_layers=(3, 6),
        heads=6,
        dim_head=64,
        chunk_size=CHUNK,
        pad_id=0,
    )


# ---------------------------------------------------------------------------------------------
# training


def make_train_step(
    name: str, model: torch.nn.Module, bf16: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimizer step on seq (B, SEQ + 1): inputs seq[:, :-1], targets seq[:, 1:]."""
    # the same optimizer for both sides: AdamW with its fused (one kernel per tensor) CPU path
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step(seq: torch.Tensor, neighbours: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if name == "retrolm":  # its training loss: output layer + loss fused in row blocks
                loss = model.loss(seq[:, :-1], seq[:, 1:], neighbours)
            elif name == "retrolm, logits + F.cross_entropy":
                logits = model(seq[:, :-1], neighbours)  # (B, SEQ, V)
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1), seq[:, 1:].flatten(), ignore_index=0
                )
            else:  # RETRO-pytorch computes its own loss from seq (B, SEQ + 1)
                loss = model(seq, neighbours, return_loss=True)
        loss.backward()
        optimizer.step()

    return step


def bench_training(args: argparse.Namespace, bf16: bool) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=g)
    neighbours = torch.randint(1, VOCAB, (BATCH, SEQ // CHUNK, K, R), generator=g)
    torch.manual_seed(0)
    steps = {
        "retrolm": make_train_step("retrolm", RETRO(retrolm_config(SEQ)), bf16),
        "RETRO-pytorch": make_train_step("RETRO-pytorch", theirs_model(SEQ), bf16),
    }
    if args.logits_loss:
        name = "retrolm, logits + F.cross_entropy"
        steps[name] = make_train_step(name, RETRO(retrolm_config(SEQ)), bf16)
    for step in steps.values():  # warm-up (allocator, kernels, optimizer state)
        step(seq, neighbours)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.train_steps):
                step(seq, neighbours)
            elapsed = time.perf_counter() - start
            rates[name].append(args.train_steps * BATCH * SEQ / elapsed)
    return rates


def matmul_peak(dtype: torch.dtype, size: int = 2048, reps: int = 10) -> float:
    """Best GFLOP/s of a (size x size) @ (size x size) matmul in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# generation


def random_retrieve(chunk: torch.Tensor) -> torch.Tensor:
    """(B, m) -> (B, k, r) random tokens: the database is not what is timed."""
    return torch.randint(1, VOCAB, (chunk.shape[0], K, R))


@torch.inference_mode()
def theirs_generate(model: torch.nn.Module, prompt: torch.Tensor, new: int, stride: int) -> float:
    """RETRO-pytorch's decoding (full forward per token); returns the time for all `new` steps.

    With stride > 1 only every stride-th step is timed and the total is extrapolated
    (sum of timed steps * stride); the untimed steps still run their cheap bookkeeping.
    """
    out = prompt
    retrieved = torch.stack(
        [
            random_retrieve(prompt[:, u * CHUNK : (u + 1) * CHUNK])
            for u in range(prompt.shape[1] // CHUNK)
        ],
        1,
    )
    total = 0.0
    for i in range(new):
        if i % stride == 0:
            start = time.perf_counter()
            logits = model(out, retrieved=retrieved)[:, -1]  # (B, V)
            sampled = logits.argmax(-1, keepdim=True)
            total += (time.perf_counter() - start) * stride
        else:
            sampled = torch.randint(1, VOCAB, (out.shape[0], 1))
        out = torch.cat([out, sampled], dim=1)
        if out.shape[1] % CHUNK == 0:
            start = time.perf_counter()
            fresh = random_retrieve(out[:, -CHUNK:])[:, None]  # (B, 1, k, r)
            retrieved = torch.cat([retrieved, fresh], dim=1)
            total += time.perf_counter() - start
    return total


def bench_generation(args: argparse.Namespace) -> dict[str, list[float]]:
    new = args.new_tokens
    total_len = -(-(PROMPT + new) // CHUNK) * CHUNK
    torch.manual_seed(0)
    ours = RETRO(retrolm_config(total_len)).eval()
    theirs = theirs_model(total_len).eval()
    prompt = torch.randint(
        1, VOCAB, (args.gen_batch, PROMPT), generator=torch.Generator().manual_seed(1)
    )
    ours.generate(prompt, 8, retrieve=random_retrieve)  # warm-up
    theirs_generate(theirs, prompt, 8, 1)
    rates: dict[str, list[float]] = {"retrolm": [], "RETRO-pytorch": []}
    for _ in range(args.gen_repeats):
        start = time.perf_counter()
        ours.generate(prompt, new, retrieve=random_retrieve)
        rates["retrolm"].append(new * len(prompt) / (time.perf_counter() - start))
        theirs_time = theirs_generate(theirs, prompt, new, args.slow_stride)
        rates["RETRO-pytorch"].append(new * len(prompt) / theirs_time)
    start = time.perf_counter()
    ours.generate(prompt, new, retrieve=random_retrieve)  # once more: bracket the slow side
    rates["retrolm"].append(new * len(prompt) / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------------------------------------------------


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
    except OSError:
        load = ["?"]
    return (
        f"{model}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
        f"load average {' '.join(load)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved training rounds")
    parser.add_argument("--train-steps", type=int, default=3, help="steps per round and side")
    parser.add_argument("--gen-repeats", type=int, default=1, help="generation rounds")
    parser.add_argument("--new-tokens", type=int, default=NEW)
    parser.add_argument(
        "--slow-stride",
        type=int,
        default=1,
        help="time every n-th RETRO-pytorch decoding step and extrapolate (1: time all)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--gen-batch", type=int, default=1, help="prompts generated at once")
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--no-logits-loss",
        dest="logits_loss",
        action="store_false",
        help="skip the extra retrolm row that trains through logits + F.cross_entropy",
    )
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.train_steps, args.new_tokens, args.slow_stride = 1, 1, 64, 8

    print(f"machine: {machine()}")
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    flops = retrolm_config(SEQ).flops_per_token(SEQ, K)  # fwd + bwd
    rows = []
    if not args.skip_train:
        for precision in ("fp32", "bf16"):
            rates = bench_training(args, bf16=precision == "bf16")
            theirs = statistics.median(rates.pop("RETRO-pytorch"))
            target = 1.5 if precision == "fp32" else 3.0
            for name, values in rates.items():
                ours = statistics.median(values)
                label = f"training tokens/s, {precision}" + (
                    "" if name == "retrolm" else f" ({name})"
                )
                note = (
                    f"{ours * flops / 1e9:.0f} vs {theirs * flops / 1e9:.0f} GFLOP/s; "
                    f"matmul peak {peak[precision]:.0f}"
                )
                rows.append((label, ours, theirs, target, note))
    if not args.skip_generate:
        rates = bench_generation(args)
        ours, theirs = (
            statistics.median(rates["retrolm"]),
            statistics.median(rates["RETRO-pytorch"]),
        )
        note = "RETRO-pytorch extrapolated" if args.slow_stride > 1 else "all steps timed"
        label = f"generation tokens/s ({args.new_tokens} new, batch {args.gen_batch})"
        rows.append((label, ours, theirs, 30.0, note))
    print(f"model FLOPs per trained token (fwd+bwd): {flops / 1e6:.1f} MFLOP")
    print()
    print("| measure | retrolm | RETRO-pytorch | ratio | target | met | notes |")
    print("|---|---|---|---|---|---|---|")
    for label, ours, theirs, target, note in rows:
        ratio = ours / theirs
        met = "yes" if ratio >= target else "NO"
        print(
            f"| {label} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}x | >= {target:g}x | {met} | {note} |"
        )
    print(f"\nat the end: {machine()}")


if __name__ == "__main__":
    main()
