"""Continuous batching: many sequences decoded together, one forward pass per step.

`BatchDecoder` owns a `RETRO.slot_cache` of `slots` rows. A sequence joins at any step (its
window is encoded into a free row), and every step feeds one token to each running sequence
through a single `RETRO.decode_rows` call, whatever their lengths. The windows to encode in a
step (of every sequence that joined, or whose window slid) go through `RETRO.prefill_rows`,
one forward pass for all the windows of similar length (`prefill_groups`): the sixteenth of
sixteen requests arriving together waits for one prefill, not fifteen, and a long slid window
does not pad short prompts to its length. Each sequence follows `RETRO.generate`'s
rules: retrieval when a chunk completes (grouped by retriever, one search for all the rows that
complete a chunk in the same step), and past max_seq_len the window drops its oldest chunk
(`window_start`) and the row is encoded again.

A model without `slot_cache` (a RETRO-fitted Hugging Face model, `retrolm.hf`, whose keys and
values live in the base's own cache) is decoded the same way but one sequence per forward
pass: each sequence keeps its own generation cache (`_new_cache` / `_forward_cached`, the calls
`RETRO.generate`'s loop makes), so requests interleave token by token without being batched.
A RETRO[OFF] sequence (no retriever) of a retrieval model is decoded that way too: the slot
cache's rows read neighbours, and a row would otherwise read those its previous occupant left.

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
from retrolm.serve.scoring import pick_logprobs

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
    logprobs: int | None = None  # keep each token's log-probability and this many top ids
    # state kept by the decoder
    prompt_len: int = 0
    slot: int | None = None
    start: int = -1  # first position of the window in the row (-1: not encoded yet)
    neighbours: list[Tensor] = field(default_factory=list)  # (k, r) per chunk, retrieved once
    retrieved: list[Any] = field(default_factory=list)  # the retriever's info per chunk, if any
    cache: Any = None  # its own generation cache, for a model decoded one sequence at a time
    # with `logprobs`: (log-probability, [(id, log-probability)] of the top ids) per new token,
    # under the model's distribution (no temperature, top-k or top-p)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.generated >= self.max_new_tokens


def prefill_groups(lengths: list[int], small: int) -> list[list[int]]:
    """Indices of windows to encode together, longest first: a window joins the current group
    while the group's padded tokens stay within 1.25x its real ones, or while the group's
    longest window has at most `small` tokens (below that a forward pass costs more than its
    padding). So one pass serves every join of similar length, and a long slid window does not
    make a dozen short prompts pay for its length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            group, longest = groups[-1], lengths[groups[-1][0]]
            if longest <= small or 4 * (len(group) + 1) * longest <= 5 * (real + lengths[i]):
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


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

    def step(self, only: list[Sequence] | None = None) -> list[tuple[Sequence, int]]:
        """One token for every running sequence (or for those of `only`): [(sequence, new
        token)], finished ones removed. A step that raises appends no token; a sequence whose
        row it may have half-written decodes on after `start = -1` (its window encoded again)."""
        for s in [s for s in self.running if s.finished]:
            self.remove(s)
        seqs = [s for s in self.running if only is None or s in only]
        if not seqs:
            return []
        self._retrieve(seqs)
        if self.batched:
            logits = self._step_batched(seqs)
        else:
            m, N = self.cfg.chunk_size, self.cfg.max_seq_len
            logits = [self._step_alone(s, window_start(len(s.tokens), N, m)) for s in seqs]
        return self._pick(seqs, logits)

    def _step_batched(self, seqs: list[Sequence]) -> list[Tensor]:
        """Logits (V,) per sequence: `prefill_rows` for the sequences that joined or whose window
        slid (one pass per group of similar lengths), one `decode_rows` for all the others."""
        m, N = self.cfg.chunk_size, self.cfg.max_seq_len
        prefill, decode = [], []
        logits: dict[int, Tensor] = {}
        for s in seqs:
            w = window_start(len(s.tokens), N, m)
            if s.retrieve is None and self.cache.retrieval:
                # RETRO[OFF] in a retrieval model: the slot cache's rows always read
                # neighbours, so it decodes through a cache of its own, without any
                logits[id(s)] = self._step_alone(s, w)
            elif w != s.start:  # joined, or the window slid: encode tokens w.. into its row
                s.start = w
                prefill.append(s)
            else:
                decode.append(s)
        if prefill:
            logits.update(zip(map(id, prefill), self._prefill(prefill), strict=True))
        if decode:
            logits.update(zip(map(id, decode), self._decode(decode), strict=True))
        return [logits[id(s)] for s in seqs]

    def _prefill(self, seqs: list[Sequence]) -> list[Tensor]:
        """Encode the windows of `seqs` into their rows: logits (V,) per sequence. Windows of
        similar length share one forward pass (`prefill_groups`), so that a short join is not
        padded to a long slid window."""
        m = self.cfg.chunk_size
        windows = [
            torch.tensor(s.tokens[s.start :], dtype=torch.long, device=self.device) for s in seqs
        ]
        neighbours = [self._window_neighbours(s, s.start // m, len(s.tokens) // m) for s in seqs]
        out: list[Tensor | None] = [None] * len(seqs)
        for group in prefill_groups([len(w) for w in windows], 2 * m):
            logits = self.model.prefill_rows(
                self.cache,
                [seqs[i].slot for i in group],
                [windows[i] for i in group],
                [neighbours[i] for i in group],
            )  # (G, V)
            for i, row in zip(group, logits, strict=True):
                out[i] = row
        return out  # type: ignore[return-value]

    def _decode(self, seqs: list[Sequence]) -> Tensor:
        """Feed the last token of each of `seqs` at its position in one forward pass: (R, V)."""
        m = self.cfg.chunk_size
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        order = rows.argsort()  # rows ascending: usually one contiguous slice of the cache
        seqs = [seqs[j] for j in order.tolist()]
        toks = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)
        pos = torch.tensor([len(s.tokens) - 1 - s.start for s in seqs], device=self.device)
        complete = [s for s in seqs if len(s.tokens) % m == 0 and s.retrieve is not None]
        nb = None
        if complete:
            nb = torch.stack([s.neighbours[len(s.tokens) // m - 1] for s in complete])
        out = self.model.decode_rows(self.cache, rows[order], toks, pos, nb)  # (R, V)
        self.steps += 1
        return out[order.argsort()]  # back in the order of `seqs` as given

    def _pick(self, seqs: list[Sequence], logits: list[Tensor]) -> list[tuple[Sequence, int]]:
        """Append each sequence's next token (greedy ones in one argmax); [(sequence, token)]."""
        picked: dict[int, int] = {}
        greedy = [i for i, s in enumerate(seqs) if s.temperature == 0]
        if greedy:
            tokens = torch.stack([logits[i] for i in greedy]).argmax(-1).tolist()
            picked.update(zip(greedy, tokens, strict=True))
        for i, s in enumerate(seqs):
            if s.temperature != 0:
                token = sample_next(logits[i][None], s.temperature, s.top_k, s.top_p, s.generator)
                picked[i] = int(token[0])
        for i, s in enumerate(seqs):
            s.tokens.append(picked[i])
            if s.logprobs is not None:
                target = torch.tensor([picked[i]], device=logits[i].device)
                scored = pick_logprobs(logits[i][None], target, s.logprobs)
                s.token_logprobs.append((scored.logprobs[0], scored.top[0]))
        return [(s, picked[i]) for i, s in enumerate(seqs)]

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
