"""`Database`: a finished retrieval database, opened read-only for training, evaluation and search."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.corpus import SPLITS
from retrolm.database.config import DatabaseConfig
from retrolm.database.manifest import CONFIG_FILE, IndexRecord, Manifest, load_manifest
from retrolm.database.store import BlockStore, load_block
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.io import read_json, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DocumentRecord:
    """One row of the documents table."""

    index: int  # position in the table; the value of `chunk_doc` for its chunks
    id: str  # stable id: a hash of the name
    name: str  # source name (path, or FILE:LINE for JSONL / Parquet records)
    byte_length: int  # UTF-8 bytes of the text
    first_chunk: (
        int  # id of its first chunk; its chunks are first_chunk .. first_chunk+num_chunks-1
    )
    num_chunks: int
    split: str  # "train", "valid", or "retrieval" (indexed only: never trained on or scored)


def nearer(metric: str) -> str:
    """Which scores are nearer under an index metric: "lower" for l2 (a squared distance),
    "higher" for ip (an inner product) and bm25 (a BM25 score)."""
    return "lower" if metric == "l2" else "higher"


@dataclass(frozen=True)
class SearchHit:
    """One result of `Database.search`."""

    chunk_id: int
    document_name: str
    score: float  # as the index ranks: l2 a squared distance, ip / bm25 a similarity (`nearer`)
    text: str


class Database:
    """A retrieval database folder built by `build_database`.

    Attributes:
        path: the folder.
        config: the `DatabaseConfig` it was built with.
        manifest: the database's `Manifest` (manifest.json).
        tokenizer: the database's `Tokenizer`.
        chunk_size: m, tokens per chunk.
        pad_id: padding token id.
        num_chunks: number of chunks.
        documents: the documents table (`DocumentRecord`s, by index).
        chunk_doc: (num_chunks,) int64 chunk -> document index (memory-mapped).
        stored_neighbours: K, neighbours stored per chunk.
        metric: the index's metric ("l2", "ip" or "bm25"; `nearer` says which scores are nearer).
    """

    def __init__(self, path: Path, manifest: Manifest, *, mmap_index: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.mmap_index = mmap_index
        self.config = DatabaseConfig.from_dict(read_json(path / CONFIG_FILE))
        self._store = BlockStore(path, manifest)
        self.tokenizer = self._store.tokenizer
        self.chunk_size = int(manifest.settings["chunk_size"])
        self.pad_id = self.tokenizer.pad_id
        self.num_chunks = int(manifest.counts.chunks)
        self.stored_neighbours = int(manifest.neighbours.k)
        assert manifest.index is not None  # a database opens only when every stage is done
        self.metric = str(manifest.index.metric)
        self.documents = [DocumentRecord(**d) for d in self._store.documents()]
        self.chunk_doc = self._store.chunk_doc
        blocks = manifest.chunks.blocks
        self._starts = self._store.starts
        self._tokens = [self._store.tokens_of_block(b) for b in blocks]
        self._byte_counts = (
            [self._store.byte_counts_of_block(b) for b in blocks]
            if self._store.stores_byte_lengths
            else None
        )
        nb = manifest.neighbours.blocks
        self._neighbour_ids = [
            load_block(path / nb[b.index].ids_file, b.rows, "neighbour") for b in blocks
        ]
        self._neighbour_dists = [
            load_block(path / nb[b.index].dists_file, b.rows, "neighbour") for b in blocks
        ]
        self._doc_split = np.array([SPLITS.index(d.split) for d in self.documents], dtype=np.int8)
        self._index: Any = None
        self._embedder: Any = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap_index: bool = True,
        expect: dict[str, Any] | None = None,
        verify: bool = False,
    ) -> Database:
        """Open a finished database.

        Args:
            path: the database folder.
            mmap_index: memory-map the faiss index when it is first used.
            expect: settings the caller relies on, e.g. {"chunk_size": 64, "tokenizer_sha256": ...,
                "embedder": "default"}; any difference is refused.
            verify: check every block's sha256 (reads the whole database) instead of only its size.

        Raises:
            InputError: not a database, or an unfinished one.
            CorruptArtifactError: unknown format, missing / truncated / corrupted files.
            MismatchError: a setting differs from `expect`.
        """
        folder = Path(path)
        manifest = load_manifest(folder)
        unfinished = manifest.unfinished()
        if unfinished:
            raise InputError(
                f"the database {folder} is unfinished (stages not done: {', '.join(unfinished)}); "
                "rerun the `retrolm db build` (or `db add`) command that was interrupted"
            )
        if verify:
            _verify(folder, manifest)
        db = cls(folder, manifest, mmap_index=mmap_index)
        if manifest.tokenizer is None or db.tokenizer.sha256 != manifest.tokenizer.sha256:
            raise CorruptArtifactError(
                f"{folder}/tokenizer.json does not match the manifest; rebuild the database"
            )
        if expect:
            db.check(expect)
        return db

    def settings(self) -> dict[str, Any]:
        """Settings a consumer may check: the content settings plus the tokenizer hash."""
        return {
            **self.manifest.settings,
            "tokenizer_sha256": self.tokenizer.sha256,
            "embedder_spec": self.manifest.embeddings.spec,
        }

    def check(self, expect: dict[str, Any]) -> None:
        """Raise MismatchError naming every setting of `expect` that differs from this database."""
        have = self.settings()
        unknown = sorted(set(expect) - set(have))
        if unknown:
            raise ValueError(f"unknown database settings to check: {', '.join(unknown)}")
        differing = [k for k in expect if have[k] != expect[k]]
        if differing:
            detail = "; ".join(
                f"{k}: database has {have[k]!r}, expected {expect[k]!r}" for k in differing
            )
            raise MismatchError(
                f"the database {self.path} does not match ({detail}); use a database built with these settings"
            )

    def __getstate__(self) -> dict[str, Any]:  # worker processes reopen the memory maps
        return {"path": str(self.path), "mmap_index": self.mmap_index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = Database.open(state["path"], mmap_index=state["mmap_index"])
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r}, documents={len(self.documents)}, chunks={self.num_chunks})"

    # ------------------------------------------------------------------ chunks
    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_chunks):
            raise InputError(
                f"chunk ids must be in 0..{self.num_chunks - 1}; got {ids.min()}..{ids.max()}"
            )
        return ids

    def _gather(self, blocks: list[np.ndarray], ids: np.ndarray, dtype: Any) -> np.ndarray:
        flat = ids.reshape(-1)
        width = blocks[0].shape[1:] if blocks else ()
        out = np.empty((flat.size, *width), dtype=dtype)
        which = np.searchsorted(self._starts, flat, side="right") - 1
        for b in np.unique(which):
            sel = which == b
            out[sel] = blocks[b][flat[sel] - self._starts[b]]
        return out.reshape(*ids.shape, *width)

    def chunk_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Tokens of the chunks `ids` (any shape) -> (*ids.shape, m) int64."""
        return self._gather(self._tokens, self._check_ids(ids), np.int64)

    def chunk_byte_lengths(self, ids: np.ndarray) -> np.ndarray | None:
        """UTF-8 bytes of the source text each token of the chunks `ids` stands for ->
        (*ids.shape, m) int64, where the database stores them (built with a foreign tokenizer);
        None where bytes per token id are exact (`evaluate.token_byte_lengths`)."""
        if self._byte_counts is None:
            return None
        return self._gather(self._byte_counts, self._check_ids(ids), np.int64)

    def chunk_text(self, chunk_id: int) -> str:
        """The decoded text of one chunk (pad and eos dropped)."""
        return self.tokenizer.decode(self.chunk_tokens(np.array([chunk_id]))[0])

    def split_chunk_ids(self, split: str) -> np.ndarray:
        """Ids of the chunks of documents in `split` ("train", "valid" or "retrieval"), ascending."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        wanted = SPLITS.index(split)
        return np.flatnonzero(self._doc_split[self.chunk_doc] == wanted).astype(np.int64)

    # ------------------------------------------------------------------ neighbours
    def neighbours(self, chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Precomputed neighbours of `chunk_ids` (n,) -> (ids (n, K) int64, dists (n, K) float32).

        Neighbours are indexed chunks (train or retrieval-only) of other documents than the
        chunk's own, nearest first;
        -1 (and an infinite distance) where fewer than K exist.
        """
        ids = self._check_ids(chunk_ids)
        return self._gather(self._neighbour_ids, ids, np.int64), self._gather(
            self._neighbour_dists, ids, np.float32
        )

    def neighbour_tokens(self, neighbour_ids: np.ndarray) -> np.ndarray:
        """(..., k) neighbour ids -> (..., k, 2m) int64: the chunk, then its continuation.

        The continuation is the next chunk of the same document, or all pad where the document
        ended; an id of -1 gives all pad.
        """
        ids = np.asarray(neighbour_ids, dtype=np.int64)
        m = self.chunk_size
        out = np.full((*ids.shape, 2 * m), self.pad_id, dtype=np.int64)
        present = ids >= 0
        chunk = ids[present]
        out[present, :m] = self.chunk_tokens(chunk)
        following = chunk + 1
        has_next = following < self.num_chunks
        has_next[has_next] = self.chunk_doc[following[has_next]] == self.chunk_doc[chunk[has_next]]
        continuation = np.full((chunk.size, m), self.pad_id, dtype=np.int64)
        continuation[has_next] = self.chunk_tokens(following[has_next])
        out[present, m:] = continuation
        return out

    # ------------------------------------------------------------------ live search
    @property
    def index(self) -> Any:
        """The faiss index (or BM25 index), loaded on first use."""
        if self._index is None:
            self._index = self._store.load_index(mmap=self.mmap_index)  # cells on the CPU
        return self._index

    @property
    def embedder(self) -> Any:
        """The database's embedder, loaded on first use (dense databases only)."""
        if self._embedder is None:
            from retrolm.database.embed import load_embedder

            self._embedder = load_embedder(
                self.config.embedder, device=self.config.device, dtype=self._embed_dtype()
            )
            if self._embedder.spec != self.manifest.embeddings.spec:
                raise MismatchError(
                    f"the embedder {self._embedder.spec!r} is not the one the database {self.path} was "
                    f"built with ({self.manifest.embeddings.spec!r})"
                )
        return self._embedder

    def _embed_dtype(self) -> str:
        """The compute dtype for queries: the setting, or what `auto` chose for the build."""
        return self.manifest.embeddings.compute_dtype(self.config.embed_dtype)

    def set_embedder(self, embedder: Any) -> None:
        """Use an already loaded embedder (it must have the database's spec)."""
        if embedder.spec != self.manifest.embeddings.spec:
            raise MismatchError(
                f"embedder {embedder.spec!r} differs from the database's {self.manifest.embeddings.spec!r}"
            )
        self._embedder = embedder

    def _search_texts(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._index_record.kind == "bm25":
            dists, ids = self.index.search(texts, k)
        else:
            from retrolm.database.index import search

            vectors = self.embedder.embed(texts, batch_size=self.config.embed_batch_size)
            dists, ids = search(self.index, np.asarray(vectors, dtype=np.float32), k)
        return np.asarray(ids, dtype=np.int64), np.asarray(dists, dtype=np.float32)

    def search_chunks(self, chunk_tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest train chunks of token chunks (B, m) -> (ids (B, k) int64, dists (B, k) float32)."""
        tokens = np.asarray(chunk_tokens)
        if tokens.ndim != 2:
            raise InputError(f"chunk_tokens must have shape (B, m), got {tokens.shape}")
        return self._search_texts(self.tokenizer.decode_batch(tokens.tolist()), k)

    def neighbours_for(self, chunk_tokens: Any, k: int) -> np.ndarray:
        """Neighbour + continuation tokens for (m,) or (B, m) chunk tokens -> (k, 2m) or (B, k, 2m).

        Accepts numpy arrays or torch tensors; returns int64 numpy (wrap with torch.from_numpy).
        """
        tokens = np.asarray(chunk_tokens.cpu() if hasattr(chunk_tokens, "cpu") else chunk_tokens)
        single = tokens.ndim == 1
        ids, _ = self.search_chunks(tokens[None] if single else tokens, k)
        out = self.neighbour_tokens(ids)
        return out[0] if single else out

    def search(self, texts: str | list[str], k: int = 5) -> list[list[SearchHit]]:
        """The k nearest chunks of each text, with their document names, scores and text
        (at most as many as the index holds, whatever `k`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if k >= 1:
            k = min(k, max(1, int(self._index_record.ntotal)))
        ids, dists = self._search_texts(texts, k)
        return [
            [
                SearchHit(
                    int(i),
                    self.documents[int(self.chunk_doc[i])].name,
                    float(d),
                    self.chunk_text(int(i)),
                )
                for i, d in zip(row_ids, row_dists)
                if i >= 0
            ]
            for row_ids, row_dists in zip(ids, dists)
        ]

    @property
    def _index_record(self) -> IndexRecord:
        if self.manifest.index is None:  # Database.open refuses a database without one
            raise InputError(f"the database {self.path} has no index")
        return self.manifest.index

    # ------------------------------------------------------------------ inspection
    def info(self) -> dict[str, Any]:
        """Settings, counts, sizes on disk and stages (what `retrolm db info` shows)."""
        return database_info(self.path)


def database_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `retrolm db info` shows, from the manifest alone (works on an unfinished build)."""
    folder = Path(path)
    manifest = load_manifest(folder)
    sizes: dict[str, int] = {}
    for entry in sorted(folder.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    index = manifest.index.to_json() if manifest.index else {}
    blocks = manifest.chunks.blocks
    counts = manifest.counts.to_json()
    if not manifest.is_done("chunks"):  # mid-build: what the finished blocks hold so far
        last = blocks[-1].cursor if blocks else None
        counts = {
            **counts,
            "documents": last.documents if last else 0,
            "chunks": last.chunks if last else 0,
        }
    keys = ("kind", "factory", "metric", "search_params", "ntotal", "ondisk")
    embeddings = manifest.embeddings
    return {
        "path": str(folder),
        "format_version": manifest.format_version,
        "settings": manifest.settings,
        "fingerprint": manifest.fingerprint,
        "tokenizer": manifest.tokenizer.to_json() if manifest.tokenizer else None,
        "embedder": {"spec": embeddings.spec, "dim": embeddings.dim, "metric": embeddings.metric},
        "index": {k: index.get(k) for k in keys},
        "counts": {**counts, "blocks": len(blocks)},
        "sources": [s.inputs for s in manifest.sources],
        "stages": manifest.stages,
        "bytes_on_disk": {"total": sum(sizes.values()), **sizes},
    }


def _verify(folder: Path, manifest: Manifest) -> None:
    """Check every recorded file's sha256."""
    chunks = manifest.chunks
    pairs = list(chunks.tables())
    for b in chunks.blocks:
        pairs += b.files()
    for embedded in manifest.embeddings.blocks.values():
        pairs.append((embedded.file, embedded.sha256))
    for neighbours in manifest.neighbours.blocks.values():
        pairs += neighbours.files()
    if manifest.index and manifest.index.sha256:
        pairs.append((manifest.index.file, manifest.index.sha256))
    for file, sha in pairs:
        path = folder / str(file)
        if not path.is_file() or sha256_file(path) != sha:
            raise CorruptArtifactError(
                f"{path} is missing or corrupted; rerun `retrolm db build` with the same settings to rebuild it"
            )
