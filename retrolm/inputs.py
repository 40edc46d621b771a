"""Checks of what a model is given, shared by retrolm's own RETRO and RETRO-fitted bases: token
ids and neighbours, refused with a message that says what was expected and what came.

Each takes the model's config (`RetroConfig` or `RetrofitConfig`: `vocab_size`, `max_seq_len`,
`chunk_size`, `retrieval`) and raises `ValueError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_tokens(cfg: Any, tokens: Tensor, name: str = "tokens") -> None:
    """Refuse anything but int64 token ids (batch, n), 1 <= n <= max_seq_len, in the vocabulary."""
    expected = f"an int64 tensor of shape (batch, n) with 1 <= n <= max_seq_len ({cfg.max_seq_len})"
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        dtype = f" {tokens.dtype}" if isinstance(tokens, Tensor) else ""
        raise ValueError(f"{name} must be {expected}; got {got}{dtype}")
    if not 1 <= tokens.shape[1] <= cfg.max_seq_len or tokens.shape[0] < 1:
        raise ValueError(f"{name} must be {expected}; got shape {tuple(tokens.shape)}")
    check_ids(cfg, tokens, name)


def check_ids(cfg: Any, tokens: Tensor, name: str) -> None:
    """Refuse token ids outside 0..vocab_size-1."""
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(
            f"{name} has token ids in [{lo}, {hi}], outside 0..vocab_size-1 "
            f"({cfg.vocab_size - 1}); was it made with another tokenizer?"
        )


def check_neighbours(cfg: Any, neighbours: Tensor, batch: int, n: int) -> None:
    """Refuse neighbours that are not int64 (batch, n/m whole or partial chunks, k, r) ids of a
    retrieval model's vocabulary."""
    m = cfg.chunk_size
    chunks = f"{n // m}" if n % m == 0 else f"{n // m} or {-(-n // m)}"
    expected = f"an int64 tensor of shape (batch={batch}, chunks={chunks}, k, r)"
    if not cfg.retrieval:
        raise ValueError(
            "neighbours given to a model without retrieval (cca_layers is empty); "
            "pass neighbours=None"
        )
    ok = (
        isinstance(neighbours, Tensor)
        and neighbours.dtype == torch.long
        and neighbours.dim() == 4
        and neighbours.shape[0] == batch
        and neighbours.shape[1] in (n // m, -(-n // m))
        and neighbours.shape[2] >= 1
        and neighbours.shape[3] >= 1
    )
    if not ok:
        got = (
            f"shape {tuple(neighbours.shape)} {neighbours.dtype}"
            if isinstance(neighbours, Tensor)
            else type(neighbours).__name__
        )
        raise ValueError(f"neighbours must be {expected}; got {got}")
    if neighbours.numel():
        check_ids(cfg, neighbours, "neighbours")
