"""The tokenizer and chunk stages: corpus -> tokenizer.json -> chunk blocks + documents table.

Chunks are written as fixed-size block files `chunks/tokens-NNNNNN.npy` (int32, [rows, m]), each
with the documents whose first chunk lies in it (`chunks/docs-NNNNNN.jsonl`). After every block
the manifest records the block's checksums and a *cursor*: the corpus event to continue from and
how many chunks of that event's document are already written. A resumed run verifies the
blocks, drops every block from the first bad one on, and continues from the last good cursor;
the corpus stream is deterministic, so the result is the same as an uninterrupted run.
Memory is bounded by one tokenization batch plus one block, whatever the corpus size; a
document longer than a batch is tokenized in pieces cut where the byte-level pre-tokenizer splits
anyway (before a space between two non-space characters), so that its ids are those of the whole
text and memory does not depend on line or document length.

With a foreign (Hugging Face) tokenizer, whose tokens' decoded bytes need not be the source's
(SentencePiece "▁", byte fallback, normalizers), each block also gets `chunks/bytes-NNNNNN.npy`
(int32, [rows, m]): the UTF-8 bytes of the source text each token stands for, from the tokens'
offsets (`retrolm.tokenizer.byte_counts`); a document's counts, eos included, add up to its
`byte_length`. The manifest's `tokenizer.byte_lengths` says "stored" then, "table" otherwise
(retrolm's byte-level tokenizer: bytes per token id, `evaluate.token_byte_lengths`).

A document of a source after the first (the retrieval-only inputs of `retrolm db build`, and the
documents of `retrolm db add`) whose chunk tokens equal those of a document already in the
database, or of an earlier document of its source (the same text under another name), is skipped
with a warning and counted as skipped, reason `duplicate`: a copy of a held-out document would
otherwise be retrieved by that document's own chunks, leaking the evaluation text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.corpus import Document, Skipped, assign_split, iter_corpus, read_split_list
from retrolm.database.config import DatabaseConfig
from retrolm.database.manifest import (
    ChunkBlock,
    Cursor,
    Manifest,
    Source,
    TokenizerRecord,
    block_ok,
    save_manifest,
)
from retrolm.errors import InputError
from retrolm.io import allocate, atomic_open, save_npy, sha256_file
from retrolm.log import progress
from retrolm.tokenizer import (
    CONFIG_FILES,
    TOKENIZER_FILE,
    Tokenizer,
    byte_counts,
    split_for_tokenizer,
    train_tokenizer,
)

log = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
CHUNK_DOC_FILE = "chunk_doc.npy"


def block_name(kind: str, index: int, suffix: str = "npy") -> str:
    return f"{kind}-{index:06d}.{suffix}"


def corpus_options(config: DatabaseConfig) -> dict[str, Any]:
    return {"glob": config.glob, "text_field": config.text_field, "strict": config.strict}


def valid_names(config: DatabaseConfig) -> frozenset[str] | None:
    return read_split_list(config.valid_list) if config.valid_list else None


# ----------------------------------------------------------------------------- tokenizer stage


def run_tokenizer(
    folder: Path, manifest: Manifest, config: DatabaseConfig, show_progress: bool = True
) -> Tokenizer:
    """Train (on the train split of the first source) or copy the tokenizer into the database."""
    path = folder / TOKENIZER_FILE
    recorded = manifest.tokenizer
    if (
        manifest.is_done("tokenizer")
        and recorded
        and block_ok(folder, TOKENIZER_FILE, recorded.file_sha256)
        and (
            not recorded.config_file
            or block_ok(folder, recorded.config_file, recorded.config_sha256)
        )
    ):
        return Tokenizer.load(path)
    if config.tokenizer:
        tokenizer = Tokenizer.load(config.tokenizer)
        log.info("using the tokenizer %s (vocabulary %d)", config.tokenizer, tokenizer.vocab_size)
    else:
        source = manifest.sources[0]
        texts = _train_texts(source.inputs, config)
        log.info(
            "training a byte-level BPE tokenizer (vocabulary %d) on the train split",
            config.vocab_size,
        )
        tokenizer = train_tokenizer(texts, config.vocab_size, show_progress=show_progress)
        if texts.documents == 0:
            raise InputError(
                _no_documents_message(source.inputs, texts.skipped, train=texts.valid > 0)
            )
    tokenizer.save(path)
    record = TokenizerRecord(
        file=TOKENIZER_FILE,
        file_sha256=sha256_file(path),
        sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        **tokenizer.special_tokens(),  # kind, pad_id, eos_id, bos_id (foreign: their strings)
        decode_exact=tokenizer.decode_exact,
        byte_lengths="table" if tokenizer.kind == "retrolm" else "stored",
    )
    if tokenizer.kind == "foreign":  # its special tokens, written beside tokenizer.json
        record.config_file = CONFIG_FILES[0]
        record.config_sha256 = sha256_file(folder / CONFIG_FILES[0])
    if not config.tokenizer and tokenizer.vocab_size < config.vocab_size:
        # BPE stops when the text offers no more pairs to merge
        log.warning(
            "the tokenizer has a vocabulary of %d, not the %d asked for (--vocab-size): the "
            "train text has no more pairs of tokens to merge",
            tokenizer.vocab_size,
            config.vocab_size,
        )
        record.requested_vocab_size = config.vocab_size
    manifest.tokenizer = record
    manifest.finish_stage("tokenizer")
    save_manifest(folder, manifest)
    return tokenizer


class _train_texts:
    """The texts of train documents, up to `tokenizer_train_bytes`, counted as they pass."""

    def __init__(self, inputs: list[str], config: DatabaseConfig) -> None:
        self.inputs, self.config = inputs, config
        self.documents = self.valid = 0
        self.skipped: dict[str, int] = {}

    def __iter__(self) -> Iterator[str]:
        names = valid_names(self.config)
        used = 0
        for _, item in iter_corpus(self.inputs, warn=False, **corpus_options(self.config)):
            if isinstance(item, Skipped):
                self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
                continue
            if assign_split(item.name, self.config.valid_fraction, names) != "train":
                self.valid += 1
                continue
            self.documents += 1
            yield item.text
            used += len(item.text)
            if used >= self.config.tokenizer_train_bytes:
                return


def _no_documents_message(inputs: list[str], skipped: dict[str, int], train: bool = False) -> str:
    where = ", ".join(inputs)
    if train:
        return (
            f"the corpus {where} has no document in the train split; lower --valid-fraction or "
            "shorten the split list"
        )
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "no input files"
    return (
        f"the corpus {where} yielded no documents ({detail}); give folders or files of UTF-8 "
        "text, .jsonl or .parquet (with --text-field naming the text)"
    )


# ----------------------------------------------------------------------------- chunk stage


def chunk_document(
    ids: list[int] | np.ndarray, eos_id: int, pad_id: int, chunk_size: int
) -> np.ndarray:
    """A document's tokens + eos, cut into rows of `chunk_size`, the last row padded. (c, m) int32."""
    stream = np.concatenate([np.asarray(ids, dtype=np.int32), np.asarray([eos_id], np.int32)])
    rows = -(-stream.size // chunk_size)
    out = np.full(rows * chunk_size, pad_id, dtype=np.int32)
    out[: stream.size] = stream
    return out.reshape(rows, chunk_size)


def chunk_byte_counts(counts: np.ndarray, byte_length: int, chunk_size: int) -> np.ndarray:
    """A document's per-token byte counts laid out as `chunk_document` lays out its ids: the
    eos counts what no token covers (usually 0), padding 0. (c, m) int32."""
    stream = np.concatenate([counts, [byte_length - int(counts.sum())]]).astype(np.int32)
    rows = -(-stream.size // chunk_size)
    out = np.zeros(rows * chunk_size, dtype=np.int32)
    out[: stream.size] = stream
    return out.reshape(rows, chunk_size)


class _BlockWriter:
    """Collects chunk rows and document records; writes a block each time `block_rows` fill."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        config: DatabaseConfig,
        cursor: Cursor,
        group: int,
    ) -> None:
        self.folder, self.manifest, self.config = folder, manifest, config
        self.cursor, self.group = cursor, group
        self.rows: list[np.ndarray] = []
        self.byte_rows: list[np.ndarray] = []  # with stored byte counts: parallel to `rows`
        self.count = 0
        self.records: list[dict[str, Any]] = []
        (folder / "chunks").mkdir(exist_ok=True)

    def add(
        self,
        event: int,
        rows: np.ndarray,
        start: int,
        split: str,
        record: dict[str, Any] | None,
        byte_rows: np.ndarray | None = None,
    ) -> None:
        """Append rows[start:] of the document at `event` (its record when it starts here), and
        its per-token byte counts `byte_rows` (shaped as `rows`) where the database stores them."""
        if record is not None:
            self.records.append(record)
        position = start
        while position < len(rows):
            take = min(len(rows) - position, self.config.block_rows - self.count)
            self.rows.append(rows[position : position + take])
            if byte_rows is not None:
                self.byte_rows.append(byte_rows[position : position + take])
            self.count += take
            position += take
            self.cursor.chunks += take
            if split == "train":
                self.cursor.train_chunks += take
            elif split == "retrieval":
                self.cursor.retrieval_chunks += take
            if self.count == self.config.block_rows:
                done = position == len(rows)
                self.cursor.event, self.cursor.offset = (
                    (event + 1, 0) if done else (event, position)
                )
                self.flush()

    def flush(self) -> None:
        if self.count == 0:
            return
        index = len(self.manifest.chunks.blocks)
        tokens = np.concatenate(self.rows)
        tokens_file = f"chunks/{block_name('tokens', index)}"
        docs_file = f"chunks/{block_name('docs', index, 'jsonl')}"
        tokens_sha = save_npy(self.folder / tokens_file, tokens)
        with atomic_open(self.folder / docs_file, "w", encoding="utf-8") as f:
            for record in self.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        block = ChunkBlock(
            index=index,
            group=self.group,
            start=self.cursor.chunks - self.count,
            rows=self.count,
            file=tokens_file,
            sha256=tokens_sha,
            docs_file=docs_file,
            docs_sha256=sha256_file(self.folder / docs_file),
            cursor=self.cursor.copy(),
        )
        if self.manifest.stores_byte_lengths:
            block.bytes_file = f"chunks/{block_name('bytes', index)}"
            counts = np.concatenate(self.byte_rows)  # (rows, m) int32
            assert counts.shape == tokens.shape, "byte counts must be added with every row"
            block.bytes_sha256 = save_npy(self.folder / block.bytes_file, counts)
        self.manifest.add_chunk_block(block)
        save_manifest(self.folder, self.manifest)
        self.rows, self.byte_rows, self.count, self.records = [], [], 0, []


def verify_chunk_blocks(folder: Path, manifest: Manifest) -> int:
    """Drop every chunk block from the first missing or corrupted one on. Returns blocks kept."""
    blocks = manifest.chunks.blocks
    for i, block in enumerate(blocks):
        if not all(block_ok(folder, file, sha256) for file, sha256 in block.files()):
            log.warning(
                "chunk block %d (%s) is missing or corrupted; rebuilding from there",
                i,
                block.file,
            )
            manifest.drop_chunk_blocks(i)
            save_manifest(folder, manifest)
            return i
    return len(blocks)


def run_chunks(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    tokenizer: Tokenizer,
    show_progress: bool = True,
    *,
    skip_duplicates: bool = True,
) -> None:
    """Tokenize and chunk every source not yet done, resuming at the last finished block.

    With `skip_duplicates` (always, but in tests of databases built without the rule), a
    document of a source after the first whose chunks equal those of a document already written
    is skipped with a warning and counted (reason `duplicate`), whichever command resumes the
    source.
    """
    verify_chunk_blocks(folder, manifest)
    names = valid_names(config)
    known: dict[str, str] | None = None
    for group, source in enumerate(manifest.sources):
        if source.done:
            continue
        if skip_duplicates and group and known is None:  # read once, only when needed
            known = document_digests(folder, manifest)
        cursor = manifest.resume_cursor(group)
        writer = _BlockWriter(folder, manifest, config, cursor, group)
        end_event = _chunk_source(
            source, writer, config, tokenizer, names, show_progress, known if group else None
        )
        writer.cursor.event, writer.cursor.offset = end_event, 0
        writer.flush()
        source.finish(writer.cursor)
        save_manifest(folder, manifest)
        if group:
            previous = manifest.sources[group - 1].end_cursor
            before = previous.skipped.get("duplicate", 0) if previous else 0
            duplicates = writer.cursor.skipped.get("duplicate", 0) - before
            if duplicates:
                log.warning(
                    "%d document(s) of %s skipped: each has the text of a document already in "
                    "the database (counted as skipped, 'duplicate')",
                    duplicates,
                    name_inputs(source.inputs),
                )
    if not (manifest.is_done("chunks") and _tables_ok(folder, manifest)):
        _finish_chunks(folder, manifest, config)


def name_inputs(inputs: list[str], most: int = 3) -> str:
    """The inputs of a source for a log line: all of a few, else the first and how many more."""
    if len(inputs) <= most:
        return " ".join(inputs)
    return f"{' '.join(inputs[:most])} and {len(inputs) - most} more inputs"


def _tables_ok(folder: Path, manifest: Manifest) -> bool:
    chunks = manifest.chunks
    return bool(chunks.documents_file) and all(
        block_ok(folder, file, sha256) for file, sha256 in chunks.tables()
    )


def _chunk_source(
    source: Source,
    writer: _BlockWriter,
    config: DatabaseConfig,
    tokenizer: Tokenizer,
    names: frozenset[str] | None,
    show_progress: bool,
    known: dict[str, str] | None = None,
) -> int:
    """Stream one source through the writer. Returns the global event after its last one.

    `known`: the documents already written, by `rows_digest` (their names as values); a
    document among them is skipped with a warning.
    """
    base = source.first_event
    cursor = writer.cursor
    stream = iter_corpus(source.inputs, start_event=cursor.event - base, **corpus_options(config))
    end = cursor.event
    resume_event, resume_offset = cursor.event, cursor.offset
    bar = progress(desc="chunking", unit="doc", show=show_progress)
    max_bytes = config.tokenize_batch_bytes
    with_bytes = writer.manifest.stores_byte_lengths
    for batch in _batches(stream, max_bytes):
        documents = [item for _, item in batch if isinstance(item, Document)]
        texts = [d.text for d in documents]
        encoded = iter(encode_documents(tokenizer, texts, max_bytes, with_bytes=with_bytes))
        for local_event, item in batch:
            event = base + local_event
            end = event + 1
            if isinstance(item, Skipped):
                cursor.skipped[item.reason] = cursor.skipped.get(item.reason, 0) + 1
                continue
            ids, counts = next(encoded) if with_bytes else (next(encoded), None)
            rows = chunk_document(ids, tokenizer.eos_id, tokenizer.pad_id, config.chunk_size)
            byte_rows = (
                None
                if counts is None
                else chunk_byte_counts(counts, item.byte_length, config.chunk_size)
            )
            split = (
                "retrieval"
                if source.retrieval_only
                else assign_split(item.name, config.valid_fraction, names)
            )
            resuming = event == resume_event and resume_offset > 0
            if known is not None:
                digest = rows_digest(rows)
                if digest in known and not resuming:
                    cursor.skipped["duplicate"] = cursor.skipped.get("duplicate", 0) + 1
                    log.warning(
                        "skipping %s: duplicate (the same text as %s, already in the database)",
                        item.name,
                        known[digest],
                    )
                    continue
                known.setdefault(digest, item.name)
            record = None
            if not resuming:
                record = _record(item, cursor, len(rows), split)
                cursor.documents += 1
                cursor.bytes += record["byte_length"]
            writer.add(event, rows, resume_offset if resuming else 0, split, record, byte_rows)
            bar.update(1)
    bar.close()
    return end


def rows_digest(rows: np.ndarray) -> str:
    """sha256 of a document's chunk rows (int32): equal for equal texts, whatever the name."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int32).tobytes()).hexdigest()


def document_digests(folder: Path, manifest: Manifest) -> dict[str, str]:
    """`rows_digest` -> name of every document whose chunks are all in the written blocks (the
    first such document's name where several have the same chunks)."""
    blocks = manifest.chunks.blocks
    ends = np.asarray([b.start + b.rows for b in blocks], dtype=np.int64)
    arrays: dict[int, np.ndarray] = {}

    def rows(first: int, count: int) -> np.ndarray:
        parts, position = [], first
        while position < first + count:
            i = int(np.searchsorted(ends, position, side="right"))
            if i not in arrays:
                arrays[i] = np.load(folder / blocks[i].file, mmap_mode="r")
            take = min(first + count, int(ends[i])) - position
            offset = position - blocks[i].start
            parts.append(arrays[i][offset : offset + take])
            position += take
        return np.concatenate(parts)

    digests: dict[str, str] = {}
    written = int(ends[-1]) if len(ends) else 0
    for block in blocks:
        with open(folder / block.docs_file, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record["first_chunk"] + record["num_chunks"] <= written:
                    digest = rows_digest(rows(record["first_chunk"], record["num_chunks"]))
                    digests.setdefault(digest, record["name"])
    return digests


def documents_not_in(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    tokenizer: Tokenizer,
    inputs: list[str],
) -> list[str]:
    """Names of the documents `inputs` yield whose chunks are those of no document of the
    database (new or changed since they were added)."""
    known = document_digests(folder, manifest)
    stream = iter_corpus(inputs, warn=False, **corpus_options(config))
    missing = []
    for batch in _batches(stream, config.tokenize_batch_bytes):
        documents = [item for _, item in batch if isinstance(item, Document)]
        encoded = encode_documents(
            tokenizer, [d.text for d in documents], config.tokenize_batch_bytes
        )
        for document, ids in zip(documents, encoded):
            rows = chunk_document(ids, tokenizer.eos_id, tokenizer.pad_id, config.chunk_size)
            if rows_digest(rows) not in known:
                missing.append(document.name)
    return missing


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], max_bytes: int, *, with_bytes: bool = False
) -> list[np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int32 arrays) of `texts`, tokenized in batches of about `max_bytes` of text,
    long texts in pieces (`split_for_tokenizer`): memory is bounded by `max_bytes`.

    Args:
        with_bytes: return (ids, byte counts) per text instead: the UTF-8 bytes of the text each
            token stands for (`retrolm.tokenizer.byte_counts`, from the tokens' offsets).
    """
    piece_chars = max(4096, max_bytes)
    pieces: list[tuple[int, int, str, bool]] = []  # (text, offset, piece encoded, space dropped)
    for i, text in enumerate(texts):
        start = 0
        for n, piece in enumerate(split_for_tokenizer(text, piece_chars)):
            drop = n > 0 and tokenizer.piece_drops_space and piece.startswith(" ")
            pieces.append((i, start + drop, piece[1:] if drop else piece, drop))
            start += len(piece)
    marker = tokenizer.hf.token_to_id("▁")
    ids: list[list[np.ndarray]] = [[] for _ in texts]
    ends: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[tuple[int, int, str, bool]] = []
    size = 0
    for n, entry in enumerate(pieces):
        batch.append(entry)
        size += len(entry[2])
        if size >= max_bytes or n == len(pieces) - 1:
            if with_bytes:
                encoded = tokenizer.encode_batch_with_ends([p for _, _, p, _ in batch])
            else:
                encoded = [(e, []) for e in tokenizer.encode_batch([p for _, _, p, _ in batch])]
            for (i, offset, _, drop), (piece_ids, piece_ends) in zip(batch, encoded):
                ids[i].append(np.asarray(piece_ids, dtype=np.int32))
                piece_ends = offset + np.asarray(piece_ends, dtype=np.int64)
                if with_bytes and drop and piece_ids and piece_ids[0] == marker:
                    piece_ends[0] = offset  # this "▁" stands for the dropped space: ends there
                ends[i].append(piece_ends)
            batch, size = [], 0
    joined = [np.concatenate(parts) if parts else np.zeros(0, np.int32) for parts in ids]
    if not with_bytes:
        return joined
    return [
        (token_ids, byte_counts(text, np.concatenate(e) if e else np.zeros(0, np.int64)))
        for token_ids, text, e in zip(joined, texts, ends)
    ]


def _record(doc: Document, cursor: Cursor, num_chunks: int, split: str) -> dict[str, Any]:
    return {
        "index": cursor.documents,
        "id": doc.id,
        "name": doc.name,
        "byte_length": doc.byte_length,
        "first_chunk": cursor.chunks,
        "num_chunks": num_chunks,
        "split": split,
    }


def _batches(
    stream: Iterator[tuple[int, Document | Skipped]], max_bytes: int
) -> Iterator[list[tuple[int, Document | Skipped]]]:
    batch: list[tuple[int, Document | Skipped]] = []
    size = 0
    for event, item in stream:
        batch.append((event, item))
        if isinstance(item, Document):
            size += len(item.text)
        if size >= max_bytes or len(batch) >= 4096:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _finish_chunks(folder: Path, manifest: Manifest, config: DatabaseConfig) -> None:
    """Write the documents table and the chunk -> document map; record counts."""
    sources = manifest.sources
    end = manifest.end_cursor()
    if end.documents == 0:
        inputs = [p for s in sources for p in s.inputs]
        raise InputError(_no_documents_message(inputs, end.skipped))
    blocks = manifest.chunks.blocks
    doc_path = folder / CHUNK_DOC_FILE
    with atomic_open(folder / DOCUMENTS_FILE, "w", encoding="utf-8") as table:
        tmp_map = doc_path.with_name(doc_path.name + ".tmp-build")
        # streamed: the memory-mapped map is filled block by block, never held in memory
        mapping = np.lib.format.open_memmap(tmp_map, mode="w+", dtype=np.int64, shape=(end.chunks,))
        allocate(tmp_map)  # a full disk is an error here, not a SIGBUS while the map is filled
        for block in blocks:
            with open(folder / block.docs_file, encoding="utf-8") as f:
                for line in f:
                    table.write(line)
                    record = json.loads(line)
                    first = record["first_chunk"]
                    mapping[first : first + record["num_chunks"]] = record["index"]
        mapping.flush()
        del mapping
    tmp_map.replace(doc_path)
    manifest.chunks.set_tables(
        DOCUMENTS_FILE, sha256_file(folder / DOCUMENTS_FILE), CHUNK_DOC_FILE, sha256_file(doc_path)
    )
    manifest.finish_chunks(end)
    save_manifest(folder, manifest)
    log.info(
        "chunks: %d documents, %d chunks (%d train, %d retrieval-only), %d inputs skipped",
        end.documents,
        end.chunks,
        end.train_chunks,
        end.retrieval_chunks,
        sum(end.skipped.values()),
    )
