"""Read access to a database's block files (memory-mapped), shared by the stages and `Database`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.database.manifest import ChunkBlock, Manifest
from retrolm.errors import CorruptArtifactError
from retrolm.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)

INDEXED_SPLITS = ("train", "retrieval")  # the splits whose chunks the index holds


def load_block(path: Path, rows: int, what: str) -> np.ndarray:
    """Memory-map a block file, refusing one that is missing or of the wrong length."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptArtifactError(
            f"the {what} block {path} is missing or unreadable ({e}); rerun `retrolm db build` "
            "with the same settings to rebuild it"
        ) from None
    if array.shape[0] != rows:
        raise CorruptArtifactError(
            f"the {what} block {path} has {array.shape[0]} rows, the manifest says {rows}; rerun "
            "`retrolm db build` with the same settings to rebuild it"
        )
    return array


def gather_rows(
    block_of: Callable[[int], np.ndarray], starts: np.ndarray, ids: np.ndarray, dim: int
) -> np.ndarray:
    """Rows `ids` (global, int64) of arrays split in blocks, as one (len(ids), dim) float32
    array in the order asked. Each distinct id is read once, in ascending order (one
    `np.unique`), and each block hit (`block_of(b)`, a memory-mapped array starting at global
    row `starts[b]`) is indexed once: re-ranking asks for the candidates of many queries at a
    time, and queries from one document share most of theirs (the benchmark's neighbour stage
    asked for each row 4.2 times at 4M chunks, 3.2 at 16M)."""
    ids = np.asarray(ids, dtype=np.int64)
    distinct, inverse = np.unique(ids, return_inverse=True)
    rows = np.empty((len(distinct), dim), dtype=np.float32)
    which = np.searchsorted(starts, distinct, side="right") - 1  # block of each id, ascending
    blocks, firsts = np.unique(which, return_index=True)
    for b, lo, hi in zip(blocks, firsts, [*firsts[1:], len(distinct)]):
        rows[lo:hi] = block_of(int(b))[distinct[lo:hi] - starts[b]]
    return rows[inverse.reshape(-1)]


class BlockStore:
    """The chunk, embedding and neighbour blocks of a database folder, read lazily."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.blocks: list[ChunkBlock] = manifest.chunks.blocks
        self.starts = np.array([b.start for b in self.blocks], dtype=np.int64)
        self._indexed_chunks: int | None = None
        # opened once: re-opening a memory map costs ~0.2 ms, which re-ranking paid per block
        # hit, a term that grew with the number of blocks (see `embeddings_of_ids`)
        self._embedding_maps: dict[int, np.ndarray] = {}

    # -- chunks and documents
    def tokens_of_block(self, block: ChunkBlock) -> np.ndarray:
        return load_block(self.folder / block.file, block.rows, "chunk")

    @property
    def stores_byte_lengths(self) -> bool:
        """Whether the chunk blocks have per-token byte counts beside them (foreign tokenizer)."""
        return self.manifest.stores_byte_lengths

    def byte_counts_of_block(self, block: ChunkBlock) -> np.ndarray:
        """(rows, m) int32 UTF-8 bytes of the source text each token of the block stands for."""
        return load_block(self.folder / str(block.bytes_file), block.rows, "byte count")

    def embeddings_of_block(self, block: ChunkBlock) -> np.ndarray:
        """(rows, dim) float16 embeddings of a block, memory-mapped (opened once per store)."""
        mapped = self._embedding_maps.get(block.index)
        if mapped is None:
            embedded = self.manifest.embeddings.blocks[block.index]
            mapped = load_block(self.folder / embedded.file, block.rows, "embedding")
            self._embedding_maps[block.index] = mapped
        return mapped

    def embeddings_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """The stored embeddings (n, d) float32 of chunk ids (n,), in that order (memory-mapped
        blocks, so only the rows asked for are read)."""
        return gather_rows(
            lambda b: self.embeddings_of_block(self.blocks[b]),
            self.starts,
            ids,
            int(self.manifest.embeddings.dim or 0),
        )

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.folder / TOKENIZER_FILE)

    @cached_property
    def chunk_doc(self) -> np.ndarray:
        """(num_chunks,) int64 chunk -> document index (memory-mapped)."""
        total = sum(b.rows for b in self.blocks)
        path = self.folder / str(self.manifest.chunks.chunk_doc_file)
        return load_block(path, total, "chunk -> document map")

    def documents(self) -> list[dict[str, Any]]:
        """The documents table, in document-index order."""
        path = self.folder / str(self.manifest.chunks.documents_file)
        try:
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f]
        except (OSError, ValueError) as e:
            raise CorruptArtifactError(
                f"cannot read the documents table {path} ({e}); rerun `retrolm db build`"
            ) from None

    @cached_property
    def doc_split(self) -> np.ndarray:
        """(num_documents,) str: the split of each document (train, valid or retrieval)."""
        return np.array([d["split"] for d in self.documents()], dtype=object).astype(str)

    @cached_property
    def doc_is_indexed(self) -> np.ndarray:
        """(num_documents,) bool: whether the index holds the document's chunks.

        The index holds the train and the retrieval-only documents, never the held-out ones.
        """
        return np.isin(self.doc_split, INDEXED_SPLITS)

    def indexed_ids_of_block(self, block: ChunkBlock) -> np.ndarray:
        """Global ids of the chunks of a block that the index holds, ascending."""
        docs = self.chunk_doc[block.start : block.start + block.rows]
        return np.flatnonzero(self.doc_is_indexed[docs]).astype(np.int64) + block.start

    def query_rows_of_block(self, block: ChunkBlock) -> np.ndarray:
        """Rows of a block whose neighbours are stored: all but retrieval-only chunks (which are
        never trained on or scored, so nothing reads their neighbours)."""
        docs = self.chunk_doc[block.start : block.start + block.rows]
        return np.flatnonzero(self.doc_split[docs] != "retrieval").astype(np.int64)

    def indexed_chunks(self) -> int:
        """Number of indexed chunks (counted from the blocks, so right mid-way through an add)."""
        if self._indexed_chunks is None:
            self._indexed_chunks = int(sum(len(self.indexed_ids_of_block(b)) for b in self.blocks))
        return self._indexed_chunks

    def indexed_sample(self, size: int, seed: int, dtype: Any = np.float32) -> np.ndarray:
        """Embeddings of a seeded random sample of `size` indexed chunks, read block by block
        (`dtype` float16: exactly as stored, in half the memory of float32)."""
        from retrolm.database.index import sample_rows

        positions = sample_rows(self.indexed_chunks(), size, seed)  # ranks among indexed chunks
        out = np.empty((len(positions), int(self.manifest.embeddings.dim or 0)), dtype)
        seen = 0
        for block in self.blocks:  # filled in place: no second copy of a 3 GB sample
            ids = self.indexed_ids_of_block(block)
            lo, hi = np.searchsorted(positions, [seen, seen + len(ids)])
            if hi > lo:
                out[lo:hi] = self.embeddings_of_block(block)[
                    ids[positions[lo:hi] - seen] - block.start
                ]
            seen += len(ids)
        return out

    # -- retrieval
    def load_index(self, mmap: bool = False, device: str = "cpu") -> Any:
        """The database's index as searches use it (`searchable`: IVF cells found by torch on
        `device`; compressed codes re-ranked with the stored embeddings), set to the recorded
        search parameters; or its BM25 index."""
        record = self.manifest.index
        if record is None:
            raise CorruptArtifactError(
                f"the database {self.folder} has no index; rerun `retrolm db build`"
            )
        path = self.folder / record.file
        if record.kind == "bm25":
            from retrolm.database.bm25 import BM25Index

            return BM25Index.load(path, mmap=mmap)
        from retrolm.database.index import (
            K_FACTOR,
            RerankedIndex,
            apply_search_params,
            load_index,
            searchable,
        )

        index = load_index(path, mmap=mmap, ondisk=bool(record.ondisk))
        index = searchable(index, device)
        params = record.search_params
        if K_FACTOR in params:  # compressed codes: candidates re-ranked with the embeddings
            index = RerankedIndex(index, self.embeddings_of_ids, params[K_FACTOR])
        apply_search_params(index, params)
        return index
