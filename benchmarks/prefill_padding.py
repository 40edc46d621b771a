"""The padding cost of batched prefill: one step where fifteen 64-token prompts join while one
sequence's window slides (a window of up to 449 tokens to encode again), on the small preset,
encoded three ways side by side: one `prefill_rows` pass (padded to the longest window), the
groups `BatchDecoder` uses (`prefill_groups`), and one pass per window.

    python benchmarks/prefill_padding.py      (1 thread; prints the median of 3 rounds)
"""

import time

import torch

torch.set_num_threads(1)
from retrolm.config import RetroConfig
from retrolm.model import RETRO
from retrolm.serve.batch import prefill_groups

cfg = RetroConfig.preset("small")
torch.manual_seed(0)
model = RETRO(cfg).eval()
m, N = cfg.chunk_size, cfg.max_seq_len
k = 2
cache = model.slot_cache(16, k, retrieval=True)
lengths = [64] * 15 + [min(449, N)]
g = torch.Generator().manual_seed(0)
wins = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
nbs = [
    torch.randint(1, cfg.vocab_size, (n // m, k, cfg.neighbour_len), generator=g)
    if n >= m
    else None
    for n in lengths
]


def one():
    with torch.inference_mode():
        model.prefill_rows(cache, list(range(16)), wins, nbs)


def grouped():
    with torch.inference_mode():
        for gr in prefill_groups(lengths, 2 * m):
            model.prefill_rows(cache, gr, [wins[i] for i in gr], [nbs[i] for i in gr])


def alone():
    with torch.inference_mode():
        for i in range(16):
            model.prefill_rows(cache, [i], [wins[i]], [nbs[i]])


t = {"one pass": [], "grouped": [], "one by one": []}
for r in range(4):
    for name, f in (("one pass", one), ("grouped", grouped), ("one by one", alone)):
        a = time.perf_counter()
        f()
        t[name].append(time.perf_counter() - a)
print(
    "small preset, lengths 15 x 64 + 1 x",
    lengths[-1],
    "groups",
    [len(x) for x in prefill_groups(lengths, 2 * m)],
)
for n, v in t.items():
    print(n, "median of 3 after warm-up", round(sorted(v[1:])[1], 3), "s")
