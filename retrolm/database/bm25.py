"""BM25 sparse retrieval over chunk texts (the `bm25s` package), a drop-in for embeddings + faiss.

Scores are BM25 scores (higher is closer). A chunk that shares no term with the query is not a
hit: it comes back as id -1 with score -inf, as faiss does when it has fewer than k results.
The whole term-document matrix lives in memory (bm25s keeps it as a sparse CSC matrix of a few
bytes per token), so BM25 suits databases of up to a few million chunks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np

from retrolm.database.neighbours import SearchFn
from retrolm.errors import CorruptArtifactError, InputError
from retrolm.io import atomic_dir, read_json, save_npy, write_json

logger = logging.getLogger(__name__)

FORMAT = "retrolm-bm25/1"
# Tokenization: lowercase words of 2+ word characters, English stop words removed (bm25s's).
STOPWORDS = "en"


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class BM25Index:
    """A BM25 index whose hits are global chunk ids.

    Build with `BM25Index.build(texts, ids)`; `search(texts, k)` returns (scores, ids) like
    `retrolm.database.index.search` (scores (n, k) float32, higher is closer; ids int64, -1 where
    fewer than k chunks share a term with the query).
    """

    def __init__(self, retriever: bm25s.BM25, ids: np.ndarray) -> None:
        self.retriever = retriever
        self.ids = np.asarray(ids, dtype=np.int64)  # row of the BM25 matrix -> chunk id

    @property
    def ntotal(self) -> int:
        """Number of indexed chunks."""
        return len(self.ids)

    @classmethod
    def build(cls, texts: Sequence[str], ids: np.ndarray | Sequence[int]) -> BM25Index:
        """Index `texts`, whose chunk ids are `ids` (same length).

        Raises:
            InputError: lengths differ or there is nothing to index.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(texts) != len(ids):
            raise InputError(f"BM25Index.build got {len(texts)} texts but {len(ids)} ids")
        if len(texts) == 0:
            raise InputError("BM25Index.build got no texts: the database has no train chunks")
        retriever = bm25s.BM25()
        retriever.index(_tokenize(texts), show_progress=False)
        return cls(retriever, ids)

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best-scoring chunks of each query text: (scores (n, k) float32, ids (n, k))."""
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        n = len(texts)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        ids = np.full((n, k), -1, dtype=np.int64)
        if n == 0:
            return scores, ids
        kk = min(k, self.ntotal)
        rows, found = self.retriever.retrieve(_tokenize(texts), k=kk, show_progress=False)
        hit = found > 0
        ids[:, :kk] = np.where(hit, self.ids[rows], -1)
        scores[:, :kk] = np.where(hit, found, -np.inf)
        return scores, ids

    def search_fn(self, texts: Sequence[str]) -> SearchFn:
        """A `search_fn(rows, kk)` for `search_excluding_documents` over the given query texts."""

        def search_fn(rows: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            return self.search([texts[i] for i in rows], kk)

        return search_fn

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the index to `folder` atomically (a temporary folder renamed at the end)."""
        with atomic_dir(folder) as tmp:
            self.retriever.save(str(tmp / "bm25s"), show_progress=False)
            save_npy(tmp / "ids.npy", self.ids)
            write_json(tmp / "bm25.json", {"format": FORMAT, "stopwords": STOPWORDS})

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, mmap: bool = False) -> BM25Index:
        """Read an index written by `save`.

        Raises:
            InputError: `folder` does not exist.
            CorruptArtifactError: it is not a complete BM25 index of this format.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"no BM25 index at {folder}: build it first (retrolm db index)")
        try:
            meta = read_json(folder / "bm25.json")
            if meta.get("format") != FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}, expected {FORMAT}")
            ids = np.load(folder / "ids.npy", allow_pickle=False)
            retriever = bm25s.BM25.load(str(folder / "bm25s"), mmap=mmap, show_progress=False)
        except (OSError, ValueError, KeyError) as e:
            raise CorruptArtifactError(
                f"{folder} is not a readable BM25 index ({e}): delete it and rerun "
                "`retrolm db index`"
            ) from None
        if len(ids) != retriever.scores["num_docs"]:
            raise CorruptArtifactError(
                f"{folder}: ids.npy has {len(ids)} entries but the BM25 matrix has "
                f"{retriever.scores['num_docs']} documents: delete it and rerun `retrolm db index`"
            )
        return cls(retriever, ids)
