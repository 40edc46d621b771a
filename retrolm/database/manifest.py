"""The database manifest (`manifest.json`): format, settings, counts, block files, stages.

The manifest is rewritten atomically after every finished block, so it always describes files
that are complete on disk. A block file that exists but is not in the manifest (a process was
killed between writing the block and the manifest) is simply written again on resume.

In memory the manifest is a `Manifest`: one dataclass per part of the file, each read with
`from_json` and written with `to_json`, and methods for what the stages do to it. The file
format is the JSON those methods read and write:

    format, format_version
    settings              the content settings (`DatabaseConfig.content_settings`)
    fingerprint           sha256 of the settings
    stages                {stage: done} for every stage of `STAGES`
    tokenizer             `TokenizerRecord`, or null before the tokenizer stage
    sources               [`Source`]: the inputs of the build, then of each `db add`
    counts                `Counts`: documents, chunks, bytes, skipped inputs
    chunks                `ChunksRecord`: the chunk blocks ([`ChunkBlock`]) and the tables
    embeddings            `EmbeddingsRecord`: the embedder and its blocks ({id: `BlockFile`})
    index                 `IndexRecord`, or null before the index stage
    neighbours            `NeighboursRecord`: k and the blocks ({id: `NeighbourBlock`})
    index_build           `IndexPlan` while an index is being built (absent otherwise)

Keys are written in the order the stages add them, so a manifest reads back and writes again
byte for byte. Keys this version does not know (written by another one) are kept and written
after the known ones of their object; a known key the file lacks (a database built before the
key was added) is not written back until it is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from retrolm.database.config import DatabaseConfig
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FORMAT = "retrolm-database"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
STAGES = ("tokenizer", "chunks", "embeddings", "index", "neighbours")


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- JSON objects


class ManifestFormatError(ValueError):
    """A part of the manifest that is not what this version reads (a missing key, a wrong type)."""


R = TypeVar("R", bound="JsonObject")


def _optional(default: Any = None, **codec: Any) -> Any:
    """A key the manifest has only once it is set: not written while it has its default."""
    return field(default=default, metadata={"optional": True, **codec})


def _object(cls: type[JsonObject]) -> dict[str, Callable[[Any], Any]]:
    """Codec of a key holding one JSON object."""
    return {"read": cls.from_json, "write": lambda value: value.to_json()}


def _object_list(cls: type[JsonObject]) -> dict[str, Callable[[Any], Any]]:
    """Codec of a key holding a list of JSON objects."""
    return {
        "read": lambda items: [cls.from_json(item) for item in _expect(items, list, cls)],
        "write": lambda values: [value.to_json() for value in values],
    }


def _by_block(cls: type[JsonObject]) -> dict[str, Callable[[Any], Any]]:
    """Codec of a key holding {block id: object}; the ids are decimal strings in the file."""

    def read(items: Any) -> dict[int, Any]:
        out = {}
        for key, value in _expect(items, dict, cls).items():
            try:
                block_id = int(key)
            except ValueError:
                raise ManifestFormatError(f"the block id {key!r} is not a number") from None
            out[block_id] = cls.from_json(value)
        return out

    return {"read": read, "write": lambda values: {str(k): v.to_json() for k, v in values.items()}}


def _expect(value: Any, kind: type, cls: type) -> Any:
    if not isinstance(value, kind):
        raise ManifestFormatError(
            f"{cls.__name__} expects a JSON {'object' if kind is dict else 'list'}, got {value!r:.80}"
        )
    return value


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclass(kw_only=True)
class JsonObject:
    """A dataclass read from and written to one JSON object of the manifest.

    The fields are the object's keys, written in field order. A field with a codec (`read`,
    `write` in its metadata) holds parts of its own; an `_optional` field is written only once
    it differs from its default. Keys of the object that are no field are kept in `extra`;
    fields whose key the object lacked are remembered in `absent` and not written back while
    they keep the default they were given (setting one writes it again).
    """

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    _OWN: ClassVar[frozenset[str]] = frozenset({"extra", "absent"})

    def __setattr__(self, name: str, value: Any) -> None:
        absent = self.__dict__.get("absent")
        if absent and name in absent:  # set after reading: written from now on
            object.__setattr__(self, "absent", absent - {name})
        object.__setattr__(self, name, value)

    @classmethod
    def json_fields(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.name not in cls._OWN]

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        data = _expect(data, dict, cls)
        values: dict[str, Any] = {}
        absent = set()
        for f in cls.json_fields():
            if f.name in data:
                value, read = data[f.name], f.metadata.get("read")
                values[f.name] = read(value) if read and value is not None else value
            elif _default(f) is MISSING:
                raise ManifestFormatError(f"{cls.__name__} has no {f.name!r}")
            elif not f.metadata.get("optional"):
                absent.add(f.name)
        known = {f.name for f in cls.json_fields()}
        made = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        object.__setattr__(made, "absent", frozenset(absent))  # after __init__ set the fields
        return made

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.json_fields():
            value = getattr(self, f.name)
            if not self._written(f, value):
                continue
            write = f.metadata.get("write")
            out[f.name] = write(value) if write and value is not None else value
        out.update(self.extra)
        return out

    def _written(self, f: dataclasses.Field[Any], value: Any) -> bool:
        if f.metadata.get("optional") or f.name in self.absent:
            return value != _default(f)
        return True


# ----------------------------------------------------------------------------- chunks


@dataclass(kw_only=True)
class Cursor(JsonObject):
    """Where the chunk stream stands after a block: enough to resume exactly there."""

    event: int = 0  # next corpus event (global over all sources) to read
    offset: int = 0  # chunks of the document at `event` already written
    documents: int = 0  # documents started so far (the next document's index)
    chunks: int = 0  # chunks written so far (the next chunk's id)
    train_chunks: int = 0
    retrieval_chunks: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents started so far
    skipped: dict[str, int] = field(default_factory=dict)  # inputs skipped so far, by reason

    def copy(self) -> Cursor:
        """A cursor of its own at the same place (written with every key)."""
        values = {f.name: getattr(self, f.name) for f in self.json_fields()}
        return Cursor(**{**values, "skipped": dict(self.skipped)})


@dataclass(kw_only=True)
class ChunkBlock(JsonObject):
    """A finished chunk block: its token and documents files, where it lies in the chunk ids, the
    source it belongs to (`group`) and the cursor after it."""

    index: int  # position in the block list: the block id of its embedding and neighbour files
    group: int  # the source (position in `Manifest.sources`) its chunks come from
    start: int  # id of its first chunk
    rows: int  # chunks in it
    file: str  # chunks/tokens-NNNNNN.npy
    sha256: str
    docs_file: str  # chunks/docs-NNNNNN.jsonl: the documents whose first chunk lies in it
    docs_sha256: str
    cursor: Cursor = field(metadata=_object(Cursor))
    bytes_file: str | None = _optional()  # chunks/bytes-NNNNNN.npy (foreign tokenizer)
    bytes_sha256: str | None = _optional()

    def files(self) -> list[tuple[str, str]]:
        """(file, sha256) of each of its files."""
        pairs = [(self.file, self.sha256), (self.docs_file, self.docs_sha256)]
        if self.bytes_file is not None:
            pairs.append((self.bytes_file, self.bytes_sha256 or ""))
        return pairs


@dataclass(kw_only=True)
class ChunksRecord(JsonObject):
    """The chunk stage's part: its blocks, then the documents table and chunk -> document map."""

    blocks: list[ChunkBlock] = field(default_factory=list, metadata=_object_list(ChunkBlock))
    documents_file: str | None = None
    chunk_doc_file: str | None = None
    documents_sha256: str | None = _optional()
    chunk_doc_sha256: str | None = _optional()

    def set_tables(
        self, documents_file: str, documents_sha256: str, chunk_doc_file: str, chunk_doc_sha256: str
    ) -> None:
        self.documents_file, self.documents_sha256 = documents_file, documents_sha256
        self.chunk_doc_file, self.chunk_doc_sha256 = chunk_doc_file, chunk_doc_sha256

    def tables(self) -> list[tuple[str | None, str | None]]:
        """(file, sha256) of the documents table and of the chunk -> document map."""
        return [
            (self.documents_file, self.documents_sha256),
            (self.chunk_doc_file, self.chunk_doc_sha256),
        ]


@dataclass(kw_only=True)
class Source(JsonObject):
    """One corpus of the database: the build's inputs, its retrieval-only inputs, a `db add`."""

    inputs: list[str]
    first_event: int  # the global corpus event of its first input
    done: bool  # every chunk of it is written
    retrieval_only: bool = _optional(False)
    first_documents: int | None = _optional()  # documents before it (`db add`)
    end_cursor: Cursor | None = _optional(**_object(Cursor))  # the cursor after its last chunk

    def finish(self, cursor: Cursor) -> None:
        """Every chunk of the source is written; `cursor` is where the stream stands after it."""
        self.done = True
        self.end_cursor = cursor.copy()

    def restart(self) -> None:
        """Its chunks are to be written again, from its first input on."""
        self.done = False
        self.end_cursor = None


@dataclass(kw_only=True)
class Counts(JsonObject):
    """What the finished chunk stage holds."""

    documents: int = 0
    chunks: int = 0
    train_chunks: int = 0
    valid_chunks: int = 0
    retrieval_chunks: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def set_from(self, end: Cursor) -> None:
        """The counts of a chunk stream that ended at `end`."""
        self.documents, self.chunks = end.documents, end.chunks
        self.train_chunks = end.train_chunks
        self.valid_chunks = end.chunks - end.train_chunks - end.retrieval_chunks
        self.retrieval_chunks, self.bytes = end.retrieval_chunks, end.bytes
        self.skipped = dict(end.skipped)


# ----------------------------------------------------------------------------- tokenizer


@dataclass(kw_only=True)
class TokenizerRecord(JsonObject):
    """The tokenizer stage's part: the tokenizer file, its hash and its special tokens."""

    file: str
    file_sha256: str  # of the file
    sha256: str  # of the tokenizer's content (`Tokenizer.sha256`)
    vocab_size: int
    kind: str | None = None  # "retrolm" or "foreign"
    pad_id: int | None = None
    eos_id: int | None = None
    bos_id: int | None = None
    pad_token: str | None = None  # foreign tokenizers: the special tokens' strings
    eos_token: str | None = None
    bos_token: str | None = None
    decode_exact: bool | None = None
    byte_lengths: str | None = None  # "stored" (bytes-NNNNNN.npy beside the chunks) or "table"
    config_file: str | None = _optional()  # foreign: its special tokens beside tokenizer.json
    config_sha256: str | None = _optional()
    requested_vocab_size: int | None = _optional()  # when the BPE stopped short of it

    def _written(self, f: dataclasses.Field[Any], value: Any) -> bool:
        if f.name.endswith("_token"):  # the strings are recorded for foreign tokenizers
            return self.kind == "foreign" and f.name not in self.absent or value is not None
        return super()._written(f, value)

    @property
    def stores_byte_lengths(self) -> bool:
        return self.byte_lengths == "stored"


# ----------------------------------------------------------------------------- block files


@dataclass(kw_only=True)
class BlockFile(JsonObject):
    """A finished block of a stage after the chunks: its file, the file's sha256, its rows."""

    file: str
    sha256: str
    rows: int


@dataclass(kw_only=True)
class KeptCells(JsonObject):
    """The nearest IVF cells the encoding found for a block's indexed chunks, kept (with their
    distances) for the neighbour stage, which searches the same chunks."""

    rows: int
    cells_file: str
    cells_sha256: str
    celldis_file: str
    celldis_sha256: str

    def files(self) -> list[tuple[str, str]]:
        return [(self.cells_file, self.cells_sha256), (self.celldis_file, self.celldis_sha256)]


@dataclass(kw_only=True)
class CodesBlock(BlockFile):
    """A block's index codes (`file`), with the nearest cells of its chunks where kept."""

    celldis_file: str | None = _optional()
    celldis_sha256: str | None = _optional()
    cells_file: str | None = _optional()
    cells_sha256: str | None = _optional()

    def kept_cells(self) -> KeptCells | None:
        if self.cells_file is None or self.celldis_file is None:
            return None
        return KeptCells(
            rows=self.rows,
            cells_file=self.cells_file,
            cells_sha256=self.cells_sha256 or "",
            celldis_file=self.celldis_file,
            celldis_sha256=self.celldis_sha256 or "",
        )


@dataclass(kw_only=True)
class NeighbourBlock(JsonObject):
    """A finished neighbour block: the neighbours' ids and distances of a chunk block's rows."""

    ids_file: str
    ids_sha256: str
    dists_file: str
    dists_sha256: str
    rows: int

    def files(self) -> list[tuple[str, str]]:
        return [(self.ids_file, self.ids_sha256), (self.dists_file, self.dists_sha256)]


# ----------------------------------------------------------------------------- stage records


@dataclass(kw_only=True)
class EmbeddingsRecord(JsonObject):
    """The embedding stage's part: the embedder (spec, dim, metric) and the blocks embedded."""

    spec: str | None = None
    dim: int | None = None
    metric: str | None = None
    blocks: dict[int, BlockFile] = field(default_factory=dict, metadata=_by_block(BlockFile))
    dtype_choice: dict[str, Any] | None = _optional()  # `embed.choose_dtype`'s measurement

    def set_embedder(self, spec: str, dim: int, metric: str) -> None:
        self.spec, self.dim, self.metric = spec, dim, metric

    def compute_dtype(self, setting: str) -> str:
        """The embedder's compute dtype: `setting`, or for `auto` the recorded measurement."""
        if setting != "auto":
            return setting
        return self.dtype_choice["dtype"] if self.dtype_choice else "float32"


@dataclass(kw_only=True)
class IndexRecord(JsonObject):
    """The index stage's part: the index file (faiss or BM25) and how to search it."""

    kind: str  # "faiss" or "bm25"
    file: str
    sha256: str | None = _optional()  # faiss: of the index file (BM25: a folder)
    factory: str
    metric: str
    search_params: dict[str, Any]
    ntotal: int  # indexed chunks
    blocks: int  # chunk blocks indexed (a `db add` extends the index from there)
    generation: int  # each index built gets the next one; its files are named after it
    ondisk: bool | None = _optional()  # faiss: inverted lists in `ivfdata_file`
    ivfdata_file: str | None = _optional()
    ivfdata_sha256: str | None = _optional()
    search_recall_at_10: float | None = _optional()
    # each block's nearest cells from the encoding, until the neighbour stage ends
    encoded_cells: dict[int, KeptCells] | None = _optional(**_by_block(KeptCells))


@dataclass(kw_only=True)
class IndexPlan(JsonObject):
    """An index being built (`index_build`): the trained index and the blocks encoded so far."""

    generation: int
    factory: str
    metric: str
    ondisk: bool
    first_block: int  # the first chunk block it adds (0, or the blocks a `db add` appended)
    trained_file: str
    trained_sha256: str
    codes: dict[int, CodesBlock] = field(default_factory=dict, metadata=_by_block(CodesBlock))


@dataclass(kw_only=True)
class NeighboursRecord(JsonObject):
    """The neighbour stage's part: K and the blocks whose neighbours are written."""

    k: int
    blocks: dict[int, NeighbourBlock] = field(
        default_factory=dict, metadata=_by_block(NeighbourBlock)
    )


# the stages whose finished blocks ranks record in files (`distributed.write_record`), and the
# class of such a block
BLOCK_STAGES: dict[str, type[JsonObject]] = {
    "embeddings": BlockFile,
    "index-codes": CodesBlock,
    "neighbours": NeighbourBlock,
}


# ----------------------------------------------------------------------------- the manifest


@dataclass(kw_only=True)
class Manifest(JsonObject):
    """A database's manifest: what every stage has written, and which stages are done."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    settings: dict[str, Any]
    fingerprint: str
    stages: dict[str, bool]
    tokenizer: TokenizerRecord | None = field(default=None, metadata=_object(TokenizerRecord))
    sources: list[Source] = field(default_factory=list, metadata=_object_list(Source))
    counts: Counts = field(default_factory=Counts, metadata=_object(Counts))
    chunks: ChunksRecord = field(default_factory=ChunksRecord, metadata=_object(ChunksRecord))
    embeddings: EmbeddingsRecord = field(
        default_factory=EmbeddingsRecord, metadata=_object(EmbeddingsRecord)
    )
    index: IndexRecord | None = field(default=None, metadata=_object(IndexRecord))
    neighbours: NeighboursRecord = field(metadata=_object(NeighboursRecord))
    index_build: IndexPlan | None = _optional(**_object(IndexPlan))

    @classmethod
    def new(cls, config: DatabaseConfig, inputs: list[str]) -> Manifest:
        """The manifest of a new database built from `inputs`: no stage done."""
        settings = config.content_settings()
        return cls(
            settings=settings,
            fingerprint=fingerprint(settings),
            stages={stage: False for stage in STAGES},
            sources=[Source(inputs=inputs, first_event=0, done=False)],
            neighbours=NeighboursRecord(k=config.neighbours),
        )

    def refresh(self, folder: str | Path) -> None:
        """Read the manifest `folder` holds into this one (a rank after the main rank wrote it)."""
        fresh = load_manifest(folder)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, getattr(fresh, f.name))

    # -- stages
    def is_done(self, stage: str) -> bool:
        return bool(self.stages.get(stage))

    def unfinished(self) -> list[str]:
        """The stages not done, in build order."""
        return [stage for stage in STAGES if not self.stages.get(stage)]

    def finish_stage(self, stage: str) -> None:
        self.stages[stage] = True

    def redo_stages(self, *stages: str) -> None:
        """Mark `stages` as to be done (again)."""
        for stage in stages:
            self.stages[stage] = False

    def finish_all_stages(self) -> None:
        for stage in self.stages:
            self.stages[stage] = True

    def reset_from(self, stage: str, config: DatabaseConfig) -> None:
        """Forget what `stage` and the stages after it wrote, and take `config`'s settings (an
        unfinished build whose settings were corrected)."""
        first = STAGES.index(stage)
        if first <= STAGES.index("chunks"):
            self.chunks.blocks = []
            for source in self.sources:
                source.restart()
        if first == 0:
            self.tokenizer = None
        if first <= STAGES.index("embeddings"):
            self.embeddings = EmbeddingsRecord()
        if first <= STAGES.index("index"):
            self.index = None
        self.neighbours = NeighboursRecord(k=config.neighbours)
        self.redo_stages(*STAGES[first:])
        self.settings = config.content_settings()
        self.fingerprint = fingerprint(self.settings)

    # -- tokenizer
    @property
    def stores_byte_lengths(self) -> bool:
        """Whether the chunk blocks have per-token byte counts (`bytes-NNNNNN.npy`) beside them."""
        return self.tokenizer is not None and self.tokenizer.stores_byte_lengths

    # -- sources and chunk blocks
    def append_source(self, inputs: list[str], *, retrieval_only: bool) -> Source:
        """A new source of documents after the last one; its stages are to be done."""
        source = Source(
            inputs=inputs,
            first_event=self.end_cursor().event,
            done=False,
            retrieval_only=retrieval_only,
        )
        self.sources.append(source)
        self.redo_stages("chunks", "embeddings", "index", "neighbours")
        return source

    def undo_last_source(self) -> Source:
        """Drop the last source (it wrote no chunk block): the database is the finished one it
        was before the source was appended. Returns the source dropped."""
        source = self.sources.pop()
        self.counts.skipped = dict(self.end_cursor().skipped)
        self.finish_all_stages()
        return source

    def end_cursor(self) -> Cursor:
        """Where the chunk stream stands after the last source (a copy)."""
        if not self.sources:
            return Cursor()
        end = self.sources[-1].end_cursor
        if end is None:
            raise ManifestFormatError("the last source has no end_cursor")
        return end.copy()

    def add_chunk_block(self, block: ChunkBlock) -> None:
        self.chunks.blocks.append(block)

    def drop_chunk_blocks(self, first: int) -> None:
        """Forget the chunk blocks from position `first` on: their sources are to be chunked
        again from there, and the stages that depend on the full chunk set redone."""
        blocks = self.chunks.blocks
        group = blocks[first].group
        del blocks[first:]
        for source in self.sources[group:]:
            source.done = False
        self.redo_stages("chunks", "index", "neighbours")

    def resume_cursor(self, group: int) -> Cursor:
        """Where the chunk stream of source `group` resumes: after its last block, else at the
        end of the source before it."""
        blocks = self.chunks.blocks
        if blocks and blocks[-1].group == group:
            return blocks[-1].cursor.copy()
        if group == 0:
            return Cursor()
        end = self.sources[group - 1].end_cursor
        if end is None:
            raise ManifestFormatError(f"source {group - 1} is done but has no end_cursor")
        return end.copy()

    def finish_chunks(self, end: Cursor) -> None:
        """The chunk stage ended at `end` (its tables already recorded)."""
        self.counts.set_from(end)
        self.finish_stage("chunks")

    # -- blocks of the later stages
    def block_files(self, stage: str) -> dict[int, Any]:
        """The finished blocks of `stage` ("embeddings", "index-codes", "neighbours"), by id."""
        if stage == "embeddings":
            return self.embeddings.blocks
        if stage == "neighbours":
            return self.neighbours.blocks
        if stage == "index-codes":
            if self.index_build is None:
                raise ManifestFormatError("index codes recorded without an index_build")
            return self.index_build.codes
        raise ValueError(f"no blocks are recorded for the stage {stage!r}")

    def finish_block(self, stage: str, block_id: int, block: JsonObject) -> None:
        """Record that block `block_id` of `stage` is written: `block` (`BLOCK_STAGES[stage]`)."""
        if not isinstance(block, BLOCK_STAGES[stage]):
            raise TypeError(f"a block of {stage} is a {BLOCK_STAGES[stage].__name__}")
        self.block_files(stage)[block_id] = block

    # -- index
    def install_index(self, index: IndexRecord) -> IndexRecord | None:
        """Make `index` the database's index (the index stage is done, its plan forgotten).
        Returns the index it replaces."""
        old = self.index
        self.index = index
        self.finish_stage("index")
        self.index_build = None
        return old


def block_from_json(stage: str, data: Any) -> Any:
    """A finished block of `stage` as a rank recorded it (`BLOCK_STAGES`)."""
    return BLOCK_STAGES[stage].from_json(data)


# ----------------------------------------------------------------------------- files


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_FILE


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check a database's manifest.

    Raises:
        InputError: the folder is not a database.
        CorruptArtifactError: the manifest is unreadable or of an unknown format/version.
    """
    path = manifest_path(folder)
    if not path.is_file():
        raise InputError(
            f"{folder} is not a retrolm database (no {MANIFEST_FILE}); build one with `retrolm db build`"
        )
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise CorruptArtifactError(f"cannot read {path}: {e}; rebuild the database") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CorruptArtifactError(f"{path} is not a retrolm database manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptArtifactError(
            f"{path} has database format version {version}; this retrolm reads version "
            f"{FORMAT_VERSION}. Rebuild the database with this version of retrolm"
        )
    try:
        return Manifest.from_json(data)
    except (ManifestFormatError, TypeError) as e:
        raise CorruptArtifactError(
            f"{path} is not a complete retrolm database manifest ({e}); rebuild the database"
        ) from e


def save_manifest(folder: str | Path, manifest: Manifest) -> None:
    write_json(manifest_path(folder), manifest.to_json())


def check_settings(manifest: Manifest, config: DatabaseConfig, folder: str | Path) -> None:
    """Refuse to continue a database built with other content settings, naming them.

    Raises:
        MismatchError: with every differing setting, its stored and its requested value.
    """
    stored = manifest.settings
    wanted = config.content_settings()
    differing = [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    if differing:
        lines = "; ".join(
            f"{k}: database has {stored.get(k)!r}, requested {wanted.get(k)!r}" for k in differing
        )
        raise MismatchError(
            f"the database {folder} was built with other settings ({lines}). Use the same "
            "settings to resume or add to it, or build a new database with --out elsewhere"
        )


def block_ok(folder: Path, file: str | None, sha256: str | None) -> bool:
    """True when `folder/file` exists and has the recorded checksum."""
    if file is None:
        return False
    path = folder / file
    if not path.is_file():
        return False
    return sha256_file(path) == sha256


def write_config(folder: Path, config: DatabaseConfig) -> None:
    write_json(folder / CONFIG_FILE, config.to_dict())
