"""Training samples from a chunk store, and a deterministic, resumable, DDP-aware sampler.

A sample is `seq_len` consecutive tokens of one split, aligned to chunk boundaries: the split's
chunks are laid end to end (documents packed one after the other, each ending with `<eos>` and
its padded tail) and cut into windows of `seq_len // chunk_size` chunks. The targets are the
inputs shifted by one token; the last target is the first token of the next chunk of the split.

Each chunk of a sample carries its precomputed neighbours (plus continuations). The leakage rule:
no neighbour may come from a document that contributes any token (input or target) to the
sample, otherwise the model could learn to copy its own future. The stored K neighbours of a
chunk are filtered by that rule and the first k that remain are used, `-1` (all padding) where
fewer remain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)


@runtime_checkable
class ChunkSource(Protocol):
    """What samples need from a database; `retrolm.database.Database` satisfies it."""

    chunk_size: int  # m, tokens per chunk
    pad_id: int  # padding token, never a target
    chunk_doc: np.ndarray  # (num_chunks,) int64, chunk -> document index

    def split_chunk_ids(self, split: str) -> np.ndarray:
        """Chunk ids of `split` ("train" or "valid"), ascending."""
        ...

    def chunk_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(..., m) int64 tokens of the chunks `ids`."""
        ...

    def neighbours(self, chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n, K) int64 with -1 where none, distances (n, K)) stored for `chunk_ids`."""
        ...

    def neighbour_tokens(self, neighbour_ids: np.ndarray) -> np.ndarray:
        """(..., k, 2m) int64: each neighbour chunk then its continuation; pad where id is -1."""
        ...


@dataclass
class ArrayChunkSource:
    """A `ChunkSource` held in memory: chunk tokens, their documents, splits and neighbours.

    Useful for small experiments and tests; a real database is `retrolm.database.Database`.
    """

    tokens: np.ndarray  # (num_chunks, m) int64
    chunk_doc: np.ndarray  # (num_chunks,) int64, non-decreasing: a document's chunks are adjacent
    chunk_split: np.ndarray  # (num_chunks,) str, "train" or "valid"
    stored_neighbours: np.ndarray  # (num_chunks, K) int64, -1 where none
    pad_id: int = 0

    @property
    def chunk_size(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_chunks(self) -> int:
        return int(self.tokens.shape[0])

    def split_chunk_ids(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.chunk_split == split).astype(np.int64)

    def chunk_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.tokens[np.asarray(ids, dtype=np.int64)].astype(np.int64)

    def neighbours(self, chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self.stored_neighbours[np.asarray(chunk_ids, dtype=np.int64)]
        return ids, np.where(ids >= 0, 0.0, np.inf).astype(np.float32)

    def neighbour_tokens(self, neighbour_ids: np.ndarray) -> np.ndarray:
        return continuation_tokens(self.tokens, self.chunk_doc, neighbour_ids, self.pad_id)


def continuation_tokens(
    tokens: np.ndarray, chunk_doc: np.ndarray, neighbour_ids: np.ndarray, pad_id: int
) -> np.ndarray:
    """Gather each neighbour chunk followed by the next chunk of its document (pad otherwise)."""
    ids = np.asarray(neighbour_ids, dtype=np.int64)
    m = tokens.shape[1]
    present = ids >= 0
    safe = np.where(present, ids, 0)
    nxt = np.minimum(safe + 1, len(tokens) - 1)
    has_next = present & (safe + 1 < len(tokens)) & (chunk_doc[nxt] == chunk_doc[safe])
    out = np.full(ids.shape + (2 * m,), pad_id, dtype=np.int64)
    out[..., :m] = np.where(present[..., None], tokens[safe], pad_id)
    out[..., m:] = np.where(has_next[..., None], tokens[nxt], pad_id)
    return out


@dataclass
class Batch:
    """One batch of samples, as tensors ready for the model."""

    tokens: torch.Tensor  # (B, n) int64
    targets: torch.Tensor  # (B, n) int64, pad_id where nothing is to be predicted
    neighbours: torch.Tensor | None  # (B, n // m, k, 2m) int64, None without retrieval
    neighbour_ids: np.ndarray | None  # (B, n // m, k) int64 chunk ids, -1 where none

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())


def filter_neighbours(
    stored: np.ndarray, stored_doc: np.ndarray, sample_docs: np.ndarray, k: int
) -> np.ndarray:
    """Apply the leakage rule and keep the first `k` neighbours that remain.

    Args:
        stored: (B, C, K) neighbour chunk ids, -1 where none.
        stored_doc: (B, C, K) document of each stored neighbour (anything where the id is -1).
        sample_docs: (B, D) documents contributing tokens to each sample (-1 entries ignored).
        k: neighbours to keep.

    Returns:
        (B, C, k) ids, in their stored order, -1 where fewer than k remain.
    """
    leak = (stored_doc[..., None] == sample_docs[:, None, None, :]).any(-1)  # (B, C, K)
    keep = (stored >= 0) & ~leak
    order = np.argsort(~keep, axis=-1, kind="stable")[..., :k]  # kept ones first, stored order
    chosen = np.take_along_axis(stored, order, axis=-1)
    chosen_ok = np.take_along_axis(keep, order, axis=-1)
    chosen = np.where(chosen_ok, chosen, -1)
    if chosen.shape[-1] < k:  # fewer stored than asked for
        pad = np.full(chosen.shape[:-1] + (k - chosen.shape[-1],), -1, dtype=chosen.dtype)
        chosen = np.concatenate([chosen, pad], axis=-1)
    return chosen


class RetroSamples:
    """Fixed-length, chunk-aligned samples of one split, with leakage-filtered neighbours.

    Args:
        source: the chunk store (a `Database` or `ArrayChunkSource`).
        split: "train" or "valid".
        seq_len: tokens per sample, a multiple of the chunk size.
        num_neighbours: k neighbours per chunk; 0 gives samples without neighbours.

    Raises:
        ValueError: `seq_len` is not a positive multiple of the chunk size, or k < 0.
    """

    def __init__(self, source: ChunkSource, split: str, seq_len: int, num_neighbours: int) -> None:
        m = source.chunk_size
        if seq_len <= 0 or seq_len % m:
            raise ValueError(f"seq_len: {seq_len} is not a positive multiple of the chunk size {m}")
        if num_neighbours < 0:
            raise ValueError(f"num_neighbours: must be >= 0, got {num_neighbours}")
        self.source = source
        self.split = split
        self.seq_len = seq_len
        self.chunks_per_sample = seq_len // m
        self.k = num_neighbours
        self.chunk_ids = np.asarray(source.split_chunk_ids(split), dtype=np.int64)
        self.chunk_doc = np.asarray(source.chunk_doc, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chunk_ids) // self.chunks_per_sample

    def window_ids(self, indices: np.ndarray) -> np.ndarray:
        """(B, C + 1) chunk ids of each sample plus the chunk giving its last target (-1: none)."""
        c = self.chunks_per_sample
        pos = np.asarray(indices, dtype=np.int64)[:, None] * c + np.arange(c + 1)
        inside = pos < len(self.chunk_ids)
        return np.where(inside, self.chunk_ids[np.minimum(pos, len(self.chunk_ids) - 1)], -1)

    def get(self, indices: np.ndarray | list[int]) -> Batch:
        """The samples `indices` as one batch."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0 or indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"sample indices out of range [0, {len(self)})")
        window = self.window_ids(indices)  # (B, C + 1)
        c, pad = self.chunks_per_sample, self.source.pad_id
        tokens = self.source.chunk_tokens(window[:, :c]).reshape(len(indices), -1)
        nxt = window[:, c]
        first_next = np.full(len(indices), pad, dtype=np.int64)
        if (nxt >= 0).any():
            first_next[nxt >= 0] = self.source.chunk_tokens(nxt[nxt >= 0])[:, 0]
        targets = np.concatenate([tokens[:, 1:], first_next[:, None]], axis=1)
        neighbours = ids = None
        if self.k > 0:
            ids = self.neighbour_ids(window)
            neighbours = torch.from_numpy(np.ascontiguousarray(self.source.neighbour_tokens(ids)))
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), neighbours, ids)

    def neighbour_ids(self, window: np.ndarray) -> np.ndarray:
        """(B, C, k) leakage-filtered neighbour ids for sample windows (B, C + 1)."""
        b, c = window.shape[0], self.chunks_per_sample
        stored, _ = self.source.neighbours(window[:, :c].reshape(-1))
        stored = np.asarray(stored, dtype=np.int64).reshape(b, c, -1)
        stored_doc = np.where(stored >= 0, self.chunk_doc[np.maximum(stored, 0)], -2)
        sample_docs = np.where(window >= 0, self.chunk_doc[np.maximum(window, 0)], -3)
        return filter_neighbours(stored, stored_doc, sample_docs, self.k)


class ResumableSampler:
    """Deterministic sample order: a fresh seeded permutation per epoch, one global batch a step.

    Every rank draws the same global batch of `global_batch` samples and keeps its share
    (`[rank::world_size]`), split into `grad_accum` micro-batches. The position is the pair
    (epoch, step in epoch); `load_state_dict(state_dict())` resumes with the very same batches.

    Raises:
        ValueError: the global batch does not split evenly over ranks and micro-batches, or the
            split holds fewer samples than one global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        if global_batch % (world_size * grad_accum):
            raise ValueError(
                f"batch_size: {global_batch} does not split evenly over {world_size} process(es)"
                f" x {grad_accum} accumulation step(s)"
            )
        if num_samples < global_batch:
            raise ValueError(
                f"batch_size: the split holds {num_samples} samples, fewer than one batch of "
                f"{global_batch}; use a smaller batch_size or seq_len, or a larger corpus"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.steps_per_epoch = num_samples // global_batch
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.num_samples)
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches (sample indices) for the next optimizer step."""
        s = self.step_in_epoch * self.global_batch
        global_batch = self._permutation()[s : s + self.global_batch]
        mine = global_batch[self.rank :: self.world_size]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return list(np.split(mine, self.grad_accum))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict` (same data, seed and global batch).

        Raises:
            ValueError: the state belongs to another data set, seed or batch size.
        """
        for key in ("seed", "num_samples", "global_batch"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state: {key} was {state[key]} when saved, now {getattr(self, key)}"
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
