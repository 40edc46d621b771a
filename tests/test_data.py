"""Samples, the leakage rule, and the resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest

from retrolm.data import ArrayChunkSource, ResumableSampler, RetroSamples, filter_neighbours

M = 4  # chunk size


def make_source(seed: int = 0, num_docs: int = 12, stored_k: int = 6) -> ArrayChunkSource:
    """Documents of 1-5 chunks; every stored neighbour list mixes all documents (leaky)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, num_docs)
    chunk_doc = np.repeat(np.arange(num_docs), sizes)
    n = len(chunk_doc)
    tokens = rng.integers(1, 50, (n, M))
    tokens[np.r_[np.flatnonzero(np.diff(chunk_doc)), n - 1], -1] = 0  # padded tails
    split = np.where(np.isin(chunk_doc, [3, 7]), "valid", "train")
    train_ids = np.flatnonzero(split == "train")
    stored = np.stack([rng.choice(train_ids, stored_k, replace=False) for _ in range(n)])
    for i in range(n):  # stored neighbours never come from the chunk's own document
        stored[i] = np.where(chunk_doc[stored[i]] == chunk_doc[i], -1, stored[i])
    return ArrayChunkSource(tokens, chunk_doc, split, stored.astype(np.int64), pad_id=0)


def test_samples_are_chunk_aligned_and_targets_shifted():
    src = make_source()
    ds = RetroSamples(src, "train", seq_len=3 * M, num_neighbours=2)
    train_ids = src.split_chunk_ids("train")
    flat = src.tokens[train_ids].reshape(-1)
    batch = ds.get(np.arange(len(ds)))
    for i in range(len(ds)):
        start = i * 3 * M
        assert batch.tokens[i].tolist() == flat[start : start + 3 * M].tolist()
        nxt = flat[start + 3 * M] if start + 3 * M < len(flat) else 0
        assert batch.targets[i].tolist() == flat[start + 1 : start + 3 * M].tolist() + [nxt]
    assert batch.neighbours.shape == (len(ds), 3, 2, 2 * M)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_neighbour_from_a_document_of_the_sample(seed):
    src = make_source(seed)
    ds = RetroSamples(src, "train", seq_len=2 * M, num_neighbours=3)
    idx = np.arange(len(ds))
    batch = ds.get(idx)
    window = ds.window_ids(idx)
    seen_neighbour = False
    for i in range(len(ds)):
        docs = set(src.chunk_doc[window[i][window[i] >= 0]].tolist())
        for c in range(2):
            chosen = batch.neighbour_ids[i, c]
            stored = src.stored_neighbours[window[i, c]]
            allowed = [s for s in stored if s >= 0 and src.chunk_doc[s] not in docs]
            # the first k allowed, in stored order, then -1
            expect = (allowed + [-1] * 3)[:3]
            assert chosen.tolist() == expect
            for j, nid in enumerate(chosen):
                if nid < 0:
                    assert (batch.neighbours[i, c, j] == 0).all()
                else:
                    seen_neighbour = True
                    assert src.chunk_doc[nid] not in docs
                    assert batch.neighbours[i, c, j, :M].tolist() == src.tokens[nid].tolist()
    assert seen_neighbour


def test_filter_neighbours_counts_the_document_of_the_last_target():
    stored = np.array([[[5, 6, 7]]])
    stored_doc = np.array([[[1, 2, 3]]])
    # doc 2 contributes only the last target (the extra chunk) -> still excluded
    out = filter_neighbours(stored, stored_doc, np.array([[0, 2]]), k=2)
    assert out.tolist() == [[[5, 7]]]
    out = filter_neighbours(stored, stored_doc, np.array([[1, 2, 3]]), k=2)
    assert out.tolist() == [[[-1, -1]]]


def test_valid_split_and_no_retrieval():
    src = make_source()
    ds = RetroSamples(src, "valid", seq_len=M, num_neighbours=0)
    assert len(ds) == len(src.split_chunk_ids("valid"))
    batch = ds.get([0])
    assert batch.neighbours is None


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        RetroSamples(make_source(), "train", seq_len=M + 1, num_neighbours=1)


def test_sampler_resume_yields_same_batches():
    a = ResumableSampler(37, 8, seed=3, grad_accum=2)
    ref = [a.next_step() for _ in range(12)]  # crosses epochs (4 steps per epoch)
    b = ResumableSampler(37, 8, seed=3, grad_accum=2)
    for _ in range(5):
        b.next_step()
    state = b.state_dict()
    c = ResumableSampler(37, 8, seed=3, grad_accum=2)
    c.load_state_dict(state)
    rest = [c.next_step() for _ in range(7)]
    for x, y in zip(ref[5:], rest):
        assert [u.tolist() for u in x] == [v.tolist() for v in y]
    # epochs differ in order, each epoch has no repeats
    e0 = np.concatenate([np.concatenate(s) for s in ref[:4]])
    e1 = np.concatenate([np.concatenate(s) for s in ref[4:8]])
    assert len(set(e0.tolist())) == 32 and e0.tolist() != e1.tolist()


def test_sampler_ranks_partition_the_global_batch():
    single = ResumableSampler(40, 8, seed=1)
    ranks = [ResumableSampler(40, 8, seed=1, rank=r, world_size=2, grad_accum=2) for r in (0, 1)]
    for _ in range(6):
        whole = np.concatenate(single.next_step())
        parts = [np.concatenate(s.next_step()) for s in ranks]
        assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())
        assert not set(parts[0].tolist()) & set(parts[1].tolist())


def test_sampler_bad_settings():
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(40, 6, world_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(3, 8)
    s = ResumableSampler(40, 8, seed=1)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict(ResumableSampler(40, 8, seed=2).state_dict())
