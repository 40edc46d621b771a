"""`DatabaseConfig`: every setting of a retrieval database, written beside it as `config.json`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from retrolm.config import CHUNK_SIZE
from retrolm.errors import ConfigError

# Settings that change the content of a database, each with the first build stage it decides:
# a rerun or `db add` with a different value is refused (MismatchError naming the setting),
# except in a build whose stage of that setting (and so every later one) has not finished, which
# redoes them. The other settings (batch sizes, device) only change speed.
CONTENT_STAGE = {
    "chunk_size": "chunks",
    "vocab_size": "tokenizer",
    "tokenizer": "tokenizer",
    "valid_fraction": "tokenizer",
    "valid_list": "tokenizer",
    "glob": "tokenizer",
    "text_field": "tokenizer",
    "embedder": "embeddings",
    "dtype": "embeddings",
    "retriever": "embeddings",
    "index": "index",
    "index_memory": "index",
    "index_train_size": "index",
    "tokenizer_train_bytes": "tokenizer",
    "neighbours": "neighbours",
    "block_rows": "chunks",
    "seed": "index",
}
CONTENT_FIELDS = tuple(CONTENT_STAGE)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(value: str | int) -> int:
    """'512M', '4G', '4GiB' or a plain number of bytes -> bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise ConfigError(f"index_memory: cannot read {value!r} as a size; write e.g. 512M or 4G")
    number, unit = match.groups()
    return int(float(number) * 1024 ** ("KMGT".index(unit.upper()) + 1 if unit else 0))


@dataclass
class DatabaseConfig:
    """How a retrieval database is built. The single source of truth for `retrolm db`."""

    # tokens per chunk (m in the paper); neighbours are m-token chunks plus their continuation
    chunk_size: int = CHUNK_SIZE
    # vocabulary of the byte-level BPE tokenizer trained on the train split
    vocab_size: int = 16384
    # a tokenizer.json file or HF tokenizer folder to use instead of training one
    tokenizer: str | None = None
    # fraction of documents (by a hash of their name) put in the `valid` split
    valid_fraction: float = 0.05
    # a file of document names (one per line) that form `valid`; overrides valid_fraction
    valid_list: str | None = None
    # which files of a corpus folder are read (binary files are skipped anyway)
    glob: str = "**/*"
    # JSONL field / Parquet column holding the text
    text_field: str = "text"
    # stop on the first bad input instead of skipping it with a warning
    strict: bool = False
    # at most this many bytes of train text are used to train the tokenizer (its memory grows
    # with the text it sees: about 15 bytes per byte of text)
    tokenizer_train_bytes: int = 64 << 20
    # "dense" (embeddings + faiss) or "bm25" (bm25s, no embeddings)
    retriever: str = "dense"
    # "default" (all-MiniLM-L6-v2), a local sentence-transformers folder, or "bert-mean:PATH"
    embedder: str = "default"
    # chunks per embedding batch
    embed_batch_size: int = 128
    # torch device of the embedder
    device: str = "cpu"
    # compute dtype of the embedder: float32, bfloat16, or auto (bfloat16 where it is measured
    # faster at the start of the embedding stage; the measurement is kept in the manifest)
    embed_dtype: str = "auto"
    # dtype of the stored embeddings: float16 or float32
    dtype: str = "float16"
    # faiss index: "auto" (chosen by size and index_memory) or an index_factory string
    index: str = "auto"
    # memory budget for the faiss index, in bytes
    index_memory: int = 4 << 30
    # at most this many train chunks are sampled to train an approximate index (it takes
    # 64 per IVF cell: 1M at 4M chunks, 4M from 16M; 2 x dim bytes each in memory)
    index_train_size: int = 1 << 22
    # neighbours stored per chunk (training uses the first k)
    neighbours: int = 10
    # chunks per block file (the last block of a run may be shorter)
    block_rows: int = 16384
    # bytes of documents tokenized per parallel batch (peak memory ~40x this)
    tokenize_batch_bytes: int = 1 << 20
    # seed of the index training sample
    seed: int = 0

    def __post_init__(self) -> None:
        self.index_memory = parse_bytes(self.index_memory)
        checks = {
            "chunk_size": self.chunk_size >= 1,
            "vocab_size": self.vocab_size >= 258,
            "valid_fraction": 0.0 <= self.valid_fraction < 1.0,
            "tokenizer_train_bytes": self.tokenizer_train_bytes >= 1,
            "embed_batch_size": self.embed_batch_size >= 1,
            "index_memory": self.index_memory >= 1 << 20,
            "index_train_size": self.index_train_size >= 1,
            "neighbours": self.neighbours >= 1,
            "block_rows": self.block_rows >= 1,
            "tokenize_batch_bytes": self.tokenize_batch_bytes >= 1,
        }
        hints = {
            "chunk_size": "a positive number of tokens",
            "vocab_size": "at least 258 (256 bytes + <pad> + <eos>)",
            "valid_fraction": "in [0, 1)",
            "index_memory": "at least 1M",
        }
        for name, ok in checks.items():
            if not ok:
                hint = hints.get(name, "a positive number")
                raise ConfigError(f"{name} must be {hint}, got {getattr(self, name)!r}")
        choices = {
            "retriever": ("dense", "bm25"),
            "dtype": ("float16", "float32"),
            "embed_dtype": ("auto", "float32", "bfloat16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if not self.index.strip():
            raise ConfigError("index must be 'auto' or a faiss index_factory string, got ''")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatabaseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown database settings: {', '.join(unknown)}")
        return cls(**d)

    def content_settings(self) -> dict[str, Any]:
        """The settings that determine the database's content (compared on resume and add)."""
        return {name: getattr(self, name) for name in CONTENT_FIELDS}
