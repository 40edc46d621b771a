"""The padding cost of batched prefill: one step where fifteen 64-token prompts join while one
sequence's window slides (a window of up to 449 tokens to encode again), on the small preset,
encoded three ways side by side: one `prefill_rows` pass (padded to the longest window), the
groups `BatchDecoder` uses (`prefill_groups`), and one pass per window.

    python benchmarks/prefill_padding.py [--threads 1] [--rounds 3]

Prints the median seconds of each way over the rounds (after a warm-up round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from retrolm.config import RetroConfig
from retrolm.decoding import prefill_groups
from retrolm.model import RETRO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads <= 0 or args.rounds <= 0:
        print("prefill_padding.py: --threads and --rounds must be > 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = RetroConfig.preset("small")
    model = RETRO(cfg).eval()
    m, k = cfg.chunk_size, 2
    cache = model.new_cache(16, retrieval=True)
    lengths = [64] * 15 + [min(449, cfg.max_seq_len)]
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
    neighbours = [
        torch.randint(1, cfg.vocab_size, (n // m, k, cfg.neighbour_len), generator=g)
        if n >= m
        else None
        for n in lengths
    ]

    def encode(groups: list[list[int]]) -> None:
        with torch.inference_mode():
            for group in groups:
                model.prefill_rows(
                    cache, group, [windows[i] for i in group], [neighbours[i] for i in group]
                )

    ways = {
        "one padded pass": [list(range(16))],
        "grouped (prefill_groups)": prefill_groups(lengths, 2 * m),
        "one pass per window": [[i] for i in range(16)],
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(-1, args.rounds):  # round -1 warms up
        for name, groups in ways.items():
            start = time.perf_counter()
            encode(groups)
            if r >= 0:
                times[name].append(time.perf_counter() - start)
    print(f"small preset, windows 15 x 64 + 1 x {lengths[-1]} tokens, {args.threads} thread(s)")
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.3f} s ({len(ways[name])} passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
