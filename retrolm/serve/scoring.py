"""The log-probabilities of a prompt's tokens (`echo` with `logprobs`), read as `retrolm eval`
reads a stream: RETRO[ON], chunk u's neighbours (retrieved with chunk u as the query) read by
the tokens from the end of chunk u on, never a chunk's neighbours before it is complete.

A prompt longer than the model's window is scored with sliding windows as `retrolm eval` lays
them (`retrolm.evaluate.sliding_windows`; the server does not import the evaluation stage, and
tests/test_serve_api.py checks that the two give the same windows): `max_seq_len` tokens moved
by half of that (whole chunks), the first window scoring all its tokens and each later one its
last `stride`, so every token but the first is scored once with at least `window - stride`
tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from retrolm.decoding import TokenLogprobs, pick_logprobs

MAX_LOGPROBS = 5  # OpenAI's completions limit on `logprobs`


def score_windows(length: int, window: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(start, input length, first scored offset) of the windows that score a prompt of
    `length` tokens: `window` tokens moved by window // 2 in whole chunks. Window `start` reads
    tokens start .. start+n-1 and scores its predictions from offset `first` on (of tokens
    start+first+1 .. start+n), so that every token 1..length-1 is scored once."""
    stride = max(chunk_size, (window // 2) // chunk_size * chunk_size)
    out, scored_to, start = [], 0, 0  # tokens 1..scored_to are done
    while scored_to < length - 1:
        n = min(window, length - 1 - start)
        out.append((start, n, scored_to - start))
        scored_to = start + n
        start += stride
    return out


@torch.inference_mode()
def prompt_logprobs(
    model: Any,
    tokens: list[int],
    neighbours: np.ndarray | None,
    *,
    top: int,
    device: torch.device | str = "cpu",
) -> TokenLogprobs:
    """Log-probabilities of `tokens` (the first one's None) and their top ids.

    Args:
        model: called as `model(tokens (1, n), neighbours=(1, ceil(n/m), k, r) | None)`.
        tokens: the prompt.
        neighbours: (len(tokens) // m, k, r) neighbour tokens of each complete chunk, or None
            (RETRO[OFF], or a model without retrieval).
        top: how many most likely ids to give per token (0: none).
    """
    cfg = model.cfg
    m, n_all = cfg.chunk_size, len(tokens)
    out = TokenLogprobs([None], [None])
    if n_all < 2:
        return out
    stream = torch.tensor(tokens, dtype=torch.long, device=device)
    for start, n, first in score_windows(n_all, cfg.max_seq_len, m):
        x, y = stream[start : start + n], stream[start + 1 : start + n + 1]
        nb = None
        if neighbours is not None:
            chunks = math.ceil(n / m)
            have = neighbours[start // m : start // m + chunks]
            if len(have) < chunks:  # the last chunk is incomplete: its neighbours are not read
                pad = np.full((chunks - len(have), *neighbours.shape[1:]), cfg.pad_id)
                have = np.concatenate([have, pad.astype(neighbours.dtype)])
            nb = torch.as_tensor(np.asarray(have, dtype=np.int64), device=device)[None]
        logits = model(x[None], neighbours=nb)[0]  # (n, V)
        out.extend(pick_logprobs(logits[first:], y[first:], top))
    return out


def neighbours_of(
    tokens: list[int], chunk_size: int, retrieve: Callable[[np.ndarray], Any] | None
) -> tuple[np.ndarray | None, list[Any]]:
    """(neighbour tokens (C, k, r), the retriever's info per chunk) of the C complete chunks of
    `tokens`, each retrieved with its own tokens as the query (None, []: no retrieval)."""
    complete = len(tokens) // chunk_size
    if retrieve is None or complete == 0:
        return None, []
    chunks = np.asarray(tokens[: complete * chunk_size], dtype=np.int64).reshape(complete, -1)
    found, infos = retrieve(chunks), None
    if isinstance(found, tuple):
        found, infos = found
    found = np.asarray(found.cpu() if isinstance(found, torch.Tensor) else found, dtype=np.int64)
    return found, list(infos) if infos is not None else [None] * complete


def top_json(
    tokenizer: Any, token: str, chosen: float | None, top: list[tuple[int, float]] | None
) -> dict[str, float] | None:
    """OpenAI's `top_logprobs` entry: {text: log-probability} of the top ids, the chosen token
    among them (so up to `logprobs` + 1 entries); None where the token has none."""
    if top is None:
        return None
    out: dict[str, float] = {}
    for i, lp in top:  # best first: two ids of one text keep the better's
        out.setdefault(tokenizer.decode([i]), lp)
    if chosen is not None:
        out.setdefault(token, chosen)
    return out


def token_pieces(tokenizer: Any, ids: list[int], context: int = 4) -> list[str]:
    """The text each token of `ids` adds, decoded behind up to `context` tokens before it (so
    that a character split over tokens, or a SentencePiece leading space, comes out whole)."""
    heads = [ids[max(0, i - context) : i] for i in range(len(ids))]
    fulls = [ids[max(0, i - context) : i + 1] for i in range(len(ids))]
    before, after = tokenizer.decode_batch(heads), tokenizer.decode_batch(fulls)
    pieces = []
    for b, a in zip(before, after):
        same = len(b) if a.startswith(b) else len(_common_prefix(a, b))
        pieces.append(a[same:])
    return pieces


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
