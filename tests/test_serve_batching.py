"""Batched decoding (`RETRO.decode_rows` through `BatchDecoder`): each sequence in a batch gives
what it gives alone with `RETRO.generate`, whatever joins, leaves or slides past the window."""

from __future__ import annotations

import pytest
import torch

from retrolm.config import RetroConfig
from retrolm.serve.batch import BatchDecoder, Sequence
from tests.test_generate_window import WINDOW_CONFIGS
from tests.test_model_generate import TableRetriever, make_model

CONFIGS = {
    **WINDOW_CONFIGS,
    "baseline": RetroConfig.preset("tiny", cca_layers=(), max_seq_len=32),
}


def batch_retrieve(table: TableRetriever):
    return lambda chunks: table(torch.from_numpy(chunks))


def run_batched(decoder: BatchDecoder, seqs: list[Sequence], join_every: int = 3) -> None:
    """Add the sequences one every `join_every` steps (when a row is free), step until done."""
    waiting = list(seqs)
    for step in range(10_000):
        if waiting and decoder.has_room and step % join_every == 0:
            decoder.add(waiting.pop(0))
        if not waiting and not decoder.running:
            return
        for s, _ in decoder.step():
            if s.finished:
                decoder.remove(s)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("name", ["tiny", "match", "deepnet", "baseline"])
def test_each_sequence_in_a_batch_equals_generate_alone(name):
    cfg = CONFIGS[name]
    N = cfg.max_seq_len
    model = make_model(cfg)
    table = TableRetriever(cfg) if cfg.retrieval else None
    g = torch.Generator().manual_seed(11)
    lengths = [1, 3, N, 7, N // 2, 2, 9, 5]
    news = [N + 9, 5, 2 * N, 1, N, 3 * N + 1, 12, 2]  # most slide past the window
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
    retrieve = batch_retrieve(table) if table is not None else None
    seqs = [
        Sequence(p.tolist(), new, retrieve=retrieve) for p, new in zip(prompts, news, strict=True)
    ]
    decoder = BatchDecoder(model, slots=4, k=2)
    run_batched(decoder, seqs)
    for p, new, s in zip(prompts, news, seqs, strict=True):
        alone = model.generate(p[None], new, retrieve=table)[0].tolist()
        assert s.tokens == alone
    # rows shared forward passes: far fewer decode steps than tokens generated
    assert decoder.steps < sum(news) / 2
    assert sorted(decoder.free) == [0, 1, 2, 3] and not decoder.running


def test_sampled_sequences_in_a_batch_equal_their_seeded_run_alone():
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    table = TableRetriever(cfg)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in (4, 9, 20)]
    settings = [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.2, top_p=0.8),
    ]

    def make(i: int) -> Sequence:
        gen = torch.Generator().manual_seed(100 + i)
        return Sequence(
            prompts[i].tolist(), 50, batch_retrieve(table), generator=gen, **settings[i]
        )

    seqs = [make(i) for i in range(3)]
    run_batched(BatchDecoder(model, slots=3, k=2), seqs, join_every=2)
    for i, s in enumerate(seqs):
        gen = torch.Generator().manual_seed(100 + i)
        alone = model.generate(prompts[i][None], 50, retrieve=table, generator=gen, **settings[i])
        assert s.tokens == alone[0].tolist()


def test_a_removed_sequence_frees_its_row_for_the_next():
    cfg = CONFIGS["tiny"]
    model = make_model(cfg)
    table = TableRetriever(cfg)
    decoder = BatchDecoder(model, slots=1, k=2)
    first = Sequence([5, 6, 7], 1000, batch_retrieve(table))
    decoder.add(first)
    for _ in range(20):
        decoder.step()
    assert not decoder.has_room
    decoder.remove(first)  # cancelled mid-way
    second = Sequence([9, 3], 40, batch_retrieve(table))
    decoder.add(second)
    while not second.finished:
        decoder.step()
    assert second.tokens == model.generate(torch.tensor([[9, 3]]), 40, retrieve=table)[0].tolist()
