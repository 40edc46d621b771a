"""BM25 retrieval: rare terms find their chunk, -1 where nothing matches, atomic save/load, and
the same-document exclusion works over it."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.database.bm25 import BM25Index
from retrolm.database.neighbours import search_excluding_documents
from retrolm.errors import CorruptArtifactError, InputError

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a lazy afternoon with a brown dog in the sun",
    "zygomorphic flowers have bilateral symmetry",
    "def parse_config(path): return yaml.safe_load(open(path))",
    "the fox and the dog became friends",
    "symmetry groups describe crystals and flowers",
]
IDS = np.array([100, 101, 102, 103, 104, 105])


def test_rare_term_finds_its_chunk_and_misses_are_minus_one():
    bm25 = BM25Index.build(TEXTS, IDS)
    scores, ids = bm25.search(["zygomorphic", "parse_config yaml", "qwertyuiop", "the"], 3)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (4, 3)
    assert ids[0, 0] == 102 and (ids[0, 1:] == -1).all()  # one chunk holds the term
    assert ids[1, 0] == 103
    assert (ids[2] == -1).all() and (scores[2] == -np.inf).all()  # no shared term
    assert (ids[3] == -1).all()  # stop words alone match nothing
    assert scores[0, 0] > 0 and (scores[0, 1:] == -np.inf).all()
    # Several matches come best first.
    scores, ids = bm25.search(["lazy brown dog"], 6)
    assert set(ids[0, :3]) == {100, 101, 104} and (np.diff(scores[0, :3]) <= 0).all()


def test_k_larger_than_the_index():
    bm25 = BM25Index.build(TEXTS, IDS)
    scores, ids = bm25.search(["flowers"], 50)
    assert ids.shape == (1, 50) and set(ids[0, :2]) == {102, 105} and (ids[0, 2:] == -1).all()


def test_save_load_round_trip(tmp_path):
    bm25 = BM25Index.build(TEXTS, IDS)
    folder = tmp_path / "bm25"
    bm25.save(folder)
    assert not [p for p in tmp_path.iterdir() if p.name != "bm25"]  # no temporary left
    queries = ["fox dog", "symmetry", "yaml path", "nothing here"]
    for mmap in (False, True):
        loaded = BM25Index.load(folder, mmap=mmap)
        for a, b in zip(bm25.search(queries, 4), loaded.search(queries, 4)):
            np.testing.assert_array_equal(a, b)
    bm25.save(folder)  # overwriting a finished index is fine
    assert BM25Index.load(folder).ntotal == 6


def test_excluding_documents_over_bm25():
    bm25 = BM25Index.build(TEXTS, np.arange(6))
    chunk_doc = np.array([0, 1, 2, 3, 0, 2])  # chunks 0 and 4 are one document, 2 and 5 another
    queries = ["the fox and the dog", "flowers symmetry"]
    ids, scores = search_excluding_documents(
        bm25.search_fn(queries), 2, np.array([0, 2]), chunk_doc, k=2, max_k=6, metric="bm25"
    )
    assert ids[0, 0] == 1 and ids[0, 1] == -1  # 0 and 4 are its own; 1 shares "dog"
    assert (ids[1] == -1).all() and (scores[1] == -np.inf).all()


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="3 texts but 2 ids"):
        BM25Index.build(TEXTS[:3], IDS[:2])
    with pytest.raises(InputError, match="no texts"):
        BM25Index.build([], [])
    with pytest.raises(InputError, match="no BM25 index"):
        BM25Index.load(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    with pytest.raises(CorruptArtifactError, match="not a readable BM25 index"):
        BM25Index.load(tmp_path / "broken")
    BM25Index.build(TEXTS, IDS).save(tmp_path / "ok")
    np.save(tmp_path / "ok" / "ids.npy", IDS[:3])
    with pytest.raises(CorruptArtifactError, match="ids.npy has 3 entries"):
        BM25Index.load(tmp_path / "ok")
