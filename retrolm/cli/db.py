"""`retrolm db ...`: build, extend, inspect and search a retrieval database."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any

from retrolm.database.config import DatabaseConfig
from retrolm.errors import InputError

DEFAULTS = DatabaseConfig()

# flag -> (config field, type, help); shared by `db build` and `db chunk`
CONTENT_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--chunk-size", "chunk_size", int, "tokens per chunk (m)"),
    (
        "--vocab-size",
        "vocab_size",
        int,
        "vocabulary of the BPE tokenizer trained on the train split",
    ),
    (
        "--tokenizer",
        "tokenizer",
        str,
        "use this tokenizer.json / HF tokenizer folder instead of training one",
    ),
    (
        "--valid-fraction",
        "valid_fraction",
        float,
        "fraction of documents (by name hash) in the valid split",
    ),
    (
        "--split-list",
        "valid_list",
        str,
        "file of document names (one per line) forming the valid split",
    ),
    ("--glob", "glob", str, "files of a corpus folder to read"),
    ("--text-field", "text_field", str, "JSONL field / Parquet column holding the text"),
    ("--retriever", "retriever", str, "dense (embeddings + faiss) or bm25"),
    (
        "--embedder",
        "embedder",
        str,
        "'default' (all-MiniLM-L6-v2), a local sentence-transformers folder, or bert-mean:PATH",
    ),
    ("--dtype", "dtype", str, "stored embedding dtype: float16 or float32"),
    ("--index", "index", str, "'auto' or a faiss index_factory string, e.g. 'IVF1024,PQ32'"),
    ("--index-memory", "index_memory", str, "memory budget of the index for --index auto, e.g. 4G"),
    ("--index-train-size", "index_train_size", int, "most train chunks sampled to train the index"),
    ("--neighbours", "neighbours", int, "neighbours stored per chunk (K)"),
    ("--block-rows", "block_rows", int, "chunks per block file"),
    ("--seed", "seed", int, "seed of the index training sample"),
    (
        "--tokenizer-train-bytes",
        "tokenizer_train_bytes",
        int,
        "most bytes of train text used to train the tokenizer",
    ),
]
SPEED_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--embed-batch-size", "embed_batch_size", int, "chunks per embedding batch"),
    ("--device", "device", str, "torch device of the embedder (cpu, cuda, ...)"),
    (
        "--embed-dtype",
        "embed_dtype",
        str,
        "embedder compute dtype: auto (bfloat16 where measured faster), float32 or bfloat16",
    ),
]


CHOICES = {
    "retriever": ("dense", "bm25"),
    "dtype": ("float16", "float32"),
    "embed_dtype": ("auto", "float32", "bfloat16"),
}
METAVARS = {int: "N", float: "F"}
SHOWN_DEFAULTS = {"index_memory": "4G"}


def _add_flags(parser: argparse.ArgumentParser, flags: list[tuple[str, str, Any, str]]) -> None:
    for flag, name, kind, text in flags:
        default = SHOWN_DEFAULTS.get(name, getattr(DEFAULTS, name))
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            default=None,
            choices=CHOICES.get(name),
            metavar=None if name in CHOICES else METAVARS.get(kind, "TEXT"),
            help=f"{text} (default: {default})",
        )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> DatabaseConfig:
    values = {
        f.name: getattr(args, f.name)
        for f in fields(DatabaseConfig)
        if getattr(args, f.name, None) is not None
    }
    if getattr(args, "strict", False):
        values["strict"] = True
    return DatabaseConfig(**values)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for _, name, _, _ in SPEED_FLAGS
        if getattr(args, name, None) is not None
    }


def _ranked(work):  # noqa: ANN001, ANN202
    """Run `work(args, dist)` as this process's rank of a torchrun job (or as the only one);
    only the main rank prints the result and reports user errors."""

    def run(args: argparse.Namespace) -> int:
        from retrolm.database import distributed
        from retrolm.errors import UserError

        config_device = getattr(args, "device", None) or DEFAULTS.device
        with distributed.session(config_device) as dist:
            try:
                result = work(args, dist)
            except UserError as e:
                if dist.is_main:
                    raise
                return e.exit_code  # the main rank prints the message once
            if dist.is_main:
                print(result)
        return 0

    return run


def _build(args: argparse.Namespace) -> int:
    from retrolm.database.distributed import launch_local

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.workers and args.workers > 1 and "WORLD_SIZE" not in os.environ:
        return launch_local(args.workers, ["-m", "retrolm", *_build_argv(args)])
    return _ranked(_build_database)(args)


def _build_database(args: argparse.Namespace, dist: Any) -> Any:
    from retrolm.database import build_database

    return build_database(
        args.corpus,
        args.out,
        _config(args),
        retrieval_only=args.retrieval_only or (),
        show_progress=not args.no_progress,
        dist=dist,
    )


def _build_argv(args: argparse.Namespace) -> list[str]:
    """The `retrolm db build` command line of `args`, without --workers (what each rank runs)."""
    argv = ["-q"] if args.quiet else ["-v"] * args.verbose
    argv += ["db", "build", *args.corpus, "--out", args.out]
    for flag, name, _, _ in CONTENT_FLAGS + SPEED_FLAGS:
        if getattr(args, name, None) is not None:
            argv += [flag, str(getattr(args, name))]
    argv += ["--strict"] * bool(args.strict) + ["--no-progress"] * bool(args.no_progress)
    if args.retrieval_only:
        argv += ["--retrieval-only", *args.retrieval_only]
    return argv


def _chunk(args: argparse.Namespace) -> int:
    from retrolm.database import chunk_stage

    return _ranked(
        lambda a, dist: chunk_stage(
            a.corpus, a.out, _config(a), show_progress=not a.no_progress, dist=dist
        )
    )(args)


def _stage(name: str):  # noqa: ANN202
    def work(args: argparse.Namespace, dist: Any) -> Any:
        import retrolm.database as database

        stage = getattr(database, f"{name}_stage")
        return stage(
            args.db, overrides=_overrides(args), show_progress=not args.no_progress, dist=dist
        )

    return _ranked(work)


def _add(args: argparse.Namespace) -> int:
    from retrolm.database import add_documents

    if not args.corpus and not args.retrieval_only:
        raise InputError(
            "db add: name the documents to add (CORPUS... or --retrieval-only EXTRA...)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError(
            "db add runs as one process; run it without torchrun (or with --nproc-per-node 1)"
        )
    for paths, retrieval_only in ((args.corpus, False), (args.retrieval_only, True)):
        if paths:
            folder = add_documents(
                args.db,
                paths,
                overrides=_overrides(args),
                retrieval_only=retrieval_only,
                show_progress=not args.no_progress,
            )
    print(folder)
    return 0


def _foreign_tokenizer(tok: dict) -> str:
    """The special ids and byte counting of a Hugging Face model's tokenizer ("" for retrolm's)."""
    if tok.get("kind") != "foreign":
        return ""
    bos = f", bos {tok['bos_id']}" if tok.get("bos_id") is not None else ""
    exact = "" if tok.get("decode_exact") else " (decode not exact: text shown is approximate)"
    return (
        f"; foreign, eos {tok['eos_id']}, pad {tok['pad_id']}{bos}; bytes per token counted "
        f"from the source text{exact}"
    )


def _info(args: argparse.Namespace) -> int:
    from retrolm.database.db import database_info

    info = database_info(args.db)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts, index, emb, tok = info["counts"], info["index"], info["embedder"], info["tokenizer"]
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(counts["skipped"].items())) or "none"
    lines = [
        f"database   {info['path']} (format {info['format_version']})",
        f"documents  {counts['documents']} ({counts['bytes']} bytes); skipped inputs: {skipped}",
        f"chunks     {counts['chunks']} of {info['settings']['chunk_size']} tokens "
        f"({counts['train_chunks']} train, {counts['valid_chunks']} valid, "
        f"{counts.get('retrieval_chunks', 0)} retrieval-only) in {counts['blocks']} blocks",
        f"tokenizer  vocabulary {tok['vocab_size']}"
        + (f" (asked for {tok['requested_vocab_size']})" if tok.get("requested_vocab_size") else "")
        + f", sha256 {tok['sha256'][:16]}"
        + _foreign_tokenizer(tok)
        if tok
        else "tokenizer  (not yet)",
        f"embedder   {emb['spec']} (dim {emb['dim']}, metric {emb['metric']})",
        f"index      {index['kind']} {index['factory']!r}, {index['ntotal']} vectors, search {index['search_params']}"
        + (", on-disk inverted lists (memory-mapped)" if index.get("ondisk") else ""),
        f"neighbours {info['settings']['neighbours']} per chunk",
        "stages     "
        + ", ".join(f"{s} {'done' if done else 'NOT done'}" for s, done in info["stages"].items()),
        f"on disk    {info['bytes_on_disk']['total'] / 2**20:.1f} MiB "
        + ", ".join(
            f"{k} {v / 2**20:.1f}" for k, v in info["bytes_on_disk"].items() if k != "total"
        ),
        f"sources    {'; '.join(' '.join(s) for s in info['sources'])}",
    ]
    print("\n".join(lines))
    return 0


def _search(args: argparse.Namespace) -> int:
    from retrolm.database import Database
    from retrolm.database.db import nearer
    from retrolm.errors import InputError

    if not args.text.strip():
        raise InputError("the search text is empty; give the text to search for")
    try:
        args.text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            "the search text is not valid UTF-8 (check the terminal's encoding); give UTF-8 text"
        ) from None
    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    db = Database.open(args.db)
    hits = db.search([args.text], args.k)[0]
    if args.json:
        print(json.dumps([h.__dict__ for h in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print("no chunk matches the text (it shares no term with the database)", file=sys.stderr)
    else:
        print(f"({db.metric} scores: {nearer(db.metric)} is nearer)")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank}. chunk {hit.chunk_id}  {hit.document_name}  score {hit.score:.4f}")
        print("   " + hit.text.replace("\n", "\n   "))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `retrolm db` and its subcommands."""
    group = subparsers.add_parser(
        "db", help="build, extend, inspect and search a retrieval database"
    )
    group.set_defaults(handler=None, help_parser=group)
    sub = group.add_subparsers(dest="db_command", metavar="DB_COMMAND")

    for name, handler, text in (
        (
            "build",
            _build,
            "run every stage: corpus -> tokenizer -> chunks -> embeddings -> index -> neighbours (resumable)",
        ),
        ("chunk", _chunk, "only the corpus, tokenizer and chunk stages"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "corpus",
            nargs="+",
            metavar="CORPUS",
            help="folders, text files, .jsonl or .parquet files",
        )
        p.add_argument(
            "--out", required=True, metavar="DB", help="the database folder (resumed if it exists)"
        )
        p.add_argument(
            "--strict",
            action="store_true",
            help="stop at the first bad input instead of skipping it",
        )
        if name == "build":
            p.add_argument(
                "--retrieval-only",
                nargs="+",
                metavar="EXTRA",
                help="more inputs that are indexed and retrieved from but never trained on or "
                "evaluated (split 'retrieval'): a database larger than the training set",
            )
        _add_flags(p, CONTENT_FLAGS)
        _add_flags(p, SPEED_FLAGS)
        _common(p)
        if name == "build":
            p.add_argument(
                "--workers",
                type=int,
                default=None,
                metavar="N",
                help="start N local ranks through torch's elastic launcher (as torchrun "
                "--nproc-per-node N would); any N gives the same database (default: 1)",
            )
        p.set_defaults(handler=handler)

    for name, text in (
        ("embed", "embed every chunk not yet embedded"),
        ("index", "train the index on a sample of train chunks and fill it"),
        ("neighbours", "precompute the neighbours of every chunk (excluding its own document)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("db", metavar="DB", help="the database folder")
        _add_flags(p, SPEED_FLAGS)
        _common(p)
        p.set_defaults(handler=_stage(name))

    p = sub.add_parser(
        "add",
        help="append documents to a finished database without a rebuild",
        description="Append documents to a finished database without a rebuild: chunk, embed "
        "and index them, and find the new chunks' neighbours. It runs as one process (under "
        "torchrun it refuses: the added documents are few next to a build's).",
    )
    p.add_argument("db", metavar="DB")
    p.add_argument(
        "corpus", nargs="*", metavar="CORPUS", help="documents to add (split by name hash)"
    )
    p.add_argument(
        "--retrieval-only",
        nargs="+",
        metavar="EXTRA",
        help="documents to add as retrieval-only (indexed, never trained on or evaluated)",
    )
    _add_flags(p, SPEED_FLAGS)
    _common(p)
    p.set_defaults(handler=_add)

    p = sub.add_parser("info", help="settings, counts, sizes on disk and completed stages")
    p.add_argument("db", metavar="DB")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_info)

    p = sub.add_parser("search", help="the chunks nearest to a text")
    p.add_argument("db", metavar="DB")
    p.add_argument("text", help="the query text")
    p.add_argument("-k", type=int, default=5, help="number of results (default: 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_search)
