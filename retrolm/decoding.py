"""Decoding: one loop for every retrieval model; a single sequence is a batch of one.

A model that decodes implements `Decodable` (`RETRO` and a RETRO-fitted Hugging Face model,
`retrolm.hf.RetroFitted`, both through `retrolm.model.RetrievalModel`): a cache of independent
rows (`new_cache`), `prefill_rows`, which encodes windows into rows from position 0 in one
forward pass, and `decode_rows`, which feeds one token to each of several rows, each at its own
position, in one forward pass.

`BatchDecoder` decodes any number of sequences over those three calls; a sequence joins at any
step. `generate` (behind `model.generate`) decodes the B rows of a prompt as B sequences of one
`BatchDecoder`; the server (`retrolm.serve.engine`) runs one for all its requests. So when a
chunk retrieves, how the window slides and how a token is drawn are written once, here:

- Retrieval: when a chunk of m tokens is complete and a later token is about to be fed (the
  token that completes it is fed with its neighbours), the chunk's neighbours are retrieved,
  once; one call per retriever and step, for every row that completes a chunk.
- The window: the model reads at most max_seq_len tokens, from `window_start`. When the window
  is full its oldest whole chunk is dropped and the row is encoded again (`prefill_rows`) with
  the neighbours already retrieved for the kept chunks, so decoding runs past max_seq_len.
- Windows to encode in one step go through `prefill_rows` grouped by length
  (`prefill_groups`), so the sixteenth of sixteen requests arriving together waits for one
  prefill, not sixteen, and a long slid window does not pad short prompts to its length.
- RETRO[ON] and RETRO[OFF] sequences live in two caches (`retrieval` on and off), each made
  at its first use, so that an OFF row never reads neighbours a former occupant left.

Greedy output of a sequence does not depend on what else is in the batch (up to float
rounding), and equals recomputation with `model(window, neighbours)`
(tests/test_generate_window.py, tests/test_serve_batching.py, tests/test_hf.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from retrolm.inputs import check_ids, check_tokens

# retrieve(chunk (B, m) int64) -> neighbour tokens (B, k, r) int64: `generate`'s retriever
Retrieve = Callable[[Tensor], Tensor]
# retrieve(chunks (C, m) int64 numpy) -> neighbour tokens (C, k, r) int64 (numpy or tensor),
# or (tokens, [info per chunk]): each info is kept in `Sequence.retrieved` (e.g. attribution)
BatchRetrieve = Callable[[np.ndarray], Any]


class Decodable(Protocol):
    """What `BatchDecoder` needs of a model. `cfg` gives chunk_size, max_seq_len, retrieval,
    vocab_size and pad_id; the cache is the model's own type."""

    cfg: Any

    def eval(self) -> Any:
        """Inference mode of its layers (an `nn.Module`'s)."""
        ...

    def new_cache(
        self,
        rows: int,
        size: int | None = None,
        retrieval: bool = True,
        device: torch.device | str = "cpu",
    ) -> Any:
        """A cache of `rows` independent rows of `size` (default max_seq_len) positions;
        `retrieval` False: CCA off (RETRO[OFF]) for every row."""
        ...

    def prefill_rows(
        self,
        cache: Any,
        rows: list[int] | Tensor,
        windows: list[Tensor],
        neighbours: list[Tensor | None] | None = None,
    ) -> Tensor:
        """Encode windows[i] (T_i,) into row rows[i] from position 0 (neighbours[i]
        (T_i // m, k, r) of its completed chunks): (R, V) logits of each row's next token."""
        ...

    def decode_rows(
        self,
        cache: Any,
        rows: Tensor,
        tokens: Tensor,
        positions: Tensor,
        neighbours: Tensor | None = None,
    ) -> Tensor:
        """Feed tokens[i] at positions[i] of row rows[i] (neighbours (C, k, r) of the rows whose
        token completes a chunk, in row order): (R, V) logits of each row's next token."""
        ...


def window_start(length: int, max_seq_len: int, chunk_size: int) -> int:
    """First position of the window the model reads to predict token `length`.

    The window holds tokens window_start .. length-1: all of them while length <= max_seq_len;
    past that, it starts at the first chunk boundary that leaves at most max_seq_len tokens
    (the oldest whole chunks are dropped, the fewest that make room), so it holds between
    max_seq_len - chunk_size + 1 and max_seq_len tokens and every kept chunk keeps its
    neighbours.
    """
    over = length - max_seq_len
    return 0 if over <= 0 else -(-over // chunk_size) * chunk_size


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V): argmax if temperature is 0, else sampled.

    Any temperature >= 0 and top_p in (0, 1] give a valid draw: a temperature below 1e-5 is
    greedy (the distribution is the argmax's up to float rounding), the logits are shifted so
    that the best is 0 before the division (nothing overflows to inf), top-p always keeps the
    most likely token, NaN logits are never drawn (+inf ones are the likeliest), and a row
    without any finite or +inf logit is drawn uniformly."""
    if temperature < 1e-5:
        return logits.argmax(dim=-1)
    logits = logits.float()
    big = torch.finfo(logits.dtype).max
    logits = logits.nan_to_num(nan=float("-inf"), posinf=big, neginf=float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    logits = torch.where(top > float("-inf"), logits - top, torch.zeros_like(logits))
    logits = logits / temperature  # (B, V), at most 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop_sorted[:, 0] = False  # the most likely token stays, however small top_p is
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@dataclass
class TokenLogprobs:
    """Per token of a sequence: its log-probability (None for a prompt's first token) and the
    `top` most likely ids with theirs (None for a prompt's first token)."""

    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def extend(self, other: TokenLogprobs) -> None:
        self.logprobs += other.logprobs
        self.top += other.top


def pick_logprobs(logits: Tensor, targets: Tensor, top: int) -> TokenLogprobs:
    """The log-probability of each target under its row of `logits` (n, V), and the `top` most
    likely ids of the row (the raw distribution: no temperature, top-k or top-p)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return TokenLogprobs(list(chosen), tops)  # type: ignore[arg-type]


def check_retrieved(
    cfg: Any, neighbours: Any, batch: int, shape: list[int], name: str = "retrieve(chunk)"
) -> Tensor:
    """A retriever's answer for `batch` chunks as an int64 tensor (batch, k, r), checked: the
    same k and r at every call (`shape` holds them once known), ids in the vocabulary."""
    if not isinstance(neighbours, Tensor) and hasattr(neighbours, "__array__"):
        neighbours = torch.as_tensor(np.asarray(neighbours))  # a numpy array from the database
    if isinstance(neighbours, Tensor) and neighbours.dtype in (torch.int32, torch.int16):
        neighbours = neighbours.long()
    expected = (
        f"(batch={batch}, k, r)" if not shape else f"(batch={batch}, k={shape[0]}, r={shape[1]})"
    )
    if (
        not isinstance(neighbours, Tensor)
        or neighbours.dim() != 3
        or neighbours.shape[0] != batch
        or neighbours.dtype != torch.long
        or (shape and list(neighbours.shape[1:]) != shape)
        or min(neighbours.shape) < 1
    ):
        got = (
            f"{tuple(neighbours.shape)} {neighbours.dtype}"
            if isinstance(neighbours, Tensor)
            else type(neighbours).__name__
        )
        raise ValueError(
            f"{name} must return an int64 tensor of shape {expected} (the same k and r at "
            f"every chunk); got {got}"
        )
    if not shape:
        shape.extend(neighbours.shape[1:])
    check_ids(cfg, neighbours, "retrieved neighbours")
    return neighbours


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
    reads: bool = False  # its row is in the retrieval cache (RETRO[ON])
    start: int = -1  # first position of the window in the row (-1: not encoded yet)
    neighbours: list[Tensor] = field(default_factory=list)  # (k, r) per chunk, retrieved once
    retrieved: list[Any] = field(default_factory=list)  # the retriever's info per chunk, if any
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


@dataclass
class _Rows:
    """The free rows of one cache: the lowest is taken first, so that running rows tend to be
    one contiguous slice (read without a copy)."""

    total: int
    used: int = 0  # rows 0..used-1 have been taken at some point
    returned: list[int] = field(default_factory=list)

    def take(self) -> int:
        if self.returned:
            self.returned.sort()
            return self.returned.pop(0)
        assert self.used < self.total
        self.used += 1
        return self.used - 1

    def give(self, row: int) -> None:
        self.returned.append(row)

    def free(self) -> list[int]:
        return sorted(self.returned + list(range(self.used, self.total)))


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
    """Decodes up to `slots` sequences at once, one forward pass per step for all the rows that
    only feed a token; see the module docstring.

    Args:
        model: a `Decodable` model.
        slots: the most sequences decoded at once.
        k: neighbours per chunk a retriever must return (None: whatever the first returns).
        size: positions per row (default and at most max_seq_len; `generate` passes what its
            prompt and new tokens need).
    """

    def __init__(
        self,
        model: Decodable,
        slots: int,
        k: int | None = None,
        device: torch.device | str = "cpu",
        size: int | None = None,
    ) -> None:
        self.model = model
        model.eval()
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.slots = slots
        self.size = min(size or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.shape: list[int] = [] if k is None else [k, self.cfg.neighbour_len]
        self.caches: dict[bool, Any] = {}  # retrieval on / off -> cache, made at first use
        self.rows = {True: _Rows(slots), False: _Rows(slots)}  # the free rows of each cache
        self.running: list[Sequence] = []
        self.steps = 0  # forward passes of decode_rows (for tests and stats)

    @property
    def has_room(self) -> bool:
        return len(self.running) < self.slots

    def add(self, seq: Sequence) -> None:
        """Start decoding `seq` at the next step (its prompt is encoded then)."""
        if not self.has_room:
            raise RuntimeError("no free slot; check has_room first")
        if not 1 <= len(seq.tokens) <= self.size:
            raise ValueError(
                f"a prompt of {len(seq.tokens)} tokens; 1 to {self.size} are allowed "
                f"(max_seq_len {self.cfg.max_seq_len})"
            )
        if seq.retrieve is not None and not self.cfg.retrieval:
            seq.retrieve = None
        seq.reads = seq.retrieve is not None
        seq.slot, seq.start = self.rows[seq.reads].take(), -1
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Stop decoding `seq` (finished, cancelled) and free its row."""
        if seq in self.running:
            self.running.remove(seq)
            assert seq.slot is not None
            self.rows[seq.reads].give(seq.slot)
            seq.slot = None

    def step(self, only: list[Sequence] | None = None) -> list[tuple[Sequence, int]]:
        """One token for every running sequence (or for those of `only`): [(sequence, new
        token)] in the order they were added; finished ones removed. A step that raises appends
        no token; a sequence whose row it may have half-written decodes on after `start = -1`
        (its window encoded again)."""
        for s in [s for s in self.running if s.finished]:
            self.remove(s)
        seqs = [s for s in self.running if only is None or s in only]
        if not seqs:
            return []
        self._retrieve(seqs)
        logits: dict[int, Tensor] = {}
        for reads in (True, False):
            group = [s for s in seqs if s.reads == reads]
            if group:
                logits.update(zip(map(id, group), self._step(reads, group), strict=True))
        return self._pick(seqs, [logits[id(s)] for s in seqs])

    def reserve(self) -> None:
        """Allocate now every tensor of the cache that RETRO[ON] sequences use (all sequences,
        for a model without retrieval), by one forward pass of a full window of padding (with
        absent neighbours) into row 0; a later sequence in row 0 overwrites all it reads. A
        server calls it at start-up, so that a batch too large for memory is refused then, not
        by its first request. (RETRO[OFF] sequences of a retrieval model get their cache at
        their first step.)"""
        reads = bool(self.cfg.retrieval)
        cache = self._cache(reads)
        m, pad = self.cfg.chunk_size, self.cfg.pad_id
        window = torch.full((self.size,), pad, dtype=torch.long, device=self.device)
        nb = None
        if reads and self.size >= m:
            if not self.shape:
                raise ValueError("reserve: the number of neighbours k is not known; give k")
            nb = torch.full(
                (self.size // m, *self.shape), pad, dtype=torch.long, device=self.device
            )
        self.model.prefill_rows(cache, [0], [window], [nb])

    def _cache(self, reads: bool) -> Any:
        if reads not in self.caches:
            self.caches[reads] = self.model.new_cache(self.slots, self.size, reads, self.device)
        return self.caches[reads]

    def _step(self, reads: bool, seqs: list[Sequence]) -> list[Tensor]:
        """Logits (V,) per sequence of one cache: `prefill_rows` for the sequences that joined or
        whose window slid, one `decode_rows` for all the others."""
        m, N = self.cfg.chunk_size, self.cfg.max_seq_len
        cache = self._cache(reads)
        prefill, decode = [], []
        for s in seqs:
            w = window_start(len(s.tokens), N, m)
            if w != s.start:  # joined, or the window slid: encode tokens w.. into its row
                s.start = w
                prefill.append(s)
            else:
                decode.append(s)
        logits: dict[int, Tensor] = {}
        if prefill:
            logits.update(zip(map(id, prefill), self._prefill(cache, prefill), strict=True))
        if decode:
            logits.update(zip(map(id, decode), self._decode(cache, decode), strict=True))
        return [logits[id(s)] for s in seqs]

    def _prefill(self, cache: Any, seqs: list[Sequence]) -> list[Tensor]:
        """Encode the windows of `seqs` into their rows: logits (V,) per sequence. Windows of
        similar length share one forward pass (`prefill_groups`)."""
        m = self.cfg.chunk_size
        windows = [
            torch.tensor(s.tokens[s.start :], dtype=torch.long, device=self.device) for s in seqs
        ]
        neighbours = [self._window_neighbours(s) for s in seqs]
        out: list[Tensor | None] = [None] * len(seqs)
        for group in prefill_groups([len(w) for w in windows], 2 * m):
            logits = self.model.prefill_rows(
                cache,
                [seqs[i].slot for i in group],
                [windows[i] for i in group],
                [neighbours[i] for i in group],
            )  # (G, V)
            for i, row in zip(group, logits, strict=True):
                out[i] = row
        return out  # type: ignore[return-value]

    def _decode(self, cache: Any, seqs: list[Sequence]) -> Tensor:
        """Feed the last token of each of `seqs` at its position in one forward pass: (R, V)."""
        m = self.cfg.chunk_size
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        order = rows.argsort()  # rows ascending: usually one contiguous slice of the cache
        seqs = [seqs[j] for j in order.tolist()]
        toks = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)
        pos = torch.tensor([len(s.tokens) - 1 - s.start for s in seqs], device=self.device)
        complete = [s for s in seqs if len(s.tokens) % m == 0 and s.reads]
        nb = None
        if complete:
            nb = torch.stack([s.neighbours[len(s.tokens) // m - 1] for s in complete])
        out = self.model.decode_rows(cache, rows[order], toks, pos, nb)  # (R, V)
        self.steps += 1
        return out[order.argsort()]  # back in the order of `seqs` as given

    def _window_neighbours(self, s: Sequence) -> Tensor | None:
        m = self.cfg.chunk_size
        u0, u1 = s.start // m, len(s.tokens) // m
        if not s.reads or u1 <= u0:
            return None
        return torch.stack(s.neighbours[u0:u1])  # (U, k, r)

    def _pick(self, seqs: list[Sequence], logits: list[Tensor]) -> list[tuple[Sequence, int]]:
        """Append each sequence's next token; [(sequence, token)]. Sequences that sample alike
        (greedy, or the same settings and generator) are drawn in one call."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, s in enumerate(seqs):
            key = (
                ("greedy",)
                if s.temperature == 0
                else (s.temperature, s.top_k, s.top_p, id(s.generator))
            )
            groups.setdefault(key, []).append(i)
        picked: dict[int, int] = {}
        for members in groups.values():
            s = seqs[members[0]]
            rows = torch.stack([logits[i] for i in members])  # (G, V)
            drawn = sample_next(rows, s.temperature, s.top_k, s.top_p, s.generator).tolist()
            picked.update(zip(members, drawn, strict=True))
        for i, s in enumerate(seqs):
            s.tokens.append(picked[i])
            if s.logprobs is not None:
                target = torch.tensor([picked[i]], device=logits[i].device)
                scored = pick_logprobs(logits[i][None], target, s.logprobs)
                s.token_logprobs.append((scored.logprobs[0], scored.top[0]))  # type: ignore
        return [(s, picked[i]) for i, s in enumerate(seqs)]

    def _retrieve(self, seqs: list[Sequence]) -> None:
        """Neighbours for every chunk completed and not yet retrieved: one call per retriever,
        its chunks ordered by chunk index, then by sequence."""
        m = self.cfg.chunk_size
        wanted: dict[int, tuple[BatchRetrieve, list[tuple[Sequence, int]]]] = {}
        for s in seqs:
            if not s.reads:
                continue
            assert s.retrieve is not None
            for u in range(len(s.neighbours), len(s.tokens) // m):
                wanted.setdefault(id(s.retrieve), (s.retrieve, []))[1].append((s, u))
        for retrieve, items in wanted.values():
            items.sort(key=lambda item: item[1])  # stable: sequences keep their order
            chunks = np.array([s.tokens[u * m : (u + 1) * m] for s, u in items], dtype=np.int64)
            found, infos = retrieve(chunks), None
            if isinstance(found, tuple):
                found, infos = found
            found = check_retrieved(self.cfg, found, len(items), self.shape, "retrieve(chunks)")
            found = found.to(self.device)
            for j, ((s, u), nb) in enumerate(zip(items, found, strict=True)):
                assert u == len(s.neighbours)
                s.neighbours.append(nb)
                if infos is not None:
                    s.retrieved.append(infos[j])


def generate(
    model: Decodable,
    prompt: Tensor,
    max_new_tokens: int,
    retrieve: Retrieve | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Continue `prompt` (B, P) by `max_new_tokens` tokens: `RETRO.generate` and
    `RetroFitted.generate` (see there); the B rows are B sequences of one `BatchDecoder`.

    `retrieve(chunk (B, m)) -> (B, k, r)` is called once per completed chunk index with that
    chunk of every row. A prompt longer than max_seq_len is read as the window would hold it
    had it been generated: its first `window_start(P, ...)` tokens are dropped unread and never
    retrieved for.
    """
    cfg = model.cfg
    if isinstance(prompt, Tensor) and prompt.dim() == 2 and prompt.shape[1] > cfg.max_seq_len:
        skip = window_start(prompt.shape[1], cfg.max_seq_len, cfg.chunk_size)
        if prompt.dtype == torch.long:
            check_ids(cfg, prompt, "prompt")
        kept = generate(
            model, prompt[:, skip:], max_new_tokens, retrieve, temperature, top_k, top_p,
            generator, on_token,
        )  # fmt: skip
        return torch.cat([prompt[:, :skip], kept], dim=1)
    check_tokens(cfg, prompt, "prompt")
    B, P = prompt.shape
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if retrieve is not None and not cfg.retrieval:
        raise ValueError("retrieve given to a model without retrieval (cca_layers is empty)")
    if max_new_tokens == 0:
        return prompt.clone()
    device = prompt.device
    shape: list[int] = []

    def rows_retrieve(chunks: np.ndarray) -> Tensor:
        """The decoder's call (every row's chunks, chunk-major) as one call per chunk index."""
        assert retrieve is not None and len(chunks) % B == 0
        ids = torch.from_numpy(chunks).to(device)
        parts = [
            check_retrieved(cfg, retrieve(ids[i : i + B]), B, shape) for i in range(0, len(ids), B)
        ]
        return torch.cat(parts)

    was_training = getattr(model, "training", False)
    try:
        decoder = BatchDecoder(model, B, None, device, size=P + max_new_tokens)
        seqs = [
            Sequence(
                row,
                max_new_tokens,
                rows_retrieve if retrieve is not None else None,
                temperature,
                top_k,
                top_p,
                generator,
            )  # fmt: skip
            for row in prompt.tolist()
        ]
        for s in seqs:
            decoder.add(s)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                picked = decoder.step()
                if on_token is not None:
                    on_token(torch.tensor([t for _, t in picked], device=device))
        return torch.tensor([s.tokens for s in seqs], dtype=torch.long, device=device)
    finally:
        model.train(was_training)  # type: ignore[attr-defined]
