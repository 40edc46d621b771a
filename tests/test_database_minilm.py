"""The real default embedder (all-MiniLM-L6-v2, offline) on ~100 standard-library files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from retrolm.database import Database, DatabaseConfig, build_database


@pytest.mark.slow
def test_default_embedder_database_on_stdlib_files(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # 100 modules of 2-12 kB (about 3000 chunks), so the test takes minutes, not tens of them
    skip = {"site-packages", "test", "tests", "idle_test"}
    candidates = sorted(
        f for f in stdlib.rglob("*.py") if not skip & set(f.relative_to(stdlib).parts)
    )
    files = [f for f in candidates if 2_000 <= f.stat().st_size <= 12_000][:100]
    assert len(files) == 100
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in files:
        (corpus / "_".join(f.relative_to(stdlib).parts)).write_bytes(f.read_bytes())
    config = DatabaseConfig(vocab_size=2048, block_rows=1024, valid_fraction=0.1)
    folder = build_database([corpus], tmp_path / "db", config, show_progress=False)
    db = Database.open(folder, verify=True)
    assert db.manifest.embeddings.spec == "default" and db.manifest.embeddings.dim == 384
    assert db.manifest.index.metric == "ip"  # normalized sentence embeddings
    all_ids = np.arange(db.num_chunks)
    ids, sims = db.neighbours(all_ids)
    assert (ids >= 0).all() and np.isin(ids, db.split_chunk_ids("train")).all()
    assert (db.chunk_doc[ids] != db.chunk_doc[all_ids][:, None]).all()
    assert (np.diff(sims, axis=1) <= 1e-5).all()  # most similar first
    # a train chunk's own text finds that chunk first, with cosine similarity ~1
    chunk = int(db.split_chunk_ids("train")[len(db.split_chunk_ids("train")) // 2])
    hit = db.search(db.chunk_text(chunk), k=1)[0][0]
    assert hit.chunk_id == chunk and hit.score == pytest.approx(1.0, abs=1e-2)
    for doc in db.documents[:20]:
        tokens = db.chunk_tokens(np.arange(doc.first_chunk, doc.first_chunk + doc.num_chunks))
        assert db.tokenizer.decode(tokens.reshape(-1)) == Path(doc.name).read_text(encoding="utf-8")
