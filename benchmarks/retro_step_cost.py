"""What a RETRO training step costs against the baseline's, and what each cost lever buys.

The quickstart's model (RetroConfig preset "quickstart": 128x4 decoder, CCA at layers 2 and 4,
a 2-block 128-wide encoder reading k=2 neighbours of r=128 tokens per 64-token chunk) trains at
batch 8 x 256 like `retrolm quickstart`. Each variant changes one thing; every variant is timed
in every round, in turn, so that the ratios are measured side by side under the same load:

    python benchmarks/retro_step_cost.py [--threads 1] [--rounds 5] [--json]

Printed per variant: the median seconds per step (forward, backward, AdamW, on random tokens,
`retrolm.quickstart.measure_train_step`), the ratio to the baseline step, and the ratio to the
default RETRO step. The bits per byte these variants reach are measured by
`benchmarks/retrieval_gain.py --tag ... --set ...`, not here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

# name -> (RetroConfig overrides of the quickstart preset, training: k, bf16, retrofit)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline": (dict(cca_layers=()), {}),
    "retro": ({}, {}),
    "retro bf16": ({}, dict(bf16=True)),
    "retro-fit (decoder frozen)": ({}, dict(retrofit=True)),
    "k=1": ({}, dict(k=1)),
    "neighbour_len 64 (no continuation)": (dict(neighbour_len=64), {}),
    "enc_dim 64": (dict(enc_dim=64, enc_heads=2), {}),
    "enc_depth 1": (dict(enc_depth=1), {}),
    "CCA at layer 4 only": (dict(cca_layers=(4,)), {}),
    "baseline bf16": (dict(cca_layers=()), dict(bf16=True)),
    "copy head": (dict(copy_head=True), {}),
    "copy head, retro-fit": (dict(copy_head=True), dict(retrofit=True)),
    "copy head, retro-fit bf16": (dict(copy_head=True), dict(retrofit=True, bf16=True)),
}


def measure(rounds: int, batch: int, seq_len: int) -> dict[str, list[float]]:
    from retrolm.config import RetroConfig
    from retrolm.quickstart import measure_train_step

    configs = {name: RetroConfig.preset("quickstart", **m) for name, (m, _) in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(-1, rounds):  # round -1 warms up allocator and thread pool; not counted
        for name, (_, train) in VARIANTS.items():
            t = measure_train_step(
                configs[name],
                batch,
                seq_len,
                train.get("k", 2),
                bf16=train.get("bf16", False),
                retrofit=train.get("retrofit", False),
            )
            if r >= 0:
                times[name].append(t)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=5, help="times every variant is measured")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    if args.threads <= 0 or args.rounds <= 0 or args.batch_size <= 0 or args.seq_len <= 0:
        print("retro_step_cost.py: --threads, --rounds, --batch-size, --seq-len must be > 0",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch

    torch.set_num_threads(args.threads)
    times = measure(args.rounds, args.batch_size, args.seq_len)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base, retro = median["baseline"], median["retro"]
    print(f"{args.threads} thread(s), batch {args.batch_size} x {args.seq_len}, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| variant | s/step | vs baseline | vs RETRO |\n|---|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f}x | {t / retro:.2f}x |")
    if args.json:
        print(json.dumps({"threads": args.threads, "rounds": args.rounds, "median_s": median,
                          "all_s": times}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
