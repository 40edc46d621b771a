"""Building and reading a retrieval database with a tiny deterministic BERT embedder."""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrolm.cli import main as cli_main
from retrolm.database import Database, DatabaseConfig, add_documents, build_database
from retrolm.database.embed import make_tiny_bert
from retrolm.errors import CorruptArtifactError, InputError, MismatchError

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "def",
    "return",
    "import",
    "class",
    "self",
]


def make_corpus(folder: Path, n_docs: int, seed: int, prefix: str = "doc") -> Path:
    """Random documents of 5..300 words, plus one binary and one empty file."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300)))
        (folder / f"{prefix}{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    (folder / "zz.bin").write_bytes(b"\x00\x01binary")
    (folder / "zz-empty.txt").write_text("", encoding="utf-8")
    return folder


def tiny_config(bert: Path, **kw) -> DatabaseConfig:
    base = dict(
        vocab_size=300,
        chunk_size=16,
        block_rows=40,
        embedder=f"bert-mean:{bert}",
        valid_fraction=0.2,
        neighbours=4,
        embed_batch_size=64,
    )
    return DatabaseConfig(**{**base, **kw})


def arrays(folder: Path) -> dict[str, bytes]:
    """Every block file's bytes, by relative path (what must be identical across runs)."""
    out = {}
    for sub in ("chunks", "embeddings", "neighbours"):
        for p in sorted((folder / sub).glob("*")):
            out[f"{sub}/{p.name}"] = p.read_bytes()
    out["documents.jsonl"] = (folder / "documents.jsonl").read_bytes()
    out["chunk_doc.npy"] = (folder / "chunk_doc.npy").read_bytes()
    out["tokenizer.json"] = (folder / "tokenizer.json").read_bytes()
    return out


@pytest.fixture(autouse=True)
def keep_logging():
    # the CLI's setup_logging sets the level and stops propagation (caplog needs it): undo it
    logger = logging.getLogger("retrolm")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    bert = make_tiny_bert(root / "bert")
    corpus = make_corpus(root / "corpus", 30, seed=1)
    folder = build_database([corpus], root / "db", tiny_config(bert), show_progress=False)
    return root, bert, corpus, folder


@pytest.fixture(scope="module")
def db(setup):
    return Database.open(setup[3])


def test_documents_and_chunks_give_back_the_exact_texts(setup, db):
    _, _, corpus, _ = setup
    assert len(db.documents) == 30 and db.manifest.counts.skipped == {"binary": 1, "empty": 1}
    assert db.num_chunks == sum(d.num_chunks for d in db.documents)
    for doc in db.documents:
        ids = np.arange(doc.first_chunk, doc.first_chunk + doc.num_chunks)
        assert (db.chunk_doc[ids] == doc.index).all()
        stream = db.chunk_tokens(ids).reshape(-1)
        eos = np.flatnonzero(stream == db.tokenizer.eos_id)
        assert len(eos) == 1 and (stream[eos[0] + 1 :] == db.pad_id).all()  # padded tail only
        assert len(stream) - eos[0] - 1 < db.chunk_size  # padding fits in the last chunk
        assert db.tokenizer.decode(stream) == Path(doc.name).read_text(encoding="utf-8")
    assert all(len(b) == 40 for b in db._tokens[:-1])  # fixed-size blocks, last one shorter


def test_splits_partition_the_chunks(db):
    train, valid = db.split_chunk_ids("train"), db.split_chunk_ids("valid")
    assert len(valid) > 0 and len(train) > 0
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(db.num_chunks))
    valid_docs = {d.index for d in db.documents if d.split == "valid"}
    assert set(db.chunk_doc[valid].tolist()) == valid_docs
    assert db.manifest.counts.train_chunks == len(train)


def test_neighbours_are_exact_train_chunks_of_other_documents(db):
    all_ids = np.arange(db.num_chunks)
    ids, dists = db.neighbours(all_ids)
    assert ids.shape == (db.num_chunks, 4) and dists.dtype == np.float32
    train = db.split_chunk_ids("train")
    assert (ids >= 0).all()  # plenty of train chunks in other documents
    assert np.isin(ids, train).all()  # the index holds train chunks only
    assert (db.chunk_doc[ids] != db.chunk_doc[all_ids][:, None]).all()  # never the own document
    # brute force over the stored embeddings, same-document candidates removed
    vectors = np.concatenate(
        [np.load(db.path / r.file) for r in db.manifest.embeddings.blocks.values()]
    ).astype(np.float32)
    d2 = ((vectors[:, None, :] - vectors[None, train, :]) ** 2).sum(-1)
    d2[db.chunk_doc[all_ids][:, None] == db.chunk_doc[train][None, :]] = np.inf
    expected = np.sort(d2, axis=1)[:, :4]
    np.testing.assert_allclose(dists, expected, rtol=1e-4, atol=1e-5)


def test_neighbour_tokens_continue_within_the_document_only(db):
    m = db.chunk_size
    ids = np.arange(db.num_chunks)
    tokens = db.neighbour_tokens(ids[:, None])[:, 0]  # (n, 2m)
    assert np.array_equal(tokens[:, :m], db.chunk_tokens(ids))
    for doc in db.documents:
        last = doc.first_chunk + doc.num_chunks - 1
        assert (tokens[last, m:] == db.pad_id).all()  # never the next document's first chunk
        if doc.num_chunks > 1:
            assert np.array_equal(
                tokens[doc.first_chunk, m:], db.chunk_tokens(np.array([doc.first_chunk + 1]))[0]
            )
    missing = db.neighbour_tokens(np.array([[-1, 0]]))
    assert missing.shape == (1, 2, 2 * m) and (missing[0, 0] == db.pad_id).all()


def test_fewer_train_chunks_than_k_give_minus_one(setup, tmp_path):
    root, bert, _, _ = setup
    corpus = tmp_path / "small"
    corpus.mkdir()
    for i, text in enumerate(["alpha beta", "gamma delta", "epsilon zeta"]):
        (corpus / f"d{i}.txt").write_text(text, encoding="utf-8")
    folder = build_database(
        [corpus],
        tmp_path / "db",
        tiny_config(bert, valid_fraction=0.0, neighbours=5),
        show_progress=False,
    )
    small = Database.open(folder)
    ids, dists = small.neighbours(np.arange(small.num_chunks))
    assert (ids[:, :2] >= 0).all() and (ids[:, 2:] == -1).all()  # 2 other documents, 1 chunk each
    assert np.isinf(dists[:, 2:]).all()


def test_live_search_finds_a_stored_chunk(db):
    chunk = db.chunk_tokens(np.array([5]))
    ids, dists = db.search_chunks(chunk, 3)
    assert ids.shape == (1, 3)
    if db.chunk_doc[5] in set(db.chunk_doc[db.split_chunk_ids("train")].tolist()):
        assert ids[0, 0] == 5 and dists[0, 0] == pytest.approx(0.0, abs=1e-3)
    out = db.neighbours_for(torch.from_numpy(chunk[0]), 2)
    assert out.shape == (2, 2 * db.chunk_size)
    assert np.array_equal(out, db.neighbour_tokens(ids[:, :2])[0])
    hits = db.search([db.chunk_text(7)], k=2)[0]
    assert len(hits) == 2 and hits[0].document_name.endswith(".txt") and hits[0].text


def test_rerun_of_a_finished_build_changes_nothing(setup):
    root, bert, corpus, folder = setup
    before = arrays(folder)
    build_database([corpus], folder, tiny_config(bert), show_progress=False)
    assert arrays(folder) == before


def test_different_settings_are_refused_naming_the_setting(setup, db):
    root, bert, corpus, folder = setup
    with pytest.raises(MismatchError, match=r"chunk_size: database has 16, requested 32"):
        build_database([corpus], folder, tiny_config(bert, chunk_size=32), show_progress=False)
    with pytest.raises(MismatchError, match="embedder"):
        build_database([corpus], folder, tiny_config(bert, embedder="default"), show_progress=False)
    with pytest.raises(MismatchError, match="chunk_size"):
        Database.open(folder, expect={"chunk_size": 64})
    with pytest.raises(MismatchError, match="tokenizer_sha256"):
        Database.open(folder, expect={"tokenizer_sha256": "0" * 64})
    Database.open(folder, expect={"chunk_size": 16, "tokenizer_sha256": db.tokenizer.sha256})


def test_corrupted_and_truncated_blocks_are_detected_and_rebuilt(setup, tmp_path):
    root, bert, corpus, folder = setup
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    before = arrays(copy)
    token_block = copy / "chunks" / "tokens-000001.npy"
    data = bytearray(token_block.read_bytes())
    data[-5] ^= 0xFF
    token_block.write_bytes(bytes(data))
    emb = copy / "embeddings" / "emb-000002.npy"
    emb.write_bytes(emb.read_bytes()[:-64])  # truncated
    with pytest.raises(CorruptArtifactError, match="tokens-000001"):
        Database.open(copy, verify=True)
    build_database([corpus], copy, tiny_config(bert), show_progress=False)
    assert arrays(copy) == before
    neighbour_block = copy / "neighbours" / "ids-000000.npy"
    neighbour_block.write_bytes(neighbour_block.read_bytes()[:100])
    with pytest.raises(CorruptArtifactError, match="ids-000000"):
        Database.open(copy)
    build_database([corpus], copy, tiny_config(bert), show_progress=False)
    assert arrays(copy) == before


def test_add_documents_appends_without_rebuild(setup, tmp_path):
    root, bert, corpus, folder = setup
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    old = Database.open(copy)
    extra = make_corpus(tmp_path / "extra", 8, seed=2, prefix="new")
    add_documents(copy, [extra], show_progress=False)
    new = Database.open(copy)
    assert len(new.documents) == 38 and new.num_chunks > old.num_chunks
    assert np.array_equal(
        new.chunk_tokens(np.arange(old.num_chunks)), old.chunk_tokens(np.arange(old.num_chunks))
    )
    assert new.tokenizer.sha256 == old.tokenizer.sha256
    added = np.arange(old.num_chunks, new.num_chunks)
    for doc in new.documents[30:]:
        assert doc.name.startswith(extra.as_posix())
        ids = np.arange(doc.first_chunk, doc.first_chunk + doc.num_chunks)
        assert new.tokenizer.decode(new.chunk_tokens(ids).reshape(-1)) == Path(doc.name).read_text(
            encoding="utf-8"
        )
    ids, _ = new.neighbours(added)
    assert (new.chunk_doc[ids] != new.chunk_doc[added][:, None]).all()
    new_train = np.intersect1d(new.split_chunk_ids("train"), added)
    assert new.manifest.index.ntotal == old.manifest.index.ntotal + len(new_train)
    assert not (copy / old.manifest.index.file).exists()  # the replaced index is removed
    before = arrays(copy)
    assert add_documents(copy, [extra], show_progress=False) == copy  # a rerun: nothing to do
    assert arrays(copy) == before
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(InputError, match=r"yielded no documents \(1 binary\); nothing was added"):
        add_documents(copy, [junk], show_progress=False)
    after = Database.open(copy)  # still complete and unchanged
    assert (
        len(after.documents) == 38 and after.manifest.counts.skipped == new.manifest.counts.skipped
    )


def test_bm25_retriever(setup, tmp_path):
    root, bert, corpus, _ = setup
    folder = build_database(
        [corpus], tmp_path / "db", tiny_config(bert, retriever="bm25"), show_progress=False
    )
    db = Database.open(folder)
    assert not (folder / "embeddings").exists() or not any((folder / "embeddings").iterdir())
    all_ids = np.arange(db.num_chunks)
    ids, scores = db.neighbours(all_ids)
    found = ids >= 0
    assert found.any()
    assert np.isin(ids[found], db.split_chunk_ids("train")).all()
    assert (db.chunk_doc[ids] != db.chunk_doc[all_ids][:, None])[found].all()
    assert (np.diff(np.where(found, scores, -1e30), axis=1) <= 1e-6).all()  # best first
    hits = db.search(db.chunk_text(3), k=2)[0]
    assert hits and hits[0].chunk_id >= 0


def test_corpus_without_documents_is_an_input_error(setup, tmp_path, capsys):
    _, bert, _, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.bin").write_bytes(b"\x00\x00")
    with pytest.raises(InputError, match=r"yielded no documents \(1 binary\)"):
        build_database([empty], tmp_path / "db", tiny_config(bert), show_progress=False)
    code = cli_main(["db", "build", str(empty), "--out", str(tmp_path / "db2"), "--no-progress"])
    assert code == 2 and "yielded no documents" in capsys.readouterr().err
    code = cli_main(
        ["db", "build", str(empty), "--out", str(tmp_path / "db3"), "--strict", "--no-progress"]
    )
    assert code == 2 and "a.bin: binary" in capsys.readouterr().err


def test_a_build_that_found_no_documents_leaves_nothing_behind(setup, tmp_path):
    corpus, bert, _, _ = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.bin").write_bytes(b"\x00\x00")
    out = tmp_path / "db"
    with pytest.raises(InputError, match="yielded no documents"):
        build_database([empty], out, tiny_config(bert), show_progress=False)
    assert not out.exists() or not any(out.iterdir())
    # so the corrected command, even with other settings, builds into the same folder
    build_database([corpus], out, tiny_config(bert, retriever="bm25"), show_progress=False)
    assert Database.open(out).num_chunks > 0


def test_open_refuses_non_databases_and_unfinished_ones(setup, tmp_path, capsys):
    _, bert, corpus, _ = setup
    with pytest.raises(InputError, match="not a retrolm database"):
        Database.open(tmp_path)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(InputError, match="not a retrolm database; choose an empty"):
        build_database([corpus], tmp_path, tiny_config(bert), show_progress=False)
    from retrolm.database import chunk_stage

    folder = chunk_stage([corpus], tmp_path / "half", tiny_config(bert), show_progress=False)
    with pytest.raises(InputError, match="unfinished"):
        Database.open(folder)
    assert cli_main(["db", "info", str(folder)]) == 0  # info works mid-build
    assert "embeddings NOT done" in capsys.readouterr().out
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifactError, match="format version 99"):
        Database.open(folder)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="chunk_size"):
        DatabaseConfig(chunk_size=0)
    with pytest.raises(ValueError, match="retriever"):
        DatabaseConfig(retriever="sparse")
    with pytest.raises(ValueError, match="index_memory"):
        DatabaseConfig(index_memory="lots")
    cfg = DatabaseConfig(index_memory="2G")
    assert cfg.index_memory == 2 << 30
    assert DatabaseConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_info_search_and_help(setup, capsys):
    folder = setup[3]
    assert cli_main(["db", "info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["documents"] == 30 and info["stages"]["neighbours"]
    assert cli_main(["db", "info", str(folder)]) == 0
    assert "documents  30" in capsys.readouterr().out
    assert cli_main(["db", "search", str(folder), "alpha beta gamma", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {"chunk_id", "document_name", "score", "text"} <= set(hits[0])
    assert cli_main(["db", "search", str(folder), "  "]) == 2
    assert cli_main(["db"]) == 2
    assert cli_main(["db", "info", str(folder.parent / "nowhere")]) == 2
    for sub in ("build", "chunk", "embed", "index", "neighbours", "add", "info", "search"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["db", sub, "--help"])
        assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["db", "build", "c", "--out", "d", "--retriever", "sparse"])
    assert exit_info.value.code == 2
    assert cli_main(["db", "build", "c", "--out", "d", "--chunk-size", "0"]) == 2
    assert "chunk_size must be" in capsys.readouterr().err
    out = subprocess.run(
        [sys.executable, "-m", "retrolm", "db", "build", "--help"], capture_output=True, text=True
    )
    assert (
        out.returncode == 0 and "--valid-fraction" in out.stdout and "--index-memory" in out.stdout
    )


def test_stages_run_one_by_one_equal_a_full_build(setup, tmp_path):
    from retrolm.database import chunk_stage, embed_stage, index_stage, neighbours_stage

    root, bert, corpus, folder = setup
    out = chunk_stage([corpus], tmp_path / "db", tiny_config(bert), show_progress=False)
    with pytest.raises(InputError, match="no finished embeddings stage"):
        index_stage(out, show_progress=False)
    embed_stage(out, overrides={"embed_batch_size": 64}, show_progress=False)
    index_stage(out, show_progress=False)
    neighbours_stage(out, show_progress=False)
    assert arrays(out) == arrays(folder)
    with pytest.raises(MismatchError, match="chunk_size"):
        embed_stage(out, overrides={"chunk_size": 8}, show_progress=False)


def test_trained_index_factory_uses_a_seeded_sample(setup, tmp_path):
    root, bert, corpus, _ = setup
    config = tiny_config(bert, index="IVF4,Flat", index_train_size=200)
    db = Database.open(build_database([corpus], tmp_path / "db", config, show_progress=False))
    assert db.manifest.index.factory == "IVF4,Flat"
    assert db.manifest.index.search_params["nprobe"] == 4  # all cells: exact
    ids, _ = db.neighbours(np.arange(db.num_chunks))
    assert (db.chunk_doc[ids] != db.chunk_doc[np.arange(db.num_chunks)][:, None]).all()


def test_compressed_index_reranks_with_the_stored_embeddings(setup, tmp_path):
    """A PQ-coded database records k_factor; its stored neighbours carry the exact distances of
    the stored embeddings (re-ranked), and they are nearly the brute-force neighbours."""
    root, bert, corpus, _ = setup
    config = tiny_config(bert, index="IVF4,PQ4x4", index_train_size=200)
    db = Database.open(build_database([corpus], tmp_path / "db", config, show_progress=False))
    assert db.manifest.index.search_params["k_factor"] == 4
    all_ids = np.arange(db.num_chunks)
    ids, dists = db.neighbours(all_ids)
    vectors = np.concatenate(
        [np.load(db.path / r.file) for r in db.manifest.embeddings.blocks.values()]
    ).astype(np.float32)
    exact = ((vectors[all_ids][:, None, :] - vectors[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, exact, rtol=1e-4, atol=1e-5)
    train = db.split_chunk_ids("train")
    d2 = ((vectors[:, None, :] - vectors[None, train, :]) ** 2).sum(-1)
    d2[db.chunk_doc[all_ids][:, None] == db.chunk_doc[train][None, :]] = np.inf
    truth = train[np.argsort(d2, axis=1, kind="stable")[:, :4]]
    from retrolm.database.index import recall_at_k

    assert recall_at_k(ids, truth) >= 0.9


def test_interrupted_add_resumes_to_the_same_database(setup, tmp_path, monkeypatch):
    import retrolm.database.build as build_module

    root, bert, corpus, folder = setup
    extra = make_corpus(tmp_path / "extra", 6, seed=4, prefix="more")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(folder, straight)
    shutil.copytree(folder, resumed)
    add_documents(straight, [extra], show_progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed after the new chunks and embeddings

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "_run_index", interrupted)
        with pytest.raises(KeyboardInterrupt):
            add_documents(resumed, [extra], show_progress=False)
    with pytest.raises(InputError, match="unfinished"):
        Database.open(resumed)
    other = make_corpus(tmp_path / "other", 2, seed=5, prefix="x")
    with pytest.raises(InputError, match="unfinished"):
        add_documents(resumed, [other], show_progress=False)  # finish the first add first
    add_documents(resumed, [extra], show_progress=False)
    assert arrays(resumed) == arrays(straight)
    assert Database.open(resumed).num_chunks == Database.open(straight).num_chunks


def test_build_killed_in_the_index_kmeans_resumes_it_where_it_stopped(setup, tmp_path, monkeypatch):
    """The index's k-means is the longest step of a large build (hours at 16M chunks): a build
    killed in it reruns only the iterations after its last checkpoint, gives the database of an
    uninterrupted build, and leaves no checkpoint behind."""
    from retrolm.database import index as ix
    from tests.test_index import Killed, _kill_after_saves

    _, bert, corpus, _ = setup
    config = tiny_config(bert, index="IVF8,Flat")
    straight = build_database([corpus], tmp_path / "straight", config, show_progress=False)
    saved = _kill_after_saves(monkeypatch, 4)  # as if killed right after the fourth iteration
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        build_database([corpus], resumed, config, show_progress=False)
    assert [p.name for p in (resumed / "index").glob("kmeans-*")] == ["kmeans-0000.npz"]
    build_database([corpus], resumed, config, show_progress=False)
    assert saved == list(range(1, ix.KMEANS_ITERATIONS + 1))  # 1-4, then 5-10 in the rerun
    assert arrays(resumed) == arrays(straight)
    assert not list((resumed / "index").glob("kmeans-*"))


def test_pickled_database_reopens_its_files(db):
    import pickle

    data = pickle.dumps(db)
    assert len(data) < 1000  # the path, not the arrays
    again = pickle.loads(data)
    ids = np.arange(db.num_chunks)
    assert np.array_equal(again.chunk_tokens(ids), db.chunk_tokens(ids))
    assert np.array_equal(again.neighbours(ids)[0], db.neighbours(ids)[0])


def test_retrieval_only_documents_are_indexed_but_never_trained_or_scored(setup, tmp_path):
    from retrolm.data import RetroSamples
    from retrolm.evaluate import split_stream

    root, bert, corpus, _ = setup
    # near-copies of the corpus under other names (a word added at the end, as exact copies
    # are skipped as duplicates): each train chunk but the last of its document then has an
    # exact twin that only the retrieval-only documents hold
    extra = tmp_path / "extra"
    shutil.copytree(corpus, extra)
    for path in extra.glob("doc*.txt"):
        path.write_text(path.read_text(encoding="utf-8") + "omega\n", encoding="utf-8")
    cfg = tiny_config(bert)
    folder = build_database(
        [corpus], tmp_path / "db", cfg, retrieval_only=[extra], show_progress=False
    )
    db = Database.open(folder)
    retrieval_docs = {d.index for d in db.documents if d.split == "retrieval"}
    assert len(retrieval_docs) == 30 and len(db.documents) == 60
    assert all(db.documents[i].name.startswith(extra.as_posix()) for i in retrieval_docs)
    train, valid = db.split_chunk_ids("train"), db.split_chunk_ids("valid")
    retrieval = db.split_chunk_ids("retrieval")
    assert np.array_equal(
        np.sort(np.concatenate([train, valid, retrieval])), np.arange(db.num_chunks)
    )
    counts = db.manifest.counts
    assert counts.retrieval_chunks == len(retrieval) and counts.valid_chunks == len(valid)
    assert db.manifest.index.ntotal == len(train) + len(retrieval)
    # never sampled for training, never scored in evaluation
    samples = RetroSamples(db, "train", seq_len=32, num_neighbours=2)
    windows = samples.window_ids(np.arange(len(samples)))
    assert not np.isin(windows, retrieval).any()
    assert not np.isin(split_stream(db, "valid", None), retrieval).any()
    # neighbours of train and valid chunks are exact over train + retrieval-only chunks
    queries = np.concatenate([train, valid])
    ids, dists = db.neighbours(queries)
    assert np.isin(ids, retrieval).mean() > 0.3  # the twins are found
    vectors = np.concatenate(
        [np.load(db.path / r.file) for r in db.manifest.embeddings.blocks.values()]
    ).astype(np.float32)
    indexed = np.concatenate([train, retrieval])
    d2 = ((vectors[queries][:, None, :] - vectors[None, indexed, :]) ** 2).sum(-1)
    d2[db.chunk_doc[queries][:, None] == db.chunk_doc[indexed][None, :]] = np.inf
    np.testing.assert_allclose(dists, np.sort(d2, axis=1)[:, :4], rtol=1e-4, atol=1e-5)
    # retrieval-only chunks are never queried: nothing reads their neighbours
    none, _ = db.neighbours(retrieval)
    assert (none == -1).all()
    # a rerun of the same command changes nothing; other retrieval-only inputs are refused
    before = arrays(folder)
    build_database([corpus], folder, cfg, retrieval_only=[extra], show_progress=False)
    assert arrays(folder) == before
    with pytest.raises(MismatchError, match="--retrieval-only"):
        build_database([corpus], folder, cfg, show_progress=False)


def test_cli_add_retrieval_only_and_info(setup, tmp_path, capsys):
    root, bert, corpus, folder = setup
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    extra = make_corpus(tmp_path / "extra", 6, seed=3, prefix="ref")
    assert cli_main(["-q", "db", "add", str(copy), "--retrieval-only", str(extra)]) == 0
    db = Database.open(copy)
    added = [d for d in db.documents if d.name.startswith(extra.as_posix())]
    assert len(added) == 6 and {d.split for d in added} == {"retrieval"}
    capsys.readouterr()
    assert cli_main(["db", "info", str(copy)]) == 0
    n = db.manifest.counts.retrieval_chunks
    assert n > 0 and f"{n} retrieval-only" in capsys.readouterr().out
    assert cli_main(["-q", "db", "add", str(copy)]) == 2
    assert "--retrieval-only" in capsys.readouterr().err


def test_gather_rows_reads_ids_in_the_order_asked_across_blocks(tmp_path):
    """What re-ranking reads: rows of memory-mapped blocks by global id, unsorted, repeated,
    from several blocks in one call, equal to indexing the blocks laid end to end."""
    from retrolm.database.store import gather_rows

    rng = np.random.default_rng(0)
    sizes = [5, 1, 7, 3]
    blocks = [rng.standard_normal((n, 4)).astype(np.float16) for n in sizes]
    for b, block in enumerate(blocks):
        np.save(tmp_path / f"b{b}.npy", block)
    starts = np.cumsum([0, *sizes[:-1]])
    opened = []

    def block_of(b):
        opened.append(b)
        return np.load(tmp_path / f"b{b}.npy", mmap_mode="r")

    read = []  # the rows each block was indexed with

    class Recorded:
        def __init__(self, array):
            self.array = array

        def __getitem__(self, rows):
            read.extend(int(r) for r in np.atleast_1d(rows))
            return self.array[rows]

    ids = np.array([15, 0, 5, 6, 15, 12, 3, 13, 0])
    got = gather_rows(lambda b: Recorded(block_of(b)), starts, ids, 4)
    np.testing.assert_array_equal(got, np.concatenate(blocks).astype(np.float32)[ids])
    assert sorted(opened) == [0, 1, 2, 3]  # each block hit opened once
    assert len(read) == len(set(ids.tolist()))  # each distinct row read once, not each ask
    assert gather_rows(block_of, starts, ids[:0], 4).shape == (0, 4)
