"""Training throughput of `retrolm train` end to end (data loading included) vs the model alone.

Side by side, in one run, same model config, batch and sequence length:

1. `retrolm train` as a user runs it (a subprocess), on a real database: tokens/s from its
   metrics.jsonl, and the time each step spent building its batches (`data_s`).
2. The model alone: forward + backward + AdamW on batches built beforehand (the model
   benchmark's figure), same threads.

The input pipeline's share of a step (data_s / step_s) must be < 10%.

    python benchmarks/train_speed.py --db DB [--preset small] [--steps 12] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def end_to_end(db: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "retrolm", "-q", "train", "--db", str(db), "--out", str(out),
        "--preset", args.preset, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--eval-every", "0", "--checkpoint-every", str(10 * args.steps), "--no-progress",
        "--warmup", "2",
    ]  # fmt: skip
    if args.bf16:
        cmd.append("--bf16")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[args.warmup :]
    step_s = statistics.mean(r["step_s"] for r in steady)
    data_s = statistics.mean(r["data_s"] for r in steady)
    tokens_per_step = args.batch_size * json.loads((out / "run.json").read_text())["seq_len"]
    return {
        "wall_s": wall,
        "step_s": step_s,
        "data_s": data_s,
        "tokens_per_s": tokens_per_step / step_s,
        "tokens_per_step": tokens_per_step,
    }


def model_only(db: Path, args: argparse.Namespace, run: Path) -> dict[str, float]:
    """The same steps on pre-built batches: forward + backward + clip + AdamW."""
    from retrolm.data import RetroSamples
    from retrolm.database import Database
    from retrolm.model import RETRO
    from retrolm.train import TrainConfig, build_optimizer, token_nll

    model = RETRO.load(run / "model")
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, bf16=args.bf16)
    source = Database.open(db)
    k = model.cfg.num_neighbours if model.cfg.cca_layers else 0
    data = RetroSamples(source, "train", model.cfg.max_seq_len, k)
    rng = np.random.default_rng(0)
    batches = [data.get(rng.choice(len(data), args.batch_size, replace=False)) for _ in range(4)]
    opt = build_optimizer(model, cfg)
    model.train()
    times = []
    for i in range(args.steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        nll, count = token_nll(model, b.tokens, b.neighbours, b.targets, args.bf16)
        (nll / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.mean(times[args.warmup :])
    tokens = args.batch_size * model.cfg.max_seq_len
    flops = model.cfg.flops_per_token(model.cfg.max_seq_len, k) * tokens / step_s
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "gflops": flops / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the means")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        e2e = end_to_end(args.db, args, run)
        alone = model_only(args.db, args, run)
    share = e2e["data_s"] / e2e["step_s"]
    print(
        f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"load average before/after: {os.getloadavg()}")
    print(
        f"config: preset {args.preset}, batch {args.batch_size}, {e2e['tokens_per_step']} tokens/step, bf16 {args.bf16}"
    )
    print(
        f"retrolm train end to end : {e2e['tokens_per_s']:9.1f} tokens/s  ({e2e['step_s']:.3f} s/step)"
    )
    print(
        f"model only               : {alone['tokens_per_s']:9.1f} tokens/s  ({alone['step_s']:.3f} s/step, {alone['gflops']:.1f} GFLOP/s)"
    )
    print(f"end to end / model only  : {e2e['tokens_per_s'] / alone['tokens_per_s']:.3f}")
    print(
        f"input pipeline per step  : {e2e['data_s'] * 1000:.2f} ms = {100 * share:.2f}% of step time (target < 10%)"
    )
    print(f"target met: {share < 0.10}")


if __name__ == "__main__":
    main()
