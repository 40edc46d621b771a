"""RETRO: a decoder-only transformer that reads retrieved neighbours through chunked cross-attention.

Borgeaud et al. 2021, "Improving language models by retrieving from trillions of tokens".

Notation: B batch, n tokens, m chunk size, L chunks with neighbours (= n // m), k neighbours per
chunk, r tokens per neighbour, d decoder width, e encoder width, h heads, hd head size.

Choices (documented because the paper leaves them open):
- Positions are rotary everywhere. Self-attention: absolute token positions. Encoder: position
  within the neighbour (0..r-1) for its own tokens, position within the retrieving chunk (0..m-1)
  for the chunk's activations it cross-attends to. Chunked cross-attention (CCA): the query at
  absolute position p, which reads chunk u = (p - m + 1) // m, sits at p - u*m (m-1 .. 2m-2,
  i.e. its position counted from the start of chunk u), and key j of every neighbour sits at j
  (0..r-1). A neighbour's continuation (j >= m) thus lines up with the tokens after chunk u.
- The encoder embeds neighbour tokens with the decoder's token embedding, then projects d -> e.
- Padding (`pad_id`) is never attended: in decoder self-attention a pad key is masked for every
  query but itself (so no row is empty); in the encoder and in CCA pad keys are masked, and a
  query whose keys are all padding (an absent neighbour, a chunk of padding) gets zeros.
- Decoder self-attention is causal; CCA is shifted by m-1 so that the neighbours of chunk u reach
  positions u*m + m-1 .. (u+1)*m + m-2 and nothing earlier.
- `neighbours=None` (RETRO[OFF]) skips CCA; a config with no `cca_layers` builds no encoder.
- `use_deepnet`: post-norm residuals norm(alpha * x + f(x)) with DeepNet's encoder-decoder
  alpha/beta (Wang et al. 2022), as RETRO-pytorch's `use_deepnet`. With post-norm, the CCA
  residual is applied (with f = 0 where nothing is read) whenever neighbours are given.
- One path: training (`hidden_states`, `forward`, `loss`) and decoding (`prefill_rows` of
  windows, `decode_rows` of one token per row at its own position; `retrolm.decoding` runs
  both for `generate` and the server) all run `DecoderBlock.forward` over a `Span`, which says
  where the tokens sit: positions start..start+T-1 in every row, or one token per row at its
  own position. The attention modules read and write the `KVCache` themselves
  (`SelfAttention` its keys/values, `ChunkedCrossAttention.read` the neighbours' keys/values),
  and CCA's math (the m-1 shift, rotary positions, masks, the cca_match bias) is written once,
  in `ChunkedCrossAttention.attend`: queries grouped so that each group reads one chunk (a
  chunk of a training row, or one row's chunk when decoding). The neighbours a forward reads
  are a `Reading`, encoded at the first CCA layer. Span and Reading are built per call: no
  state of one forward outlives it, and the model holds none but its weights and rotary
  tables. `RetrievalModel` holds these entry points for `RETRO` and the RETRO-fitted
  `retrolm.hf.RetroFitted` alike.
- Speed: all attention goes through `F.scaled_dot_product_attention`, except short non-causal
  attention in bf16/fp16 on CPU (see `attention`); `RetrievalModel.loss` fuses the output layer and the
  cross-entropy so that training never materialises (B, n, vocab) logits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrolm import decoding, weights
from retrolm.config import RetroConfig
from retrolm.decoding import Retrieve
from retrolm.inputs import check_neighbours, check_tokens

# --------------------------------------------------------------------------------------------
# building blocks


class Rotary(nn.Module):
    """Rotary position embedding tables (cos, sin), computed on demand and never saved."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._table: tuple[Tensor, Tensor] | None = None

    def _build(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv_freq = 1.0 / self.base**exponents  # (hd/2,)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (len, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (len, hd)
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def forward(self, start: int, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin (end - start, hd) float32 for positions start..end-1 (views, no copy)."""
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].device != device:
            table = self._build(max(end, 2 * table[0].shape[0] if table else 256), device)
            self._table = table
        return table[0][start:end], table[1][start:end]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + hd/2) of the last dim of x (..., n, hd) by angles (n, hd)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# Keys up to this many use the matmul path in bf16/fp16 on CPU (see `attention`).
SHORT_KEYS = 256


def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """`F.scaled_dot_product_attention`, with one measured exception.

    On CPU in bf16/fp16, for non-causal attention over at most SHORT_KEYS keys (the encoder,
    its cross-attention and CCA), the fused flash kernel's backward pass is 2-3x slower than
    two batched matmuls with a float32 softmax (benchmarks/model_speed.py), so that path is used
    there; it computes the same function (tests/test_model.py checks both agree).
    """
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and low_precision and not is_causal and k.shape[-2] <= SHORT_KEYS:
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (..., i, j)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:  # an additive float bias
            scores = scores + attn_mask.float()
        return scores.softmax(dim=-1).to(v.dtype) @ v  # (..., i, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None = None
) -> Tensor:
    """Attention with a key padding mask; rows whose keys are all masked output zeros, not NaN.

    Args:
        q: (N, h, i, hd); k, v: (N, h, j, hd).
        key_mask: (N, j) bool, True where a key may be attended; None attends all.
        bias: (N, h, i, j) float added to the attention scores, or None.
    Returns:
        (N, h, i, hd)
    """
    if key_mask is None or bool(key_mask.all()):
        return attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    any_key = key_mask.any(dim=-1)  # (N,)
    # an empty row would softmax to NaN: let it attend everything, then zero its output
    safe = key_mask | ~any_key[:, None]  # (N, j)
    mask = safe[:, None, None, :]
    if bias is not None:
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    out = attention(q, k, v, attn_mask=mask)
    return out * any_key[:, None, None, None].to(out.dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, mult * dim, bias=False)
        self.down = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


# --------------------------------------------------------------------------------------------
# one decoder forward: where its tokens sit (Span), what it reads (Reading), what it keeps


def read_chunk(position: int | Tensor, m: int) -> int | Tensor:
    """The chunk whose neighbours the token at `position` reads (negative: none): CCA's m-1
    shift, so that chunk u's neighbours reach positions u*m + m-1 .. (u+1)*m + m-2."""
    return (position - m + 1) // m


@dataclass
class CCAGroups:
    """How a Span's queries are grouped for CCA: every group of Q queries reads one chunk.

    The queries x[:, skip:] (those that read a chunk) are padded by `pad` = (front, back) to
    G groups of Q and attend the keys of `chunks` (uniform spans: chunk indices u0..u1 of the
    keys given; per-row spans: slice(None), each row's keys already picked).
    """

    skip: int  # leading positions that read no chunk (their output is zero)
    pad: tuple[int, int]  # query rows added before / after, to fill the groups
    groups: int  # G
    size: int  # Q, queries per group
    chunks: slice  # which chunks of the keys the G groups read
    rot: tuple[Tensor, Tensor]  # rotary (cos, sin) of the queries: (Q, hd) or (B, 1, 1, 1, hd)
    rows: Tensor  # absolute positions of the grouped queries: (G, Q), or (B, 1, 1) per row


@dataclass
class Span:
    """Where the tokens x (B, T, d) of one decoder forward sit in their sequences.

    A training batch, a cached prefill, a generation step and the server's step of one token per
    row at different positions are all a Span, so that every attention module runs one code:
    either every row holds positions start..start+T-1 (`pos` None), or each row holds one token
    at its own position pos[b] (T == 1, `pos` and `rows` (B,)). Built per call by RETRO, never
    kept: nothing of one forward leaks into another.
    """

    start: int  # first position (uniform spans)
    length: int  # T
    rotary: Rotary  # the decoder's rotary tables
    device: torch.device
    end: int  # keys 0..end-1 are attended (uniform: start + T; per row: max(pos) + 1)
    token_ids: Tensor | None = None  # (B or slots, >= end) the token ids from position 0
    rot: tuple[Tensor, Tensor] | None = None  # self-attention rotary: (T, hd) or (B, 1, 1, hd)
    mask: Tensor | None = None  # self-attention mask (B, 1, T, S) bool, or None
    causal: bool = False  # self-attention is plain causal (no mask needed)
    cache: KVCache | None = None
    pos: Tensor | None = None  # (B,) per-row positions (T == 1)
    rows: Tensor | None = None  # (B,) the slot rows of the cache (with pos)
    sel: slice | Tensor | None = None  # rows as a slice where contiguous (reads without a copy)
    chunks_read: int = 0  # uniform spans with a cache: chunks 0..chunks_read-1 are encoded
    match_ids: Tensor | None = None  # (B, end) decoder ids, pad as -2 (cca_match only)
    _groups: dict[int, CCAGroups | None] = field(default_factory=dict)

    def cca_groups(self, m: int) -> CCAGroups | None:
        """The CCA grouping of this span's queries for chunk size m (None: none reads a chunk)."""
        if m not in self._groups:
            self._groups[m] = self._row_groups(m) if self.pos is not None else self._uniform(m)
        return self._groups[m]

    def _uniform(self, m: int) -> CCAGroups | None:
        # the query at position p reads chunk u = read_chunk(p) at rotary position p - u*m
        start, end = self.start, self.start + self.length
        first = max(start, m - 1)  # first position that reads a chunk
        if first >= end:
            return None
        u0, u1 = read_chunk(first, m), read_chunk(end - 1, m)  # chunks read, inclusive
        groups, lead, dev = u1 - u0 + 1, first - (u0 * m + m - 1), self.device
        if groups == 1:  # one group (always so when decoding a token): no padding needed
            rot = self.rotary(lead + m - 1, lead + m - 1 + end - first, dev)
            rows = torch.arange(first, end, device=dev)[None]  # (1, T')
            return CCAGroups(first - start, (0, 0), 1, end - first, slice(u0, u1 + 1), rot, rows)
        trail = groups * m - lead - (end - first)
        rows = torch.arange(u0 * m + m - 1, u0 * m + m - 1 + groups * m, device=dev)
        rot = self.rotary(m - 1, 2 * m - 1, dev)
        chunks = slice(u0, u1 + 1)
        return CCAGroups(first - start, (lead, trail), groups, m, chunks, rot, rows.view(groups, m))

    def _row_groups(self, m: int) -> CCAGroups:
        assert self.pos is not None
        u_read = read_chunk(self.pos, m).clamp(min=0)  # (B,) the chunk each row reads
        cos, sin = self.rotary(0, max(self.end, 2 * m), self.pos.device)
        at = self.pos - u_read * m  # rotary position of each query in its chunk
        rot = cos[at][:, None, None, None], sin[at][:, None, None, None]  # (B, 1, 1, 1, hd)
        return CCAGroups(0, (0, 0), 1, 1, slice(None), rot, self.pos[:, None, None])

    def read_index(self, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row spans: (rows (B, 1), chunks (B, 1), reads (B, 1, 1)) of the chunk each reads."""
        assert self.pos is not None and self.rows is not None
        u_read = read_chunk(self.pos, m).clamp(min=0)  # (B,)
        return self.rows[:, None], u_read[:, None], (self.pos >= m - 1)[:, None, None]


@dataclass
class Reading:
    """The neighbours one decoder forward reads (RETRO[ON]), encoded at the first CCA layer.

    `neighbours` are those of the chunks newly complete (None: no new chunk); they go to batch
    rows `rows` and chunk indices `chunks` of the cache, their chunks' tokens at `positions`
    (slices for uniform spans, index tensors (C, 1), (C, 1), (C, m) for per-row spans).
    """

    encode: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # RETRO._encode
    first_layer: int  # the decoder block (0-based) whose activations the encoder reads
    chunk_size: int  # m
    neighbours: Tensor | None  # (B', U, k, r)
    rows: slice | Tensor = field(default_factory=lambda: slice(None))
    chunks: slice | Tensor = field(default_factory=lambda: slice(None))
    positions: slice | Tensor = field(default_factory=lambda: slice(None))
    ids: Tensor | None = None  # (B', U, k, r) neighbour ids, pad as -1 (cca_match only)
    encoded: Tensor | None = None  # (B', U, k, r, e), set at the first CCA layer
    mask: Tensor | None = None  # (B', U, k*r) True for real neighbour tokens

    def observe(self, layer: int, x: Tensor, span: Span) -> None:
        """At the first CCA layer: keep the activations x (B, T, d), encode the new neighbours."""
        if layer != self.first_layer:
            return
        acts = x if span.cache is None else span.cache.write_acts(x, span)
        if self.neighbours is None:
            return
        assert span.token_ids is not None
        self.encoded, self.mask = self.encode(
            self.neighbours,
            acts[self.rows, self.positions],  # (B', U*m, d) the new chunks' activations
            span.token_ids[self.rows, self.positions],  # (B', U*m)
        )
        if span.cache is not None:
            span.cache.write_neighbours(self)


@dataclass
class KVCache:
    """What decoding keeps between steps: nothing is ever recomputed.

    Rows are independent sequences. The attention modules write to it and read from it at the
    positions a `Span` gives: a block of positions from 0 in every row (the cache of one
    `prefill_rows` pass), or one position per row (`decode_rows` on a cache of
    `RetrievalModel.new_cache`, whose rows `copy_rows` fills from a prefill's cache). Tensors
    are allocated at their first write, for every row and position of the cache.
    """

    token_ids: Tensor  # (rows, size) every token fed so far
    retrieval: bool  # True: CCA is on (RETRO[ON])
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> (rows, h, size, hd)
    values: dict[int, Tensor] = field(default_factory=dict)
    chunk_acts: Tensor | None = None  # (rows, size, d) activations at the first CCA layer
    cca_keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> (rows, chunks, h, k*r, hd)
    cca_values: dict[int, Tensor] = field(default_factory=dict)
    cca_mask: Tensor | None = None  # (rows, chunks, k*r) True where a neighbour token is real
    cca_ids: Tensor | None = None  # (rows, chunks, k, r) neighbour token ids (for cca_match)

    @property
    def size(self) -> int:
        return self.token_ids.shape[1]

    @property
    def rows(self) -> int:
        return self.token_ids.shape[0]

    def _kv(self, layer: int, k: Tensor) -> tuple[Tensor, Tensor]:
        if layer not in self.keys:
            shape = (self.rows, k.shape[1], self.size, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_zeros(shape), k.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def write_kv(self, layer: int, k: Tensor, v: Tensor, span: Span) -> tuple[Tensor, Tensor]:
        """Store self-attention keys/values (B, h, T, hd) at the span's positions.

        Returns:
            the keys and values (B, h, span.end, hd) of every position filled so far.
        """
        keys, values = self._kv(layer, k)
        if span.pos is None:
            T = k.shape[2]
            keys[:, :, span.start : span.start + T] = k
            values[:, :, span.start : span.start + T] = v
            return keys[:, :, : span.end], values[:, :, : span.end]
        keys[span.rows, :, span.pos] = k[:, :, 0]
        values[span.rows, :, span.pos] = v[:, :, 0]
        return keys[span.sel, :, : span.end], values[span.sel, :, : span.end]

    def write_acts(self, x: Tensor, span: Span) -> Tensor:
        """Store the first CCA layer's activations x (B, T, d); returns all of them (rows, size,
        d)."""
        if self.chunk_acts is None:
            self.chunk_acts = x.new_zeros(self.rows, self.size, x.shape[2])
        if span.pos is None:
            self.chunk_acts[:, span.start : span.start + span.length] = x
        else:
            self.chunk_acts[span.rows, span.pos] = x[:, 0]
        return self.chunk_acts

    def _neighbour_store(self, mask: Tensor, ids: Tensor | None, chunks: int) -> None:
        if self.cca_mask is None:
            self.cca_mask = mask.new_zeros(self.rows, chunks, mask.shape[-1])
        if ids is not None and self.cca_ids is None:
            self.cca_ids = ids.new_full((self.rows, chunks, *ids.shape[-2:]), -1)

    def write_neighbours(self, reading: Reading) -> None:
        """Store the key mask and ids of newly encoded neighbours (B', U, ...) at their chunks."""
        assert reading.mask is not None
        self._neighbour_store(reading.mask, reading.ids, self.size // reading.chunk_size)
        assert self.cca_mask is not None
        self.cca_mask[reading.rows, reading.chunks] = reading.mask
        if reading.ids is not None and self.cca_ids is not None:
            self.cca_ids[reading.rows, reading.chunks] = reading.ids

    def _cca(self, layer: int, keys: Tensor, values: Tensor | None, chunks: int) -> None:
        if layer not in self.cca_keys:
            shape = (self.rows, chunks, *keys.shape[2:])
            self.cca_keys[layer] = keys.new_zeros(shape)
            if values is not None:
                self.cca_values[layer] = values.new_zeros(shape)

    def write_cca(self, layer: int, keys: Tensor, values: Tensor | None, reading: Reading) -> None:
        """Store CCA keys/values (B', U, h, k*r, hd) of newly encoded chunks (values None: the
        copy head's, which has keys only)."""
        self._cca(layer, keys, values, self.size // reading.chunk_size)
        self.cca_keys[layer][reading.rows, reading.chunks] = keys
        if values is not None:
            self.cca_values[layer][reading.rows, reading.chunks] = values

    def copy_rows(
        self, src: KVCache, rows: Tensor, lengths: Tensor, chunks: Tensor, m: int
    ) -> None:
        """Store row i of `src` (fed from position 0) in row rows[i] of this cache: its
        positions 0..lengths[i]-1 and its chunks (of m tokens) 0..chunks[i]-1, nothing past
        them."""
        dev = rows.device
        b, p = (torch.arange(src.size, device=dev) < lengths[:, None]).nonzero(as_tuple=True)
        at = rows[b]  # (P,) the row of each kept position
        self.token_ids[at, p] = src.token_ids[b, p]
        for layer, keys in src.keys.items():
            mine, my_values = self._kv(layer, keys)
            mine[at, :, p] = keys[b, :, p]  # (P, h, hd)
            my_values[at, :, p] = src.values[layer][b, :, p]
        if src.chunk_acts is not None:
            if self.chunk_acts is None:
                d = src.chunk_acts.shape[2]
                self.chunk_acts = src.chunk_acts.new_zeros(self.rows, self.size, d)
            self.chunk_acts[at, p] = src.chunk_acts[b, p]
        if src.cca_mask is None:
            return
        n = src.cca_mask.shape[1]
        here = self.size // m  # this cache's chunks
        self._neighbour_store(src.cca_mask, src.cca_ids, here)
        b, u = (torch.arange(n, device=dev) < chunks[:, None]).nonzero(as_tuple=True)
        at = rows[b]  # (C,) the row of each kept chunk
        assert self.cca_mask is not None
        self.cca_mask[at, u] = src.cca_mask[b, u]
        for layer, keys in src.cca_keys.items():
            self._cca(layer, keys, src.cca_values.get(layer), here)
            self.cca_keys[layer][at, u] = keys[b, u]  # (C, h, k*r, hd)
            if layer in src.cca_values:
                self.cca_values[layer][at, u] = src.cca_values[layer][b, u]
        if src.cca_ids is not None and self.cca_ids is not None:
            self.cca_ids[at, u] = src.cca_ids[b, u]

    def read_cca(self, layer: int, span: Span, m: int) -> tuple[Tensor, ...] | None:
        """(keys, values (None for the copy head), key mask, ids or None) of the chunks the
        span's queries read.

        Uniform spans: chunks 0..chunks_read-1 (B, U, ...); per-row spans: each row's chunk
        (B, 1, ...), its key mask all False where the row's position reads none.
        """
        if layer not in self.cca_keys or self.cca_mask is None:
            return None
        if span.pos is None:
            if span.chunks_read == 0:
                return None
            read = (slice(None), slice(0, span.chunks_read))
            reads = None
        else:
            rows, chunks, reads = span.read_index(m)
            read = (rows, chunks)
        mask = self.cca_mask[read]
        if reads is not None:
            mask = mask & reads  # a row that reads no chunk attends nothing: zeros
        ids = None if self.cca_ids is None else self.cca_ids[read]
        values = self.cca_values[layer][read] if layer in self.cca_values else None
        return self.cca_keys[layer][read], values, mask, ids


class SelfAttention(nn.Module):
    """Multi-head rotary self-attention (causal in the decoder, bidirectional in the encoder)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rot: tuple[Tensor, Tensor],
        mask: Tensor | None = None,
        causal: bool = False,
        span: Span | None = None,
        layer: int = 0,
    ) -> Tensor:
        """Self-attention of x (B, T, dim).

        Args:
            rot: rotary (cos, sin) of the T positions: (T, hd), or (B, 1, 1, hd) per row.
            mask: (B, 1, T, S) bool, True where a query may attend a key; None attends all.
            causal: plain causal attention (with mask None).
            span, layer: with a `span.cache`, keys/values are written at the span's positions
                and all S = span.end filled positions are attended (the mask says which).
        """
        B, T, dim = x.shape
        hd = dim // self.heads
        qkv = self.qkv(x).view(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # (3,B,h,T,hd)
        qk = apply_rotary(qkv[:2], *rot)  # (2, B, h, T, hd)
        q, k, v = qk[0], qk[1], qkv[2]
        if span is not None and span.cache is not None:
            k, v = span.cache.write_kv(layer, k, v, span)  # (B, h, S, hd)
        out = attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(out.transpose(1, 2).reshape(B, T, dim))  # (B, T, dim)


class ChunkedCrossAttention(nn.Module):
    """Decoder positions read the encoded neighbours of the chunk that ended m-1 tokens before.

    With `match` > 0 lags (RetroConfig.cca_match, a retrolm extension), head h adds
    sum_l match_weight[l, h] * [token at i-l == neighbour token at j-1-l] to the score of query
    position i for neighbour token j: a neighbour token that follows a copy of the query's last
    tokens is attended from the first step, so CCA can learn to copy it (its value carries the
    token) without first discovering the matching itself, which takes the paper's CCA ~1,000
    steps at small scale (docs/results.md, the section on learning to read neighbours).

    `attend` is the one CCA computation; `read` (RETRO's decoder) and `forward` (keys and
    values given) are its two entry points.
    """

    MATCH_INIT = 3.0  # initial weight per lag: a match over all L lags scores +3L (e^6 ~ 400)

    def __init__(self, dim: int, enc_dim: int, heads: int, chunk_size: int, match: int = 0):
        super().__init__()
        self.heads, self.chunk_size = heads, chunk_size
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(enc_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.match_weight = (
            # flat (lag-major, then head) so that, as a 1-d parameter, it gets no weight decay
            nn.Parameter(torch.full((match * heads,), self.MATCH_INIT)) if match > 0 else None
        )

    def match_bias(self, ids: Tensor, nb_ids: Tensor, rows: Tensor) -> Tensor:
        """Score bonus (B, G, h, R, k*r) for query rows at absolute positions `rows`.

        Args:
            ids: (B, S) the decoder's token ids at positions 0..S-1, pad_id as -2 (rows past
                S-1 are padding, whose output is dropped).
            nb_ids: (B, G, k, r) the neighbour ids read by each group of rows, pad_id as -1.
            rows: (G, R) positions shared by the batch, or (B, G, R) per batch row.
        """
        assert self.match_weight is not None
        B, S = ids.shape
        lags = self.match_weight.numel() // self.heads
        rows = rows.expand(B, *rows.shape[-2:])  # (B, G, R)
        matches = []
        for lag in range(lags):
            pos = rows - lag  # (B, G, R)
            q_ids = ids.gather(1, pos.clamp(0, S - 1).flatten(1)).view(pos.shape)  # (B, G, R)
            q_ids = q_ids.masked_fill((pos < 0) | (pos >= S), -2)
            prev = F.pad(nb_ids, (lag + 1, 0), value=-1)[..., : nb_ids.shape[-1]]  # j-1-lag
            matches.append(q_ids[..., None] == prev.flatten(2)[:, :, None, :])  # (B, G, R, k*r)
        weight = self.match_weight.view(lags, self.heads)
        # one small matmul over the lags instead of a broadcast multiply-add per lag
        bias = torch.stack(matches, dim=-1).to(weight.dtype) @ weight  # (B, G, R, k*r, h)
        return bias.permute(0, 1, 4, 2, 3)  # (B, G, h, R, k*r)

    def keys_values(self, encoded: Tensor, rotary: Rotary) -> tuple[Tensor, Tensor]:
        """encoded (B, U, k, r, e) -> keys, values (B, U, h, k*r, hd), keys rotated by j < r."""
        B, U, K, R, _ = encoded.shape
        dim = self.q.in_features
        hd = dim // self.heads
        kv = self.kv(encoded).view(B, U, K, R, 2, self.heads, hd)
        kv = kv.permute(4, 0, 1, 5, 2, 3, 6)  # (2, B, U, h, k, r, hd)
        keys = apply_rotary(kv[0], *rotary(0, R, encoded.device)).reshape(
            B, U, self.heads, K * R, hd
        )
        values = kv[1].reshape(B, U, self.heads, K * R, hd)
        return keys, values

    def attend(
        self,
        x: Tensor,
        span: Span,
        keys: Tensor | None,
        values: Tensor | None,
        key_mask: Tensor | None,
        nb_ids: Tensor | None = None,
    ) -> Tensor:
        """CCA output (B, T, d) for x (B, T, d) at the span's positions; the one CCA code.

        Args:
            keys, values: (B, U, h, k*r, hd) of the chunks read (see `CCAGroups.chunks`); None
                when no position here reads a chunk.
            key_mask: (B, U, k*r) True where a neighbour token may be attended.
            nb_ids: with cca_match only: the neighbour ids (B, U, k, r), pad_id as -1 (the
                decoder's ids are `span.match_ids`).
        Returns:
            zeros at positions that read no chunk (< m-1).
        """
        B, T, dim = x.shape
        h, hd = self.heads, dim // self.heads
        plan = span.cca_groups(self.chunk_size)
        if plan is None:
            return torch.zeros_like(x)
        assert keys is not None and values is not None and key_mask is not None
        G, Q, chunks = plan.groups, plan.size, plan.chunks
        q = self.q(x[:, plan.skip :])  # (B, T', d)
        if plan.pad != (0, 0):
            q = F.pad(q, (0, 0, *plan.pad))  # (B, G*Q, d)
        q = q.view(B, G, Q, h, hd).permute(0, 1, 3, 2, 4)  # (B, G, h, Q, hd)
        q = apply_rotary(q, *plan.rot)
        bias = None
        if self.match_weight is not None:
            if span.match_ids is None or nb_ids is None:
                raise ValueError("this model has cca_match > 0: CCA needs the token ids")
            bias = self.match_bias(span.match_ids, nb_ids[:, chunks], plan.rows)  # (B,G,h,Q,kr)
            bias = bias.flatten(0, 1)
        out = masked_attention(
            q.flatten(0, 1),
            keys[:, chunks].flatten(0, 1),
            values[:, chunks].flatten(0, 1),
            key_mask[:, chunks].flatten(0, 1),
            bias,
        )  # (B*G, h, Q, hd)
        out = out.view(B, G, h, Q, hd).permute(0, 1, 3, 2, 4).reshape(B, G * Q, dim)
        if plan.pad != (0, 0):
            out = out[:, plan.pad[0] : plan.pad[0] + T - plan.skip]  # (B, T', d)
        out = self.out(out)
        return F.pad(out, (0, 0, plan.skip, 0)) if plan.skip else out  # (B, T, d)

    def read(self, x: Tensor, span: Span, layer: int, reading: Reading) -> Tensor:
        """CCA in RETRO's decoder: the new chunks' keys/values are computed (and cached), then
        the chunks the span's queries read are attended.

        Args:
            x: (B, T, d) at the span's positions.
            layer: this block's index (the cache's key).
            reading: the neighbours of this forward, encoded at the first CCA layer.
        """
        keys = values = None
        if reading.encoded is not None:
            keys, values = self.keys_values(reading.encoded, span.rotary)  # (B', U, h, kr, hd)
        if span.cache is None:
            return self.attend(x, span, keys, values, reading.mask, reading.ids)
        if keys is not None and values is not None:
            span.cache.write_cca(layer, keys, values, reading)
        cached = span.cache.read_cca(layer, span, self.chunk_size)
        if cached is None:  # no chunk encoded yet: nothing to read
            return torch.zeros_like(x)
        return self.attend(x, span, *cached)

    def forward(
        self,
        x: Tensor,
        start: int,
        keys: Tensor | None,
        values: Tensor | None,
        key_mask: Tensor | None,
        rotary: Rotary,
        ids: Tensor | None = None,
        nb_ids: Tensor | None = None,
    ) -> Tensor:
        """CCA output for x (B, T, d) at absolute positions start..start+T-1 (via `attend`).

        Args:
            keys, values: (B, U, h, k*r, hd) for chunks 0..U-1 (every chunk read here); None
                when no position here reads a chunk.
            key_mask: (B, U, k*r) True where a neighbour token may be attended.
            ids, nb_ids: with cca_match only: the decoder token ids (B, >= start+T) from
                position 0 on, pad_id as -2; the neighbour ids (B, U, k, r), pad_id as -1.
        Returns:
            (B, T, d); zeros at positions < m-1, which read no chunk.
        """
        T = x.shape[1]
        span = Span(start, T, rotary, x.device, start + T, match_ids=ids)
        return self.attend(x, span, keys, values, key_mask, nb_ids)


class CopyHead(ChunkedCrossAttention):
    """A pointer over the neighbour tokens a position reads (RetroConfig.copy_head, a retrolm
    extension; Merity et al. 2016's pointer-sentinel mixture, over RETRO's neighbours).

    One head attends, from the final hidden state, over the k*r tokens of the chunk CCA reads
    plus a learned sentinel, with `cca_match`'s match bonus: neighbour token j scores high when
    the tokens before it equal the query's last tokens, so it is the token a copy would write
    next. The next-token distribution is p_sentinel * softmax(LM logits) + the attention on each
    neighbour token, added to that token's id (`mix`). Positions that read no chunk, and rows
    with no real neighbour token, put all the weight on the sentinel: the plain LM.

    The LM's softmax cannot copy a token it does not already predict (it maps a copied
    token's encoding through a d-dimensional bottleneck to 8k logits); the pointer puts
    probability on the token id itself, as kNN-LM does (docs/results.md, the section on the
    copy head).
    """

    SENTINEL_MARGIN = 3.0  # initial sentinel score over log(k*r): p(copy) ~ 0.05 with no match

    def __init__(
        self, dim: int, enc_dim: int, chunk_size: int, match: int, keys: int, gated: bool = False
    ) -> None:
        super().__init__(dim, enc_dim, 1, chunk_size, match)
        del self.out  # the output is a distribution over token ids, not a residual update
        self.kv = nn.Linear(enc_dim, dim, bias=False)  # keys only; no rotary: the match
        # bonus aligns a query with the token after its copy, wherever it sits
        self.sentinel = nn.Parameter(torch.zeros(dim))  # the sentinel's key
        self.sentinel_bias = nn.Parameter(torch.tensor(0.0))
        self.init_bias = math.log(keys) + self.SENTINEL_MARGIN
        # gated: the pointer's share is scaled by a gate that starts at exactly 0, so that a
        # model built on a pretrained base is that base until it learns to copy (see `share`)
        self.gate = nn.Parameter(torch.tensor(0.0)) if gated else None

    def closed(self) -> bool:
        """True when a gated head puts no weight on any neighbour token (its gate is <= 0)."""
        return self.gate is not None and bool(self.gate.detach() <= 0)

    def share(self) -> Tensor | None:
        """The gate in [0, 1] (None: ungated). Its forward value is the clamped parameter; its
        gradient passes the clamp (straight through), so a gate at 0 still learns whether
        copying would lower the loss, and opens when it would."""
        if self.gate is None:
            return None
        return self.gate + (self.gate.clamp(0.0, 1.0) - self.gate).detach()

    def attend(  # type: ignore[override]
        self,
        x: Tensor,
        span: Span,
        keys: Tensor | None,
        values: Tensor | None,
        key_mask: Tensor | None,
        nb_ids: Tensor | None = None,
    ) -> Tensor | None:
        """(B, T, 1 + k*r): the sentinel's weight, then each neighbour token's, for x (B, T, d);
        None when no position here reads a chunk. The ids the weights go to are `copy_ids`."""
        B, T, dim = x.shape
        plan = span.cca_groups(self.chunk_size)
        if plan is None or keys is None:
            return None
        assert key_mask is not None and nb_ids is not None and span.match_ids is not None
        G, Q, chunks = plan.groups, plan.size, plan.chunks
        q = self.q(x[:, plan.skip :])  # (B, T', d)
        if plan.pad != (0, 0):
            q = F.pad(q, (0, 0, *plan.pad))  # (B, G*Q, d)
        q = q.view(B, G, Q, dim)
        k = keys[:, chunks, 0]  # (B, G, k*r, d)
        acc = torch.promote_types(q.dtype, torch.float32)  # float32 under bf16 autocast
        scores = (q @ k.transpose(-1, -2)).to(acc) / math.sqrt(dim)  # (B, G, Q, k*r)
        scores = scores + self.match_bias(span.match_ids, nb_ids[:, chunks], plan.rows)[:, :, 0]
        scores = scores.masked_fill(~key_mask[:, chunks, None, :], float("-inf"))
        sentinel = (q @ self.sentinel).to(acc) / math.sqrt(dim) + self.sentinel_bias  # (B,G,Q)
        weights = torch.cat([sentinel[..., None], scores], dim=-1).softmax(dim=-1)
        gate = self.share()
        if gate is not None:  # 1 - g * (1 - w_sentinel), then g * w_j: still sums to 1
            gate = gate.to(weights.dtype)
            weights = torch.cat([1 - gate * (1 - weights[..., :1]), gate * weights[..., 1:]], -1)
        weights = weights.reshape(B, G * Q, -1)  # (B, G*Q, 1 + k*r)
        if plan.pad != (0, 0):
            weights = weights[:, plan.pad[0] : plan.pad[0] + T - plan.skip]  # (B, T', 1+k*r)
        if plan.skip:  # positions that read no chunk: all on the sentinel
            weights = F.pad(weights, (0, 0, plan.skip, 0))
            weights[:, : plan.skip, 0] = 1.0
        return weights

    def keys(self, encoded: Tensor) -> Tensor:
        """encoded (B, U, k, r, e) -> keys (B, U, 1, k*r, d) (the copy head has no values)."""
        B, U, K, R, _ = encoded.shape
        return self.kv(encoded).reshape(B, U, 1, K * R, -1)

    def copy_ids(self, span: Span, nb_ids: Tensor, T: int) -> Tensor:
        """(B, T, k*r) the neighbour token ids each of the span's T positions may copy (pad: 0)."""
        plan = span.cca_groups(self.chunk_size)
        assert plan is not None
        ids = nb_ids[:, plan.chunks].flatten(2).clamp(min=0)  # (B, G, k*r)
        B, G, KR = ids.shape
        ids = ids[:, :, None].expand(B, G, plan.size, KR).reshape(B, G * plan.size, KR)
        if plan.pad != (0, 0):
            ids = ids[:, plan.pad[0] : plan.pad[0] + T - plan.skip]
        return F.pad(ids, (0, 0, plan.skip, 0)) if plan.skip else ids  # (B, T, k*r)

    def read_copy(
        self, x: Tensor, span: Span, layer: int, reading: Reading
    ) -> tuple[Tensor, Tensor] | None:
        """(weights (B, T, 1 + k*r), ids (B, T, k*r)) for the final hidden states x (B, T, d),
        the keys of new chunks computed and cached as CCA's are; None: no position copies."""
        keys = None if reading.encoded is None else self.keys(reading.encoded)
        if span.cache is None:
            mask, ids = reading.mask, reading.ids
        else:
            if keys is not None:
                span.cache.write_cca(layer, keys, None, reading)
            cached = span.cache.read_cca(layer, span, self.chunk_size)
            if cached is None:
                return None
            keys, _, mask, ids = cached
        if keys is None or ids is None:
            return None
        weights = self.attend(x, span, keys, None, mask, ids)
        return None if weights is None else (weights, self.copy_ids(span, ids, x.shape[1]))

    @staticmethod
    def mix(logits: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """log(p_sentinel * softmax(logits) + copied weights at their ids): (..., V) log-probs,
        in float32; they stand in for logits anywhere (softmax and log_softmax leave them)."""
        acc = torch.promote_types(logits.dtype, weights.dtype)
        probs = torch.softmax(logits.to(acc), dim=-1) * weights[..., :1]
        probs = probs.scatter_add(-1, ids, weights[..., 1:])
        return probs.clamp_min(1e-30).log()


class Residual(nn.Module):
    """Pre-norm residual x + f(norm(x)), or DeepNet post-norm norm(alpha * x + f(x))."""

    def __init__(self, dim: int, eps: float, post_norm: bool, alpha: float, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.post_norm, self.alpha = post_norm, alpha
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.post_norm:
            return self.norm(x * self.alpha + self.drop(fn(x)))
        return x + self.drop(fn(self.norm(x)))


# --------------------------------------------------------------------------------------------
# encoder and decoder blocks


class EncoderBlock(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk, feed-forward."""

    def __init__(self, cfg: RetroConfig, alpha: float) -> None:
        super().__init__()
        e, post = cfg.enc_dim, cfg.use_deepnet
        self.heads = cfg.enc_heads
        self.self_res = Residual(e, cfg.norm_eps, post, alpha, cfg.dropout)
        self.self_attn = SelfAttention(e, cfg.enc_heads)
        self.cross_res = Residual(e, cfg.norm_eps, post, alpha, cfg.dropout)
        self.cross_q = nn.Linear(e, e, bias=False)
        self.cross_kv = nn.Linear(cfg.dec_dim, 2 * e, bias=False)
        self.cross_out = nn.Linear(e, e, bias=False)
        self.ff_res = Residual(e, cfg.norm_eps, post, alpha, cfg.dropout)
        self.ff = FeedForward(e, cfg.ff_mult)

    def cross_attention(
        self, x: Tensor, chunk: Tensor, chunk_mask: Tensor, rotary: Rotary, k: int
    ) -> Tensor:
        """x (C*k, r, e) neighbours of C chunks; chunk (C, m, d) their chunks' activations."""
        N, R, e = x.shape
        C, M, _ = chunk.shape
        h, hd = self.heads, e // self.heads
        q = self.cross_q(x).view(C, k, R, h, hd).permute(0, 3, 1, 2, 4)  # (C, h, k, r, hd)
        q = apply_rotary(q, *rotary(0, R, x.device)).reshape(C, h, k * R, hd)
        kv = self.cross_kv(chunk).view(C, M, 2, h, hd).permute(2, 0, 3, 1, 4)  # (2, C, h, m, hd)
        keys = apply_rotary(kv[0], *rotary(0, M, x.device))
        out = masked_attention(q, keys, kv[1], chunk_mask)  # (C, h, k*r, hd)
        out = out.view(C, h, k, R, hd).permute(0, 2, 3, 1, 4).reshape(N, R, e)
        return self.cross_out(out)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        chunk: Tensor,
        chunk_mask: Tensor,
        rotary: Rotary,
        k: int,
    ) -> Tensor:
        x = self.self_res(
            x, lambda y: self.self_attn(y, rotary(0, y.shape[1], y.device), mask=self_mask)
        )
        x = self.cross_res(x, lambda y: self.cross_attention(y, chunk, chunk_mask, rotary, k))
        return self.ff_res(x, self.ff)


class Encoder(nn.Module):
    """Encodes each neighbour (r tokens), conditioned on the decoder activations of its chunk."""

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        alpha = 0.81 * (cfg.enc_depth**4 * cfg.dec_depth) ** (1 / 16) if cfg.use_deepnet else 1.0
        self.proj_in = nn.Linear(cfg.dec_dim, cfg.enc_dim, bias=False)
        self.chunk_norm = nn.LayerNorm(cfg.dec_dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg, alpha) for _ in range(cfg.enc_depth))
        self.norm = nn.Identity() if cfg.use_deepnet else nn.LayerNorm(cfg.enc_dim, cfg.norm_eps)
        self.rotary = Rotary(cfg.enc_dim // cfg.enc_heads, cfg.rotary_base)

    def forward(
        self, neighbour_emb: Tensor, neighbour_mask: Tensor, chunk: Tensor, chunk_mask: Tensor
    ) -> Tensor:
        """Encode the neighbours of C chunks.

        Args:
            neighbour_emb: (C, k, r, d) token embeddings of the neighbours.
            neighbour_mask: (C, k, r) True for real (non-pad) neighbour tokens.
            chunk: (C, m, d) decoder activations of each retrieving chunk.
            chunk_mask: (C, m) True for real tokens of the chunk.
        Returns:
            (C, k, r, e)
        """
        C, K, R, _ = neighbour_emb.shape
        x = self.proj_in(neighbour_emb).view(C * K, R, -1)  # (C*k, r, e)
        tokens_mask = neighbour_mask.reshape(C * K, R)  # (C*k, r)
        self_mask = None
        if not bool(tokens_mask.all()):
            # pad keys masked; an all-pad neighbour attends everything (its output is never read)
            safe = tokens_mask | ~tokens_mask.any(dim=-1, keepdim=True)
            self_mask = safe[:, None, None, :]  # (C*k, 1, 1, r)
        chunk = self.chunk_norm(chunk)
        for block in self.blocks:
            x = block(x, self_mask, chunk, chunk_mask, self.rotary, K)
        return self.norm(x).view(C, K, R, -1)


class DecoderBlock(nn.Module):
    """Causal self-attention, chunked cross-attention (in CCA layers), feed-forward."""

    def __init__(self, cfg: RetroConfig, has_cca: bool, alpha: float) -> None:
        super().__init__()
        d, post = cfg.dec_dim, cfg.use_deepnet
        self.attn_res = Residual(d, cfg.norm_eps, post, alpha, cfg.dropout)
        self.attn = SelfAttention(d, cfg.dec_heads)
        self.cca_res = Residual(d, cfg.norm_eps, post, alpha, cfg.dropout) if has_cca else None
        self.cca = (
            ChunkedCrossAttention(d, cfg.enc_dim, cfg.dec_heads, cfg.chunk_size, cfg.cca_match)
            if has_cca
            else None
        )
        self.ff_res = Residual(d, cfg.norm_eps, post, alpha, cfg.dropout)
        self.ff = FeedForward(d, cfg.ff_mult)

    def forward(self, x: Tensor, span: Span, layer: int, reading: Reading | None) -> Tensor:
        """The one block forward: training, cached decoding and per-row decoding alike.

        Args:
            x: (B, T, d) at the span's positions.
            span: where the tokens sit (and the cache the attention modules write to).
            layer: this block's index (the caches' key).
            reading: the neighbours read (None: RETRO[OFF], CCA skipped).
        Returns:
            (B, T, d)
        """
        x = self.attn_res(
            x,
            partial(self.attn, rot=span.rot, mask=span.mask, causal=span.causal, span=span,
                    layer=layer),
        )  # fmt: skip
        if self.cca is not None and self.cca_res is not None and reading is not None:
            reading.observe(layer, x, span)  # the first CCA layer: encode the new neighbours
            x = self.cca_res(x, partial(self.cca.read, span=span, layer=layer, reading=reading))
        return self.ff_res(x, self.ff)


# --------------------------------------------------------------------------------------------
# the model


class RetrievalModel(nn.Module):
    """What RETRO and a RETRO-fitted Hugging Face model (`retrolm.hf.RetroFitted`) share: every
    entry point (`forward`, `loss`, `hidden_states`, and the decoding calls of
    `retrolm.decoding.Decodable`: `new_cache`, `prefill_rows`, `decode_rows`, `generate`) builds
    a `Span` and a `Reading` and runs the subclass's `_pass`; the retrieval modules (`Encoder`,
    `ChunkedCrossAttention`, `CopyHead`) and the `KVCache` are the same classes for both.

    A subclass sets `cfg`, `rotary`, `encoder`, `copy`, `copy_layer` (the copy head's key in the
    cache), `first_cca` (the layer index its CCA code passes to `Reading.observe` first) and
    `lm_head`, and implements `_pass(tokens, span, reading)` -> final normalised hidden states
    and `_embed_neighbours(neighbours)` -> the encoder's input embeddings.
    """

    cfg: Any
    rotary: Rotary
    encoder: Encoder | None
    copy: CopyHead | None
    copy_layer: int
    first_cca: int
    lm_head: nn.Module

    def _pass(self, tokens: Tensor, span: Span, reading: Reading | None) -> Tensor:
        """The decoder over tokens (B, T) at the span's positions: final hidden states (B, T, d),
        normalised (RETRO[OFF]: reading None)."""
        raise NotImplementedError

    def _embed_neighbours(self, neighbours: Tensor) -> Tensor:
        """Neighbour token ids (B, U, k, r) -> the encoder's input embeddings (B, U, k, r, d)."""
        raise NotImplementedError

    # ---- Span and Reading

    def _self_attn_mask(
        self, key_pad: Tensor, start: int, T: int, pos: Tensor | None = None
    ) -> tuple[Tensor | None, bool]:
        """(mask (B, 1, T, S) or None, is_causal) for T queries over S keys.

        Queries sit at start..start+T-1 in every row, or (`pos` (B,), T == 1) at pos[b] in row
        b. A query attends keys at its position or before, and no pad key but its own.
        """
        S = key_pad.shape[1]
        if pos is None:
            if not bool(key_pad.any()):
                if T == 1:
                    return None, False  # the newest token sees every key
                if start == 0:
                    return None, True
            q_pos = torch.arange(start, start + T, device=key_pad.device)[None, :, None]  # (1,T,1)
        else:
            q_pos = pos[:, None, None]  # (B, 1, 1)
        k_pos = torch.arange(S, device=key_pad.device)  # (S,)
        allowed = (k_pos <= q_pos) & (~key_pad[:, None, :] | (k_pos == q_pos))  # (B, T, S)
        return allowed[:, None], False

    def _span(
        self, token_ids: Tensor, start: int, T: int, cache: KVCache | None = None, chunks: int = 0
    ) -> Span:
        """The Span of T tokens per row at start..start+T-1 (`token_ids` (B, >= start+T)).

        `chunks`: with a cache, the chunks whose neighbours are encoded once this forward has
        encoded its own.
        """
        end = start + T
        ids = token_ids[:, :end]  # (B, end)
        mask, causal = self._self_attn_mask(ids == self.cfg.pad_id, start, T)
        span = Span(
            start, T, self.rotary, token_ids.device, end, token_ids,
            self.rotary(start, end, token_ids.device), mask, causal, cache, chunks_read=chunks,
        )  # fmt: skip
        if self.cfg.cca_match:
            span.match_ids = ids.masked_fill(ids == self.cfg.pad_id, -2)
        return span

    def _row_span(self, cache: KVCache, rows: Tensor, tokens: Tensor, pos: Tensor) -> Span:
        """The Span of `decode_rows`: one token per row, row rows[i] at position pos[i]."""
        m, R = self.cfg.chunk_size, rows.shape[0]
        first, last = int(rows[0]), int(rows[-1])
        contiguous = last - first + 1 == R and bool((rows.diff() == 1).all()) if R > 1 else True
        sel = slice(first, last + 1) if contiguous else rows  # slices read without a copy
        cache.token_ids[rows, pos] = tokens
        S = int(pos.max()) + 1
        ids = cache.token_ids[sel, :S]  # (R, S)
        key_pad = ids == self.cfg.pad_id
        if not bool(key_pad.any()) and bool((pos == S - 1).all()):
            mask = None  # every row at the last position, no pad key: every key is attended
        else:
            mask, _ = self._self_attn_mask(key_pad, 0, 1, pos)  # (R, 1, 1, S)
        cos, sin = self.rotary(0, max(S, 2 * m), tokens.device)
        rot = (cos[pos][:, None, None], sin[pos][:, None, None])  # (R, 1, 1, hd)
        span = Span(
            0, 1, self.rotary, tokens.device, S, cache.token_ids, rot, mask, False, cache,
            pos=pos, rows=rows, sel=sel,
        )  # fmt: skip
        if self.cfg.cca_match:
            span.match_ids = ids.masked_fill(ids == self.cfg.pad_id, -2)
        return span

    def _reading(self, neighbours: Tensor | None, chunks: slice) -> Reading:
        """A Reading of `neighbours` (B, U, k, r) for the chunks `chunks` of every row."""
        m = self.cfg.chunk_size
        if neighbours is not None and neighbours.shape[1] == 0:
            neighbours = None
        ids = None
        if self.cfg.cca_match and neighbours is not None:
            ids = neighbours.masked_fill(neighbours == self.cfg.pad_id, -1)
        return Reading(
            self._encode, self.first_cca, m, neighbours, slice(None), chunks,
            slice(chunks.start * m, chunks.stop * m), ids,
        )  # fmt: skip

    def _row_reading(
        self, cache: KVCache, rows: Tensor, pos: Tensor, neighbours: Tensor | None
    ) -> Reading | None:
        """The Reading of `decode_rows`: the neighbours (C, k, r) of rows completing a chunk."""
        if not cache.retrieval:
            return None
        m = self.cfg.chunk_size
        done = ((pos + 1) % m == 0).nonzero()[:, 0]  # rows whose token ends a chunk
        if done.numel() and (neighbours is None or len(neighbours) != len(done)):
            raise ValueError(
                f"decode_rows: {len(done)} rows complete a chunk; give their neighbours"
            )
        if not done.numel():
            return Reading(self._encode, self.first_cca, m, None)
        assert neighbours is not None
        u_new = pos[done] // m  # (C,) the chunk each completes
        span = u_new[:, None] * m + torch.arange(m, device=pos.device)  # (C, m)
        ids = None
        if self.cfg.cca_match:
            ids = neighbours.masked_fill(neighbours == self.cfg.pad_id, -1)[:, None]
        return Reading(
            self._encode, self.first_cca, m, neighbours[:, None], rows[done][:, None],
            u_new[:, None], span, ids,
        )  # fmt: skip

    def _encode(
        self, neighbours: Tensor, chunk_acts: Tensor, chunk_tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Encode the neighbours of U chunks.

        Args:
            neighbours: (B, U, k, r) token ids.
            chunk_acts: (B, U*m, d) decoder activations of those chunks at the first CCA layer.
            chunk_tokens: (B, U*m) the chunks' token ids.
        Returns:
            encoded (B, U, k, r, e), mask (B, U, k*r) True for real neighbour tokens.
        """
        assert self.encoder is not None
        B, U, K, R = neighbours.shape
        m, pad = self.cfg.chunk_size, self.cfg.pad_id
        neighbour_mask = neighbours != pad  # (B, U, k, r)
        encoded = self.encoder(
            self._embed_neighbours(neighbours).flatten(0, 1),  # (B*U, k, r, d)
            neighbour_mask.flatten(0, 1),  # (B*U, k, r)
            chunk_acts.reshape(B * U, m, -1),  # (B*U, m, d)
            (chunk_tokens != pad).reshape(B * U, m),  # (B*U, m)
        )
        return encoded.view(B, U, K, R, -1), neighbour_mask.view(B, U, K * R)

    # ---- full passes

    def forward(self, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """Logits for every position (with a copy head reading neighbours: the log-probabilities
        of its mixture, `CopyHead.mix`).

        Args:
            tokens: (B, n) int64, 1 <= n <= max_seq_len.
            neighbours: (B, n // m or ceil(n / m), k, r) int64: neighbours[:, u] were retrieved
                with chunk u (tokens u*m .. u*m+m-1); pad_id tokens are padding, an all-pad
                neighbour is absent. None runs RETRO[OFF].
        Returns:
            (B, n, vocab_size) logits.
        Raises:
            ValueError: wrong shapes, dtypes or token ids.
        """
        return self._head(*self._full(tokens, neighbours))  # (B, n, vocab)

    def hidden_states(self, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """The final (normalised) hidden states (B, n, d); see `forward`. (With a copy head,
        `lm_head` of them is the LM part of the distribution, not all of it.)"""
        return self._full(tokens, neighbours)[0]

    def loss(self, tokens: Tensor, targets: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of `targets` (B, n) given `tokens`; targets equal to pad_id ignored
        (0 when every target is padding).

        Equal to `F.cross_entropy(model(tokens, neighbours).flatten(0, 1), targets.flatten(),
        ignore_index=pad_id)`, but the (B, n, vocab) logits are never materialised: the output
        layer and the loss (with the copy head's mixture) run in row blocks, gradients computed
        in the same pass (faster, and far less memory, in training).

        Raises:
            ValueError: wrong shapes, dtypes or token ids.
        """
        if not isinstance(targets, Tensor) or targets.shape != tokens.shape:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"targets must have the shape of tokens {tuple(tokens.shape)}; got {got}"
            )
        hidden, span, reading = self._full(tokens, neighbours)  # (B, n, d)
        mixture: tuple[Tensor, ...] = ()
        copy = self._copy(hidden, span, reading)
        if copy is not None:  # the copy head's mixture, never materialised either
            weights, ids = copy  # (B, n, 1 + k*r), (B, n, k*r)
            copied = (weights[..., 1:] * (ids == targets[..., None])).sum(-1)  # (B, n)
            log_gate = weights[..., 0].clamp_min(1e-30).log()
            mixture = (log_gate.flatten(), copied.flatten())
        if getattr(self.lm_head, "bias", None) is not None:
            raise NotImplementedError("the fused loss expects an output layer without bias")
        hidden = hidden.flatten(0, 1)  # (B*n, d)
        weight = self.lm_head.weight  # (V, d)
        if torch.is_autocast_enabled("cpu") and hidden.device.type == "cpu":
            dtype = torch.get_autocast_dtype("cpu")
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return _LinearCrossEntropy.apply(
            hidden, weight, targets.flatten(), self.cfg.pad_id, *mixture
        )

    def _full(
        self, tokens: Tensor, neighbours: Tensor | None
    ) -> tuple[Tensor, Span, Reading | None]:
        """The checked pass of `forward`: (final hidden states (B, n, d), its Span, Reading)."""
        check_tokens(self.cfg, tokens)
        B, n = tokens.shape
        if neighbours is not None:
            check_neighbours(self.cfg, neighbours, B, n)
        L = n // self.cfg.chunk_size  # chunks whose neighbours some position reads
        span = self._span(tokens, 0, n)
        reading = None if neighbours is None else self._reading(neighbours[:, :L], slice(0, L))
        return self._pass(tokens, span, reading), span, reading

    def _copy(
        self, hidden: Tensor, span: Span, reading: Reading | None
    ) -> tuple[Tensor, Tensor] | None:
        """The copy head's (weights (B, T, 1 + k*r), ids (B, T, k*r)) for final hidden states
        (B, T, d), its keys of newly encoded chunks cached; None: no position copies (a closed
        gate is the plain LM, but training still needs its gradient)."""
        if self.copy is None or reading is None:
            return None
        if self.copy.closed() and not torch.is_grad_enabled():
            return None
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # bf16 bases
        return self.copy.read_copy(hidden, span, self.copy_layer, reading)

    def _head(
        self, hidden: Tensor, span: Span, reading: Reading | None, select: Any = None
    ) -> Tensor:
        """Logits (B, T, V) of the final hidden states (B, T, d), or of hidden[select] only;
        with a copy head reading neighbours, the log-probabilities of its mixture."""
        copy = self._copy(hidden, span, reading)
        if select is not None:
            hidden = hidden[select]
            copy = None if copy is None else (copy[0][select], copy[1][select])
        logits = self.lm_head(hidden)
        return logits if copy is None else CopyHead.mix(logits, *copy)

    # ---- decoding (retrolm.decoding.Decodable): rows of one cache, each at its own position

    def new_cache(
        self,
        rows: int,
        size: int | None = None,
        retrieval: bool = True,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """A cache of `rows` independent rows of `size` positions (default max_seq_len).

        Each row holds one sequence: `prefill_rows` encodes windows into rows (any rows, at any
        time) in one forward pass, `decode_rows` feeds one token to each of several rows at
        their own positions in one forward pass. The caller keeps each row's position.
        `retrieval` False (or a model without retrieval): CCA is off in every row (RETRO[OFF]).
        """
        size = self.cfg.max_seq_len if size is None else size
        if not 1 <= size <= self.cfg.max_seq_len:
            raise ValueError(f"a cache of {size} positions; 1 to max_seq_len are allowed")
        token_ids = torch.zeros(rows, size, dtype=torch.long, device=device)
        return KVCache(token_ids, retrieval=retrieval and self.cfg.retrieval)

    @torch.inference_mode()
    def prefill_rows(
        self,
        cache: KVCache,
        rows: list[int] | Tensor,
        windows: list[Tensor],
        neighbours: list[Tensor | None] | None = None,
    ) -> Tensor:
        """Encode windows[i] (T_i,) into row rows[i] of a cache, from position 0, all in one
        forward pass; each row then holds what encoding its window alone would write in it.

        The windows, right-padded with pad_id to the longest, are fed to a cache of their own;
        then positions 0..T_i-1 of row i and its chunks with neighbours are copied to rows[i]
        (`KVCache.copy_rows`), nothing past them. The padding changes no real position:
        self-attention is causal, and a row with fewer completed chunks than the longest gets
        absent (all-pad) neighbours for the others, which only its padding reads.

        Args:
            rows: R distinct row indices, in any order.
            windows: R int64 tensors (T_i,), 1 <= T_i <= the cache's size.
            neighbours: per row, (T_i // m, k, r) for the window's completed chunks, or None
                (RETRO[OFF], or no chunk complete); None: None for every row.
        Returns:
            (R, V) logits predicting each row's next token.
        """
        device = cache.token_ids.device
        rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        if len(set(rows.tolist())) != len(windows):
            raise ValueError(f"prefill_rows: {len(windows)} windows need as many distinct rows")
        lengths = torch.tensor([len(w) for w in windows], device=device)  # (R,)
        if int(lengths.max()) > cache.size:
            raise ValueError(f"prefill_rows: a window longer than the cache ({cache.size})")
        tokens = nn.utils.rnn.pad_sequence(
            list(windows), batch_first=True, padding_value=self.cfg.pad_id
        )  # (R, T)
        nb, chunks = self._prefill_neighbours(cache, lengths, neighbours)
        batch = KVCache(tokens.clone(), cache.retrieval)
        U = 0 if nb is None else nb.shape[1]
        span = self._span(batch.token_ids, 0, tokens.shape[1], batch, chunks=U)
        reading = self._reading(nb, slice(0, U)) if cache.retrieval else None
        hidden = self._pass(tokens, span, reading)  # (R, T, d)
        last = (torch.arange(len(windows), device=device), lengths - 1)
        logits = self._head(hidden, span, reading, select=last)  # (R, V)
        cache.copy_rows(
            batch, rows, lengths, chunks, self.cfg.chunk_size
        )  # the copy head's keys included
        return logits

    def _prefill_neighbours(
        self, cache: KVCache, lengths: Tensor, neighbours: list[Tensor | None] | None
    ) -> tuple[Tensor | None, Tensor]:
        """`prefill_rows`' neighbours: (R, U, k, r) for the U = max(T_i) // m chunks of the
        padded windows (absent, all pad_id, where a row has none), or None; and the number of
        chunks (R,) whose neighbours each row was given."""
        m, R = self.cfg.chunk_size, len(lengths)
        given = [None] * R if neighbours is None or not cache.retrieval else list(neighbours)
        counts = [0 if nb is None else nb.shape[0] for nb in given]
        chunks = torch.tensor(counts, device=lengths.device)
        for count, T in zip(counts, lengths.tolist(), strict=True):
            if count and count != T // m:
                raise ValueError(f"a window of {T} tokens has {T // m} chunks; {count} given")
        if not any(counts):
            return None, chunks
        first = next(nb for nb in given if nb is not None and nb.shape[0])
        out = first.new_full((R, int(lengths.max()) // m, *first.shape[1:]), self.cfg.pad_id)
        for i, nb in enumerate(given):
            if counts[i]:
                out[i, : counts[i]] = nb
        return out, chunks

    @torch.inference_mode()
    def decode_rows(
        self,
        cache: KVCache,
        rows: Tensor,
        tokens: Tensor,
        positions: Tensor,
        neighbours: Tensor | None = None,
    ) -> Tensor:
        """One decoding step for several rows of a cache, each at its own position.

        Row rows[i] holds positions 0..positions[i]-1 (from `prefill_rows` and earlier steps);
        tokens[i] is fed at positions[i]. The result equals `prefill_rows` / `generate` on each
        row alone (tests/test_serve_batching.py), up to float rounding.

        Args:
            rows: (R,) distinct row indices; tokens, positions: (R,) int64.
            neighbours: (C, k, r) for the rows whose token completes a chunk
                ((position + 1) % m == 0), in the order of `rows`; required with retrieval.
        Returns:
            (R, V) logits predicting each row's next token.
        """
        span = self._row_span(cache, rows, tokens, positions)
        reading = self._row_reading(cache, rows, positions, neighbours)
        hidden = self._pass(tokens[:, None], span, reading)  # (R, 1, d)
        return self._head(hidden, span, reading, select=(slice(None), 0))  # (R, V)

    @torch.inference_mode()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        retrieve: Retrieve | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """Continue `prompt` by `max_new_tokens` tokens, with a KV cache
        (`retrolm.decoding.generate`: the B rows are B sequences of one `BatchDecoder`).

        Each time a chunk of m tokens is complete (prompt chunks included) and a later token
        is about to be fed, `retrieve(chunk (B, m)) -> (B, k, r)` gives its neighbours, which are
        encoded once; self-attention and CCA keys/values are cached. The model reads a window
        of at most max_seq_len tokens starting at a chunk boundary (`window_start`): when it is
        full, the oldest whole chunk is dropped and the kept tokens are encoded again (with the
        neighbours already retrieved for their chunks), so generation may run past max_seq_len.
        Greedy output equals decoding by full re-computation with `model(window, neighbours)`.

        Args:
            prompt: (B, P) int64, P >= 1. A prompt longer than max_seq_len is read as the
                window would hold it had it been generated: its oldest whole chunks (the first
                `window_start(P, ...)` tokens) are dropped unread and never retrieved for.
            max_new_tokens: tokens to add (any number >= 0).
            retrieve: neighbours for a completed chunk; None decodes with RETRO[OFF].
            temperature: 0 is greedy (argmax); otherwise sample from softmax(logits / T).
            top_k: sample among the k most likely tokens only.
            top_p: nucleus sampling: the smallest set of tokens with probability >= top_p.
            generator: torch.Generator for reproducible sampling.
            on_token: called with each new token (B,) as soon as it is sampled (for streaming).
        Returns:
            (B, P + max_new_tokens) int64.
        Raises:
            ValueError: bad shapes, lengths or sampling settings.
        """
        return decoding.generate(
            self, prompt, max_new_tokens, retrieve, temperature, top_k, top_p, generator, on_token
        )


class RETRO(RetrievalModel):
    """The Retrieval-Enhanced Transformer (decoder, retrieval encoder, chunked cross-attention).

    `model(tokens, neighbours)` returns logits; `neighbours=None` runs RETRO[OFF].
    """

    def __init__(self, cfg: RetroConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dec_dim
        alpha = (3 * cfg.dec_depth) ** 0.25 if cfg.use_deepnet else 1.0
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg, i + 1 in cfg.cca_layers, alpha) for i in range(cfg.dec_depth)
        )
        self.norm = nn.Identity() if cfg.use_deepnet else nn.LayerNorm(d, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.encoder = Encoder(cfg) if cfg.retrieval else None
        self.copy = (
            CopyHead(d, cfg.enc_dim, cfg.chunk_size, cfg.cca_match,
                     cfg.num_neighbours * cfg.neighbour_len)
            if cfg.copy_head and cfg.retrieval else None
        )  # fmt: skip
        self.copy_layer = cfg.dec_depth  # the copy head's key in the caches' CCA dicts
        self.rotary = Rotary(d // cfg.dec_heads, cfg.rotary_base)
        self.first_cca = cfg.cca_layers[0] - 1 if cfg.retrieval else -1  # 0-based block index
        self.reset_parameters()

    # ---- initialisation and parameter groups

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled down with depth."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ChunkedCrossAttention) and module.match_weight is not None:
                nn.init.constant_(module.match_weight, module.MATCH_INIT)
        if self.copy is not None:
            nn.init.zeros_(self.copy.sentinel)
            nn.init.constant_(self.copy.sentinel_bias, self.copy.init_bias)
        if cfg.use_deepnet:  # DeepNet (Wang et al. 2022) encoder-decoder beta
            dec_beta = (12 * cfg.dec_depth) ** -0.25
            enc_beta = 0.87 * (cfg.enc_depth**4 * cfg.dec_depth) ** (-1 / 16)
            for name, p in self.named_parameters():
                if name.endswith(("out.weight", "ff.up.weight", "ff.down.weight")) or (
                    name.endswith(("kv.weight", "qkv.weight"))
                ):
                    p.data.mul_(enc_beta if name.startswith("encoder.") else dec_beta)
        else:
            scale = 1 / math.sqrt(2 * cfg.dec_depth)
            for name, p in self.named_parameters():
                if name.endswith(("out.weight", "ff.down.weight")):
                    p.data.mul_(scale)

    @staticmethod
    def _is_retrieval_name(name: str) -> bool:
        return name.startswith(("encoder.", "copy.")) or ".cca" in name

    def retrieval_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the encoder, the CCA layers and the copy head: what
        RETRO-fitting trains."""
        for name, p in self.named_parameters():
            if self._is_retrieval_name(name):
                yield name, p

    def num_params(self, include_embeddings: bool = True) -> int:
        """Number of parameters (the token embedding and output layer excluded if asked)."""
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self.tok_emb.weight.numel() + self.lm_head.weight.numel()
        return total

    # ---- the decoder

    def _pass(self, tokens: Tensor, span: Span, reading: Reading | None) -> Tensor:
        """The decoder blocks over tokens (B, T) at the span's positions, normalised."""
        x = self.tok_emb(tokens)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, span, i, reading)
        return self.norm(x)  # (B, T, d)

    def _embed_neighbours(self, neighbours: Tensor) -> Tensor:
        return self.tok_emb(neighbours)

    # ---- save / load (the file format and its checks: retrolm.weights)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write `config.json` and `model.safetensors` into `folder`, each atomically."""
        return weights.write_model_folder(folder, self.cfg.to_dict(), self.state_dict())

    @classmethod
    def load(
        cls, folder: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> RETRO:
        """Load a model written by `save`: every weight must be present, and no other.

        Raises:
            InputError: a file is missing.
            CorruptArtifactError: unreadable files, missing, extra or misshapen weights.
        """
        folder = Path(folder)
        cfg, state = weights.read_model_folder(folder)
        model = cls(cfg)
        where = folder / weights.WEIGHTS_FILE
        weights.check_keys(model.state_dict(), state, where, "this config")
        model.load_state_dict(state, strict=True)
        return model.to(map_location)

    @classmethod
    def from_baseline(cls, baseline_folder: str | os.PathLike[str], cfg: RetroConfig) -> RETRO:
        """RETRO-fitting: `cfg`'s model with the decoder weights of a saved baseline.

        The baseline's decoder must match `cfg` exactly (every decoder weight, same shapes);
        the encoder, the CCA layers and the copy head are freshly initialised.

        Raises:
            MismatchError: the baseline's decoder settings differ from `cfg`.
            CorruptArtifactError: missing or extra decoder weights.
        """
        folder = Path(baseline_folder)
        base_cfg, state = weights.read_model_folder(folder)
        weights.check_decoder(base_cfg, cfg, folder)
        model = cls(cfg)
        decoder = {k: v for k, v in model.state_dict().items() if not cls._is_retrieval_name(k)}
        where = folder / weights.WEIGHTS_FILE
        weights.check_keys(decoder, state, where, "a decoder of this config")
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(cls._is_retrieval_name(k) for k in missing)
        return model


class _LinearCrossEntropy(torch.autograd.Function):
    """Output layer + cross-entropy in row blocks; the gradients are computed in the forward.

    In float32/float64 each block's logit gradient goes straight into the weight gradient
    (addmm_). In bf16/fp16 the blocks' gradients (N, V) are kept in that precision (half the
    size of float32 logits) and multiplied once at the end, as autocast's own backward would.

    With `log_gate` and `copied` (N,) (the copy head's mixture, `CopyHead.mix`), row i's loss is
    -log(exp(log_gate_i) * softmax(logits_i)[t_i] + copied_i): the LM's probability of the
    target weighted by the sentinel, plus what the pointer puts on it. The logit gradient is then
    the plain one times pi_i, the posterior that the LM wrote the target, and the gradients of
    log_gate and copied are computed in the same pass.
    """

    ROWS = 256  # rows per block

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore: int,
        log_gate: Tensor | None = None,
        copied: Tensor | None = None,
    ) -> Tensor:
        # hidden (N, d), weight (V, d), targets (N,); log_gate, copied (N,) or None
        N, rows = hidden.shape[0], _LinearCrossEntropy.ROWS
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for doubles
        low = hidden.dtype != acc
        keep = targets != ignore  # (N,)
        count = keep.sum().clamp(min=1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        weight_grad = ctx.needs_input_grad[1]  # False for a frozen output layer (RETRO-fitting)
        grad_hidden = grad_weight = grad_logits = None
        if need_grad and low:
            grad_logits = hidden.new_empty(N, weight.shape[0])  # (N, V)
        elif need_grad:
            grad_hidden = torch.empty_like(hidden)  # (N, d)
            grad_weight = torch.zeros_like(weight) if weight_grad else None  # (V, d)
        mixture = log_gate is not None and copied is not None
        grad_gate = grad_copied = None
        if mixture:
            assert log_gate is not None and copied is not None
            log_gate, copied = log_gate.to(acc), copied.to(acc)
            grad_gate, grad_copied = torch.zeros_like(log_gate), torch.zeros_like(copied)
        total = hidden.new_zeros((), dtype=acc)
        block = hidden.new_empty(min(rows, N), weight.shape[0], dtype=acc)  # reused (rows, V)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, rows):
                h, t, kept = hidden[s : s + rows], targets[s : s + rows], keep[s : s + rows]
                logits = block[: h.shape[0]]
                logits.copy_(h @ weight.T)  # (rows, V), in `acc` precision
                picked = t.clamp(min=0)[:, None]  # (rows, 1)
                target_logit = logits.gather(1, picked).squeeze(1)  # (rows,)
                top = logits.amax(dim=-1, keepdim=True)  # (rows, 1)
                probs = logits.sub_(top).exp_()  # unnormalised softmax, in place
                total_exp = probs.sum(dim=-1, keepdim=True)  # (rows, 1)
                lse = (total_exp.log() + top).squeeze(1)  # (rows,)
                scale = kept.to(acc) / count  # (rows,) d(mean)/d(row loss)
                if mixture:
                    assert log_gate is not None and copied is not None
                    assert grad_gate is not None and grad_copied is not None
                    lm = log_gate[s : s + rows] + target_logit - lse  # log(gate * p_lm(t))
                    log_mix = torch.logaddexp(lm, copied[s : s + rows].log())
                    total += (-log_mix * kept).sum()
                    pi = (lm - log_mix).exp()  # the posterior that the LM wrote the target
                    grad_gate[s : s + rows] = -scale * pi
                    grad_copied[s : s + rows] = -scale * (-log_mix).exp()
                    scale = scale * pi
                else:
                    total += ((lse - target_logit) * kept).sum()
                if not need_grad:
                    continue
                grad = probs.mul_(scale[:, None] / total_exp)  # softmax / count
                grad.scatter_add_(1, picked, -scale[:, None])  # minus one-hot
                if low:
                    grad_logits[s : s + rows] = grad
                else:
                    grad_hidden[s : s + rows] = grad @ weight  # (rows, d)
                    if grad_weight is not None:
                        grad_weight.addmm_(grad.T, h)  # (V, d)
            if need_grad and low:
                grad_hidden = grad_logits @ weight  # (N, d)
                grad_weight = grad_logits.T @ hidden if weight_grad else None  # (V, d)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_gate, grad_copied)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight, grad_gate, grad_copied = ctx.saved_tensors
        grad_h = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_weight * grad_loss.to(grad_weight.dtype)
        grad_g = grad_c = None
        if grad_gate is not None and ctx.needs_input_grad[4]:
            grad_g = grad_gate * grad_loss.to(grad_gate.dtype)
        if grad_copied is not None and ctx.needs_input_grad[5]:
            grad_c = grad_copied * grad_loss.to(grad_copied.dtype)
        return grad_h, grad_w, None, None, grad_g, grad_c
