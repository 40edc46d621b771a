"""The typed manifest (`retrolm.database.manifest.Manifest`) reads and writes `manifest.json`
exactly as the file format has it: a database's manifest loads and saves back byte for byte,
manifests of older builds (fewer keys) and of other versions (more keys) open and keep their
keys, and each method does to the file what the stages did to the dict."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from retrolm.database import DatabaseConfig, add_documents, build_database, chunk_stage
from retrolm.database.db import database_info
from retrolm.database.embed import make_tiny_bert
from retrolm.database.manifest import (
    BlockFile,
    Cursor,
    Manifest,
    NeighbourBlock,
    fingerprint,
    load_manifest,
    manifest_path,
    save_manifest,
)
from retrolm.errors import CorruptArtifactError
from retrolm.io import write_json
from tests.test_database import make_corpus, tiny_config

SHA = "0" * 64  # a checksum (the manifest only stores it)


def cursor(event: int, documents: int, chunks: int, skipped: dict[str, int]) -> dict:
    return {
        "event": event,
        "offset": 0,
        "documents": documents,
        "chunks": chunks,
        "train_chunks": chunks - 3,
        "retrieval_chunks": 0,
        "bytes": 100 * documents,
        "skipped": skipped,
    }


SETTINGS = DatabaseConfig(
    chunk_size=16,
    vocab_size=300,
    tokenizer="/models/hf-tokenizer",
    embedder="bert-mean:/models/bert",
    neighbours=4,
    block_rows=40,
    valid_fraction=0.2,
).content_settings()

# a manifest as the stages write it (dict code of December 2026): a finished build with a
# foreign tokenizer, retrieval-only inputs and one `db add`, an on-disk index whose kept cells
# are still there, and an index being built (a second `db add` interrupted in its index stage)
OLD_FORMAT: dict = {
    "format": "retrolm-database",
    "format_version": 1,
    "settings": SETTINGS,
    "fingerprint": fingerprint(SETTINGS),
    "stages": {
        "tokenizer": True,
        "chunks": True,
        "embeddings": True,
        "index": True,
        "neighbours": True,
    },
    "tokenizer": {
        "file": "tokenizer.json",
        "file_sha256": SHA,
        "sha256": SHA,
        "vocab_size": 32000,
        "kind": "foreign",
        "pad_id": 0,
        "eos_id": 2,
        "bos_id": None,
        "pad_token": "<unk>",
        "eos_token": "</s>",
        "bos_token": None,
        "decode_exact": False,
        "byte_lengths": "stored",
        "config_file": "tokenizer_config.json",
        "config_sha256": SHA,
    },
    "sources": [
        {
            "inputs": ["corpus"],
            "first_event": 0,
            "done": True,
            "end_cursor": cursor(32, 30, 60, {"binary": 1, "empty": 1}),
        },
        {
            "inputs": ["extra"],
            "first_event": 32,
            "done": True,
            "retrieval_only": True,
            "end_cursor": cursor(40, 36, 70, {"binary": 2, "empty": 2}),
        },
        {
            "inputs": ["more"],
            "first_event": 40,
            "done": True,
            "first_documents": 36,
            "end_cursor": cursor(48, 42, 80, {"binary": 3, "empty": 3}),
        },
    ],
    "counts": {
        "documents": 42,
        "chunks": 80,
        "train_chunks": 60,
        "valid_chunks": 10,
        "retrieval_chunks": 10,
        "bytes": 4200,
        "skipped": {"binary": 3, "empty": 3},
    },
    "chunks": {
        "blocks": [
            {
                "index": i,
                "group": [0, 1, 2][i],
                "start": 40 * i,
                "rows": 40 if i < 2 else 0,
                "file": f"chunks/tokens-{i:06d}.npy",
                "sha256": SHA,
                "docs_file": f"chunks/docs-{i:06d}.jsonl",
                "docs_sha256": SHA,
                "cursor": cursor(20 + 10 * i, 20 + 10 * i, 40 * (i + 1), {"binary": 1}),
                "bytes_file": f"chunks/bytes-{i:06d}.npy",
                "bytes_sha256": SHA,
            }
            for i in range(3)
        ],
        "documents_file": "documents.jsonl",
        "chunk_doc_file": "chunk_doc.npy",
        "documents_sha256": SHA,
        "chunk_doc_sha256": SHA,
    },
    "embeddings": {
        "spec": "bert-mean:/models/bert",
        "dim": 32,
        "metric": "l2",
        "blocks": {
            str(i): {"file": f"embeddings/emb-{i:06d}.npy", "sha256": SHA, "rows": 40}
            for i in (1, 0, 2)  # resumed: block 1 was embedded before block 0
        },
        "dtype_choice": {
            "dtype": "float32",
            "float32_s": None,
            "bfloat16_s": None,
            "chunks": 40,
            "device": "cpu",
        },
    },
    "index": {
        "kind": "faiss",
        "file": "index/index-0001.faiss",
        "sha256": SHA,
        "factory": "IVF4,Flat",
        "metric": "l2",
        "search_params": {"nprobe": 4},
        "ntotal": 70,
        "blocks": 2,
        "generation": 1,
        "ondisk": True,
        "ivfdata_file": "index/lists-0001.ivfdata",
        "ivfdata_sha256": SHA,
        "search_recall_at_10": 1.0,
        "encoded_cells": {
            "1": {
                "rows": 35,
                "cells_file": "index/cells-0001-000001.npy",
                "cells_sha256": SHA,
                "celldis_file": "index/celldis-0001-000001.npy",
                "celldis_sha256": SHA,
            }
        },
    },
    "neighbours": {
        "k": 4,
        "blocks": {
            str(i): {
                "ids_file": f"neighbours/ids-{i:06d}.npy",
                "ids_sha256": SHA,
                "dists_file": f"neighbours/dists-{i:06d}.npy",
                "dists_sha256": SHA,
                "rows": 40,
            }
            for i in range(2)
        },
    },
    "index_build": {
        "generation": 2,
        "factory": "IVF4,Flat",
        "metric": "l2",
        "ondisk": False,
        "first_block": 2,
        "trained_file": "index/trained-0002.faiss",
        "trained_sha256": SHA,
        "codes": {
            "2": {
                "file": "index/codes-0002-000002.npy",
                "sha256": SHA,
                "rows": 0,
                "celldis_file": "index/celldis-0002-000002.npy",
                "celldis_sha256": SHA,
                "cells_file": "index/cells-0002-000002.npy",
                "cells_sha256": SHA,
            }
        },
    },
}

# the oldest manifests of format version 1 lack keys added since (a retrolm tokenizer's record
# without kind, special ids and byte lengths; no retrieval-only or byte counts): they still open
OLDEST_FORMAT: dict = {
    **copy.deepcopy(OLD_FORMAT),
    "tokenizer": {
        "file": "tokenizer.json",
        "file_sha256": SHA,
        "sha256": SHA,
        "vocab_size": 300,
        "pad_id": 0,
        "eos_id": 1,
    },
    "sources": [
        {
            "inputs": ["corpus"],
            "first_event": 0,
            "done": True,
            "end_cursor": {
                "event": 32,
                "offset": 0,
                "documents": 30,
                "chunks": 60,
                "train_chunks": 50,
                "skipped": {"binary": 1},
            },
        }
    ],
    "counts": {
        "documents": 30,
        "chunks": 60,
        "train_chunks": 50,
        "valid_chunks": 10,
        "skipped": {},
    },
    "index": {**OLD_FORMAT["index"], "ondisk": False},
}
for key in ("ivfdata_file", "ivfdata_sha256", "search_recall_at_10", "encoded_cells"):
    del OLDEST_FORMAT["index"][key]
del OLDEST_FORMAT["index_build"]


def as_file(data: dict) -> str:
    """The text `save_manifest` writes for `data` (key order included)."""
    return json.dumps(data, indent=2) + "\n"


def round_trip(data: dict) -> dict:
    return Manifest.from_json(copy.deepcopy(data)).to_json()


def write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path(folder), data)
    return folder


def assert_saved_unchanged(folder: Path) -> None:
    before = manifest_path(folder).read_bytes()
    save_manifest(folder, load_manifest(folder))
    assert manifest_path(folder).read_bytes() == before


# ----------------------------------------------------------------------------- the file format


@pytest.mark.parametrize("data", [OLD_FORMAT, OLDEST_FORMAT], ids=["old", "oldest"])
def test_a_manifest_reads_and_writes_back_byte_for_byte(data, tmp_path):
    assert as_file(round_trip(data)) == as_file(data)  # same keys, same order, same values
    folder = write(tmp_path / "db", data)
    assert_saved_unchanged(folder)


def test_an_old_format_manifest_opens_with_every_part_typed(tmp_path):
    folder = write(tmp_path / "db", OLD_FORMAT)
    manifest = load_manifest(folder)
    assert manifest.unfinished() == [] and manifest.is_done("neighbours")
    assert manifest.tokenizer.kind == "foreign" and manifest.stores_byte_lengths
    assert [s.inputs for s in manifest.sources] == [["corpus"], ["extra"], ["more"]]
    assert [s.retrieval_only for s in manifest.sources] == [False, True, False]
    assert manifest.sources[2].first_documents == 36
    assert manifest.sources[2].end_cursor == Cursor(**cursor(48, 42, 80, {"binary": 3, "empty": 3}))
    block = manifest.chunks.blocks[1]
    assert (block.index, block.group, block.start, block.rows) == (1, 1, 40, 40)
    assert block.cursor.chunks == 80 and block.bytes_file == "chunks/bytes-000001.npy"
    assert list(manifest.embeddings.blocks) == [1, 0, 2]
    assert manifest.embeddings.blocks[0] == BlockFile(
        file="embeddings/emb-000000.npy", sha256=SHA, rows=40
    )
    assert manifest.embeddings.compute_dtype("auto") == "float32"
    assert manifest.embeddings.compute_dtype("bfloat16") == "bfloat16"
    index = manifest.index
    assert (index.kind, index.ondisk, index.ivfdata_file) == (
        "faiss",
        True,
        "index/lists-0001.ivfdata",
    )
    assert index.encoded_cells[1].files() == [
        ("index/cells-0001-000001.npy", SHA),
        ("index/celldis-0001-000001.npy", SHA),
    ]
    assert manifest.neighbours.k == 4 and manifest.neighbours.blocks[1].rows == 40
    plan = manifest.index_build
    assert plan.first_block == 2 and plan.codes[2].kept_cells().rows == 0
    info = database_info(folder)  # what `retrolm db info` shows
    assert info["tokenizer"] == OLD_FORMAT["tokenizer"]
    assert info["index"]["ondisk"] is True and info["counts"]["blocks"] == 3
    assert info["counts"]["retrieval_chunks"] == 10 and info["stages"] == OLD_FORMAT["stages"]


def test_the_oldest_manifests_open_and_get_no_keys_they_lacked(tmp_path):
    manifest = Manifest.from_json(copy.deepcopy(OLDEST_FORMAT))
    assert manifest.tokenizer.kind is None and not manifest.stores_byte_lengths
    assert manifest.counts.retrieval_chunks == 0 and manifest.index.ondisk is False
    end = manifest.sources[0].end_cursor
    assert (end.retrieval_chunks, end.bytes) == (0, 0)
    assert "retrieval_chunks" not in manifest.to_json()["counts"]
    # a key set again is written again, as a dict update wrote it
    manifest.counts.set_from(end)
    counts = manifest.to_json()["counts"]
    assert list(counts) == [
        "documents",
        "chunks",
        "train_chunks",
        "valid_chunks",
        "retrieval_chunks",
        "bytes",
        "skipped",
    ]
    assert counts["valid_chunks"] == 10 and counts["skipped"] == {"binary": 1}
    # a cursor copied to go on from is a new cursor: written with every key
    assert list(end.copy().to_json()) == list(cursor(0, 0, 0, {}))
    assert "bytes" not in manifest.to_json()["sources"][0]["end_cursor"]


def test_unknown_keys_are_kept_where_they_were(tmp_path):
    data = copy.deepcopy(OLD_FORMAT)
    data["future"] = {"anything": [1, 2]}
    data["chunks"]["blocks"][0]["future_block_key"] = "x"
    data["index"]["future_index_key"] = 7
    data["sources"][0]["end_cursor"]["future_cursor_key"] = 1
    data["embeddings"]["blocks"]["0"]["future"] = None
    assert as_file(round_trip(data)) == as_file(data)
    folder = write(tmp_path / "db", data)
    manifest = load_manifest(folder)
    assert manifest.extra == {"future": {"anything": [1, 2]}}
    manifest.finish_stage("index")
    save_manifest(folder, manifest)
    assert manifest_path(folder).read_text() == as_file(data)


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["chunks"]["blocks"][0].pop("sha256"),
        lambda m: m.pop("neighbours"),
        lambda m: m["embeddings"].update(blocks=[]),
        lambda m: m["neighbours"]["blocks"].update(first={}),
    ],
    ids=["no block sha256", "no neighbours", "blocks not an object", "block id not a number"],
)
def test_a_manifest_missing_a_part_is_refused_as_corrupt(damage, tmp_path):
    data = copy.deepcopy(OLD_FORMAT)
    damage(data)
    folder = write(tmp_path / "db", data)
    with pytest.raises(CorruptArtifactError, match="not a complete retrolm database manifest"):
        load_manifest(folder)


# ----------------------------------------------------------------------------- what stages do


def test_finish_block_records_a_block_as_the_file_holds_it():
    manifest = Manifest.from_json(copy.deepcopy(OLD_FORMAT))
    written = NeighbourBlock(
        ids_file="neighbours/ids-000002.npy",
        ids_sha256=SHA,
        dists_file="neighbours/dists-000002.npy",
        dists_sha256=SHA,
        rows=0,
    )
    manifest.finish_block("neighbours", 2, written)
    blocks = manifest.to_json()["neighbours"]["blocks"]
    assert list(blocks) == ["0", "1", "2"]
    assert blocks["2"] == {
        "ids_file": "neighbours/ids-000002.npy",
        "ids_sha256": SHA,
        "dists_file": "neighbours/dists-000002.npy",
        "dists_sha256": SHA,
        "rows": 0,
    }
    with pytest.raises(TypeError, match="NeighbourBlock"):
        manifest.finish_block("neighbours", 3, BlockFile(file="x", sha256=SHA, rows=1))


def test_reset_from_forgets_what_the_stages_from_there_wrote():
    config = DatabaseConfig(**{**SETTINGS, "index": "Flat", "neighbours": 8})
    for stage, kept in [
        ("neighbours", ("tokenizer", "chunks", "embeddings", "index")),
        ("index", ("tokenizer", "chunks", "embeddings")),
        ("embeddings", ("tokenizer", "chunks")),
    ]:
        manifest = Manifest.from_json(copy.deepcopy(OLD_FORMAT))
        manifest.reset_from(stage, config)
        data = manifest.to_json()
        for part in kept:
            assert data[part] == OLD_FORMAT[part], (stage, part)
        assert data["neighbours"] == {"k": 8, "blocks": {}}
        assert data["settings"] == config.content_settings()
        assert data["fingerprint"] == fingerprint(config.content_settings())
        if "index" not in kept:
            assert data["index"] is None
        if "embeddings" not in kept:
            assert data["embeddings"] == {"spec": None, "dim": None, "metric": None, "blocks": {}}
        assert list(data) == list(OLD_FORMAT)
    manifest = Manifest.from_json(copy.deepcopy(OLD_FORMAT))
    manifest.reset_from("tokenizer", config)
    data = manifest.to_json()
    assert data["tokenizer"] is None and data["chunks"]["blocks"] == []
    assert data["chunks"]["documents_file"] == "documents.jsonl"  # rewritten with the chunks
    assert [s for s in data["sources"]] == [
        {k: v for k, v in s.items() if k != "end_cursor"} | {"done": False}
        for s in OLD_FORMAT["sources"]
    ]
    assert not any(data["stages"].values())


def test_a_source_appended_then_undone_leaves_the_manifest_as_it_was():
    manifest = Manifest.from_json(copy.deepcopy(OLD_FORMAT))
    manifest.append_source(["new"], retrieval_only=True)
    data = manifest.to_json()
    assert data["sources"][-1] == {
        "inputs": ["new"],
        "first_event": 48,
        "done": False,
        "retrieval_only": True,
    }
    assert data["stages"] == {
        "tokenizer": True,
        "chunks": False,
        "embeddings": False,
        "index": False,
        "neighbours": False,
    }
    assert manifest.unfinished() == ["chunks", "embeddings", "index", "neighbours"]
    manifest.undo_last_source()
    assert as_file(manifest.to_json()) == as_file(OLD_FORMAT)


def test_dropping_chunk_blocks_redoes_their_sources_and_the_stages_that_need_them():
    manifest = Manifest.from_json(copy.deepcopy(OLD_FORMAT))
    manifest.drop_chunk_blocks(1)
    assert [b.index for b in manifest.chunks.blocks] == [0]
    assert [s.done for s in manifest.sources] == [True, False, False]
    assert manifest.unfinished() == ["chunks", "index", "neighbours"]
    # the chunk stream resumes after the last block of the source, else after the source before
    assert manifest.resume_cursor(0) == Cursor(**OLD_FORMAT["chunks"]["blocks"][0]["cursor"])
    assert manifest.resume_cursor(1) == Cursor(**OLD_FORMAT["sources"][0]["end_cursor"])
    resumed = manifest.resume_cursor(1)
    resumed.skipped["duplicate"] = 1  # the writer's own copy
    assert "duplicate" not in manifest.sources[0].end_cursor.skipped


def test_install_index_replaces_the_index_and_ends_its_build():
    manifest = Manifest.from_json(copy.deepcopy(OLD_FORMAT))
    manifest.redo_stages("index")
    new = Manifest.from_json(copy.deepcopy(OLDEST_FORMAT)).index
    old = manifest.install_index(new)
    assert old.generation == 1 and manifest.index is new and manifest.is_done("index")
    data = manifest.to_json()
    assert "index_build" not in data and data["index"] == OLDEST_FORMAT["index"]


def test_refresh_rereads_the_file_into_the_same_object(tmp_path):
    folder = write(tmp_path / "db", OLD_FORMAT)
    mine, theirs = load_manifest(folder), load_manifest(folder)
    theirs.neighbours.k = 9
    theirs.redo_stages("neighbours")
    save_manifest(folder, theirs)
    held = mine
    mine.refresh(folder)
    assert held is mine and mine == theirs and not mine.is_done("neighbours")


# ----------------------------------------------------------------------------- real databases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    bert = make_tiny_bert(root / "bert")
    corpus = make_corpus(root / "corpus", 24, seed=5)
    extra = make_corpus(root / "extra", 5, seed=6, prefix="ref")
    more = make_corpus(root / "more", 5, seed=7, prefix="new")
    return root, bert, corpus, extra, more


def test_the_manifests_a_build_writes_save_back_byte_for_byte(inputs, tmp_path):
    root, bert, corpus, extra, more = inputs
    config = tiny_config(bert, block_rows=25, index="IVF4,Flat")
    half = chunk_stage([corpus], tmp_path / "half", config, show_progress=False)
    assert_saved_unchanged(half)  # mid-build: stages after the chunks not done
    folder = build_database(
        [corpus], tmp_path / "db", config, retrieval_only=[extra], show_progress=False
    )
    assert_saved_unchanged(folder)
    add_documents(folder, [more], show_progress=False)
    assert_saved_unchanged(folder)
    data = json.loads(manifest_path(folder).read_text(encoding="utf-8"))
    assert as_file(round_trip(data)) == as_file(data)
    assert [list(s) for s in data["sources"]] == [
        ["inputs", "first_event", "done", "end_cursor"],
        ["inputs", "first_event", "done", "retrieval_only", "end_cursor"],
        ["inputs", "first_event", "done", "first_documents", "end_cursor"],
    ]
    assert data["index"]["generation"] == 1 and "index_build" not in data
    bm25 = build_database(
        [corpus], tmp_path / "bm25", tiny_config(bert, retriever="bm25"), show_progress=False
    )
    assert_saved_unchanged(bm25)
    assert "sha256" not in json.loads(manifest_path(bm25).read_text())["index"]
