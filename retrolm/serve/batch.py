"""Continuous batching: many sequences decoded together, one forward pass per step.

`BatchDecoder` owns a `RETRO.slot_cache` of `slots` rows. A sequence joins at any step (its
window is encoded into a free row by `RETRO.prefill_row`), and every step feeds one token to
each running sequence through a single `RETRO.decode_rows` call, whatever their lengths.
Each sequence follows `RETRO.generate`'s rules: retrieval when a chunk completes (grouped by
retriever, one search for all the rows that complete a chunk in the same step), and past
max_seq_len the window drops its oldest chunk (`window_start`) and the row is encoded again.

A model without `slot_cache` (a RETRO-fitted Hugging Face model, `retrolm.hf`, whose keys and
values live in the base's own cache) is decoded the same way but one sequence per forward
pass: each sequence keeps its own generation cache (`_new_cache` / `_forward_cached`, the calls
`RETRO.generate`'s loop makes), so requests interleave token by token without being batched.

It is synchronous and single-threaded; `retrolm.serve.engine.Engine` runs it in a worker
thread. Greedy output of a sequence does not depend on what else is in the batch (up to float
rounding): tests/test_serve_batching.py checks it against `RETRO.generate` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retrolm.model import RETRO, sample_next, window_start

# retrieve(chunks (C, m) int64 numpy) -> neighbour tokens (C, k, r) int64 (numpy or tensor),
# or (tokens, [info per chunk]): each info is kept in `Sequence.retrieved` (e.g. for attribution)
BatchRetrieve = Callable[[np.ndarray], Any]


@dataclass(eq=False)
class Sequence:
    """One sequence being decoded. `tokens` grows by one token per step."""

    tokens: list[int]  # prompt, then generated tokens
    max_new_tokens: int
    retrieve: BatchRetrieve | None = None  # None: RETRO[OFF]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    tag: Any = None  # the caller's handle (e.g. the server's request)
    # state kept by the decoder
    prompt_len: int = 0
    slot: int | None = None
    start: int = -1  # first position of the window in the row (-1: not encoded yet)
    neighbours: list[Tensor] = field(default_factory=list)  # (k, r) per chunk, retrieved once
    retrieved: list[Any] = field(default_factory=list)  # the retriever's info per chunk, if any
    cache: Any = None  # its own generation cache, for a model decoded one sequence at a time

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.generated >= self.max_new_tokens


class BatchDecoder:
    """Decodes up to `slots` sequences at once; see the module docstring."""

    def __init__(self, model: RETRO, slots: int, k: int, device: torch.device | str = "cpu"):
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.k = k
        self.batched = hasattr(model, "slot_cache")  # else one sequence per forward pass
        self.cache = (
            model.slot_cache(slots, k, retrieval=model.cfg.retrieval, device=self.device)
            if self.batched
            else None
        )
        self.free = list(range(slots))
        self.running: list[Sequence] = []
        self.steps = 0  # forward passes of decode_rows (for tests and stats)

    @property
    def has_room(self) -> bool:
        return bool(self.free)

    def add(self, seq: Sequence) -> None:
        """Start decoding `seq` at the next step (its prompt is encoded then)."""
        if not self.free:
            raise RuntimeError("no free slot; check has_room first")
        if not 1 <= len(seq.tokens) <= self.cfg.max_seq_len:
            raise ValueError(
                f"a prompt of {len(seq.tokens)} tokens; 1 to max_seq_len "
                f"({self.cfg.max_seq_len}) are allowed"
            )
        if seq.retrieve is not None and not self.cfg.retrieval:
            seq.retrieve = None
        self.free.sort()
        seq.slot, seq.start = self.free.pop(0), -1
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Stop decoding `seq` (finished, cancelled) and free its row."""
        if seq in self.running:
            self.running.remove(seq)
            assert seq.slot is not None
            self.free.append(seq.slot)
            seq.slot = None
            seq.cache = None

    def step(self) -> list[tuple[Sequence, int]]:
        """One token for every running sequence: [(sequence, new token)], finished ones removed."""
        seqs = [s for s in self.running if not s.finished]
        for s in [s for s in self.running if s.finished]:
            self.remove(s)
        if not seqs:
            return []
        m, N = self.cfg.chunk_size, self.cfg.max_seq_len
        self._retrieve(seqs)
        logits: dict[int, Tensor] = {}
        decode: list[Sequence] = []
        for i, s in enumerate(seqs):
            t = len(s.tokens)
            w = window_start(t, N, m)
            if not self.batched:
                logits[i] = self._step_alone(s, w)
            elif w != s.start:  # joined, or the window slid: encode tokens w..t-1 into its row
                s.start = w
                window = torch.tensor(s.tokens[w:t], dtype=torch.long, device=self.device)
                nb = self._window_neighbours(s, w // m, t // m)
                logits[i] = self.model.prefill_row(self.cache, s.slot, window, nb)
            else:
                decode.append(s)
        if decode:
            rows = torch.tensor([s.slot for s in decode], device=self.device)
            order = rows.argsort()  # rows ascending: usually one contiguous slice of the cache
            decode = [decode[j] for j in order.tolist()]
            rows = rows[order]
            toks = torch.tensor([s.tokens[-1] for s in decode], device=self.device)
            pos = torch.tensor([len(s.tokens) - 1 - s.start for s in decode], device=self.device)
            complete = [s for s in decode if len(s.tokens) % m == 0 and s.retrieve is not None]
            nb = None
            if complete:
                nb = torch.stack([s.neighbours[len(s.tokens) // m - 1] for s in complete])
            out = self.model.decode_rows(self.cache, rows, toks, pos, nb)  # (R, V)
            self.steps += 1
            index = {id(s): i for i, s in enumerate(seqs)}
            for j, s in enumerate(decode):
                logits[index[id(s)]] = out[j]
        results = []
        greedy = [i for i, s in enumerate(seqs) if s.temperature == 0]
        if greedy:
            picked = torch.stack([logits[i] for i in greedy]).argmax(-1).tolist()
            for i, token in zip(greedy, picked):
                results.append((i, token))
        for i, s in enumerate(seqs):
            if s.temperature != 0:
                token = sample_next(logits[i][None], s.temperature, s.top_k, s.top_p, s.generator)
                results.append((i, int(token[0])))
        out_list = []
        for i, token in sorted(results):
            seqs[i].tokens.append(token)
            out_list.append((seqs[i], token))
        return out_list

    @torch.inference_mode()
    def _step_alone(self, s: Sequence, w: int) -> Tensor:
        """Logits (V,) for the next token of `s` through its own cache, as `windowed_generate`
        feeds it: the whole window when it starts (or slid), then one token per step, with the
        neighbours of every chunk completed since the last call."""
        m, t = self.cfg.chunk_size, len(s.tokens)
        if w != s.start:
            s.start, feed_from = w, w
            size = min(self.cfg.max_seq_len, s.prompt_len + s.max_new_tokens)
            ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            s.cache = self.model._new_cache(ids, size, s.retrieve is not None)
        else:
            feed_from = t - 1
        done = w // m + s.cache.num_chunks  # chunks whose neighbours are encoded
        neighbours = None
        if s.retrieve is not None and t // m > done:
            neighbours = torch.stack(s.neighbours[done : t // m])[None]  # (1, U, k, r)
        tokens = torch.tensor([s.tokens[feed_from:t]], dtype=torch.long, device=self.device)
        return self.model._forward_cached(tokens, s.cache, neighbours)[0]  # (V,)

    def _window_neighbours(self, s: Sequence, u0: int, u1: int) -> Tensor | None:
        if s.retrieve is None or u1 <= u0:
            return None
        return torch.stack(s.neighbours[u0:u1])  # (U, k, r)

    def _retrieve(self, seqs: list[Sequence]) -> None:
        """Neighbours for every chunk completed and not yet retrieved, one call per retriever."""
        m = self.cfg.chunk_size
        wanted: dict[int, tuple[BatchRetrieve, list[tuple[Sequence, int]]]] = {}
        for s in seqs:
            if s.retrieve is None:
                continue
            for u in range(len(s.neighbours), len(s.tokens) // m):
                wanted.setdefault(id(s.retrieve), (s.retrieve, []))[1].append((s, u))
        for retrieve, items in wanted.values():
            chunks = np.array([s.tokens[u * m : (u + 1) * m] for s, u in items], dtype=np.int64)
            found, infos = retrieve(chunks), None
            if isinstance(found, tuple):
                found, infos = found
            found = torch.as_tensor(np.asarray(found) if not isinstance(found, Tensor) else found)
            if found.dim() != 3 or found.shape[0] != len(items) or found.shape[1] != self.k:
                raise ValueError(
                    f"retrieve returned shape {tuple(found.shape)}; expected "
                    f"({len(items)}, k={self.k}, r={self.cfg.neighbour_len})"
                )
            found = found.to(self.device, torch.long)
            for j, ((s, u), nb) in enumerate(zip(items, found)):
                assert u == len(s.neighbours)
                s.neighbours.append(nb)
                if infos is not None:
                    s.retrieved.append(infos[j])
