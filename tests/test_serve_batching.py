"""Batched decoding (`RETRO.decode_rows` through `BatchDecoder`): each sequence in a batch gives
what it gives alone with `RETRO.generate`, whatever joins, leaves or slides past the window."""

from __future__ import annotations

import pytest
import torch

from retrolm.config import RetroConfig
from retrolm.decoding import BatchDecoder, Sequence, prefill_groups
from retrolm.model import RETRO, KVCache
from tests.test_generate_window import WINDOW_CONFIGS
from tests.test_model_generate import TableRetriever, make_model

CONFIGS = {
    **WINDOW_CONFIGS,
    "baseline": RetroConfig.preset("tiny", cca_layers=(), max_seq_len=32),
}


def batch_retrieve(table: TableRetriever):
    return lambda chunks: table(torch.from_numpy(chunks))


def scribbled_cache(model: RETRO, rows: int) -> KVCache:
    """A decoding cache full of noise, as earlier sequences leave it (the same noise every
    call): every row holds a full window, then every tensor is overwritten with noise."""
    cfg = model.cfg
    cache = model.new_cache(rows)
    g = torch.Generator().manual_seed(7)
    window = torch.randint(1, cfg.vocab_size, (cfg.max_seq_len,), generator=g)
    table = TableRetriever(cfg) if cfg.retrieval else None
    nb = neighbours_of(window, table, cfg.chunk_size)
    model.prefill_rows(cache, list(range(rows)), [window] * rows, [nb] * rows)
    tensors = [cache.token_ids, cache.cca_mask, cache.cca_ids, cache.chunk_acts]
    for group in (cache.keys, cache.values, cache.cca_keys, cache.cca_values):
        tensors += group.values()
    with torch.inference_mode():  # the cache's tensors were made in it
        for t in (t for t in tensors if t is not None):
            if t.dtype == torch.bool:
                t.copy_(torch.rand(t.shape, generator=g) < 0.5)
            elif t.dtype == torch.long:
                t.copy_(torch.randint(1, model.cfg.vocab_size, t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return cache


def cache_tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    named = {"token_ids": cache.token_ids, "chunk_acts": cache.chunk_acts}
    named |= {"cca_mask": cache.cca_mask, "cca_ids": cache.cca_ids}
    for name in ("keys", "values", "cca_keys", "cca_values"):
        named |= {f"{name}[{i}]": t for i, t in getattr(cache, name).items()}
    return {name: t for name, t in named.items() if t is not None}


@pytest.mark.parametrize("name", ["tiny", "match", "deepnet", "baseline"])
def test_prefill_rows_equals_each_row_alone_then_decodes_the_same(name):
    """Windows of different lengths (none, one or two completed chunks, pad tokens inside)
    encoded into scattered rows in one pass: each row's logits equal the training path's, the
    cache holds exactly what `prefill_rows` row by row writes (nothing past a window), and greedy
    decoding on from there gives `generate`'s tokens alone."""
    cfg = CONFIGS[name]
    m, N = cfg.chunk_size, cfg.max_seq_len
    model = make_model(cfg)
    table = TableRetriever(cfg) if cfg.retrieval else None
    g = torch.Generator().manual_seed(4)
    lengths = [3, 2 * m + 1, 1, m, m + 3]
    windows = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
    windows[1][m + 1] = windows[4][1] = cfg.pad_id  # pad tokens inside a window are skipped
    rows = [5, 0, 3, 2, 6]
    nbs = [neighbours_of(w, table, m) for w in windows]

    batched, alone = scribbled_cache(model, 7), scribbled_cache(model, 7)
    logits = model.prefill_rows(batched, rows, windows, nbs)
    for i, (row, window, nb) in enumerate(zip(rows, windows, nbs, strict=True)):
        with torch.no_grad():
            reference = model(window[None], None if nb is None else nb[None])[0, -1]
        torch.testing.assert_close(logits[i], reference)
        alone_logits = model.prefill_rows(alone, [row], [window], [nb])[0]
        torch.testing.assert_close(logits[i], alone_logits)
    after_alone = cache_tensors(alone)
    for key, t in cache_tensors(batched).items():
        torch.testing.assert_close(t, after_alone[key], msg=key)

    steps = N - max(lengths)  # every row stays in its window; several complete a chunk
    tokens = decode_greedy(model, batched, rows, windows, logits, steps, table)
    for window, out in zip(windows, tokens, strict=True):
        assert out == model.generate(window[None], steps, retrieve=table)[0].tolist()


def neighbours_of(window: torch.Tensor, table: TableRetriever | None, m: int):
    """The neighbours (T // m, k, r) of a window's completed chunks (None: none or RETRO[OFF])."""
    if table is None or len(window) < m:
        return None
    return torch.stack(
        [table(window[None, u * m : (u + 1) * m])[0] for u in range(len(window) // m)]
    )


def decode_greedy(model, cache, rows, windows, logits, steps, table) -> list[list[int]]:
    """`steps` greedy tokens per row by `decode_rows` after a prefill: the rows' whole tokens."""
    m = model.cfg.chunk_size
    seqs = [w.tolist() + [int(x.argmax())] for w, x in zip(windows, logits, strict=True)]
    for _ in range(steps - 1):
        pos = torch.tensor([len(s) - 1 for s in seqs])
        ends = [s for s in seqs if len(s) % m == 0]
        nb = None
        if table is not None and ends:
            nb = torch.cat([table(torch.tensor([s[-m:]])) for s in ends])
        toks = torch.tensor([s[-1] for s in seqs])
        out = model.decode_rows(cache, torch.tensor(rows), toks, pos, nb)
        for s, x in zip(seqs, out, strict=True):
            s.append(int(x.argmax()))
    return seqs


def run_batched(
    decoder: BatchDecoder, seqs: list[Sequence], join_every: int = 3, at_once: int = 1
) -> None:
    """Add up to `at_once` sequences every `join_every` steps (as rows are free), step until
    done; those added together join in the same step."""
    waiting = list(seqs)
    for step in range(10_000):
        for _ in range(at_once if step % join_every == 0 else 0):
            if waiting and decoder.has_room:
                decoder.add(waiting.pop(0))
        if not waiting and not decoder.running:
            return
        for s, _ in decoder.step():
            if s.finished:
                decoder.remove(s)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("at_once", [1, 3])
@pytest.mark.parametrize("name", ["tiny", "match", "deepnet", "baseline"])
def test_each_sequence_in_a_batch_equals_generate_alone(name, at_once):
    """Sequences join one by one, or three at a time (encoded together by one `prefill_rows`,
    with windows sliding in the same steps), and each gives its text alone."""
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
    run_batched(decoder, seqs, at_once=at_once)
    for p, new, s in zip(prompts, news, seqs, strict=True):
        alone = model.generate(p[None], new, retrieve=table)[0].tolist()
        assert s.tokens == alone
    # rows shared forward passes: far fewer decode steps than tokens generated
    assert decoder.steps < sum(news) / 2
    reads = cfg.retrieval  # every sequence retrieves, or none can
    assert decoder.rows[reads].free() == [0, 1, 2, 3] and not decoder.running


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


@pytest.mark.parametrize("name", ["tiny", "copy"])
def test_a_retro_off_sequence_in_a_row_a_retrieving_one_left_reads_no_neighbours(name):
    """RETRO[OFF] (no retriever) in a retrieval model's batch: it reads no neighbours, not the
    chunks the row's previous occupant left, and gives `generate` without retrieval."""
    cfg = CONFIGS[name]
    model = make_model(cfg)
    table = TableRetriever(cfg)
    decoder = BatchDecoder(model, slots=2, k=2)
    first = [Sequence([5, 6, 7, 1, 2], 3 * cfg.max_seq_len, batch_retrieve(table)) for _ in "ab"]
    for seq in first:
        decoder.add(seq)
    while not all(seq.finished for seq in first):
        decoder.step()
    for seq in first:
        decoder.remove(seq)
    prompts = [[9, 3], [4] * (cfg.chunk_size + 3)]  # no chunk complete; one chunk complete
    off = [Sequence(list(p), 2 * cfg.max_seq_len) for p in prompts]  # retrieve=None: OFF
    for seq in off:
        decoder.add(seq)
    while not all(seq.finished for seq in off):
        decoder.step()
    for p, seq in zip(prompts, off, strict=True):
        assert seq.tokens == model.generate(torch.tensor([p]), 2 * cfg.max_seq_len)[0].tolist()


def test_sequences_joining_in_one_step_are_encoded_in_one_forward_pass():
    """k sequences joining in a step make one prefill pass (lengths up to two chunks, or
    padded to at most 1.25x their tokens), and one more pass decodes the sequences already running;
    each gives its text alone."""
    cfg = CONFIGS["tiny"]
    m = cfg.chunk_size
    model = make_model(cfg)
    table = TableRetriever(cfg)
    passes = []
    model.blocks[0].register_forward_hook(lambda *_: passes.append(1))  # one per decoder pass

    def step_passes(decoder: BatchDecoder) -> int:
        before = len(passes)
        decoder.step()
        return len(passes) - before

    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in (2, 2 * m, m, 5)]
    seqs = [Sequence(p.tolist(), 6, batch_retrieve(table)) for p in prompts]
    decoder = BatchDecoder(model, slots=5, k=2)
    for s in seqs[:3]:
        decoder.add(s)
    assert step_passes(decoder) == 1  # three join: one prefill
    assert step_passes(decoder) == 1  # three decode
    decoder.add(seqs[3])
    assert step_passes(decoder) == 2  # one joins, three decode
    while decoder.running:
        for s, _ in decoder.step():
            if s.finished:
                decoder.remove(s)
    for p, s in zip(prompts, seqs, strict=True):
        assert s.tokens == model.generate(p[None], 6, retrieve=table)[0].tolist()


def test_prefill_groups_bound_the_padding():
    # similar lengths: one group; a long window does not drag short ones to its length
    assert prefill_groups([64, 60, 64, 50], small=32) == [[0, 2, 1, 3]]
    groups = prefill_groups([64] * 15 + [449], small=32)
    assert groups[0][0] == 15  # longest first
    for g in groups:
        lengths = [([64] * 15 + [449])[i] for i in g]
        assert len(g) * max(lengths) <= 1.25 * sum(lengths)  # padded at most 1.25x the real
    assert sorted(i for g in groups for i in g) == list(range(16))  # every window once
    assert len(groups) == 2
    assert prefill_groups([3, 30, 1], small=32) == [[1, 0, 2]]  # all short: one pass
    assert prefill_groups([], small=32) == []


def test_a_long_slid_window_and_short_joins_in_one_step_give_each_text_alone():
    """A step where one sequence's window slides (a full window to encode again) while short
    prompts join: the windows go in two groups, and every sequence still equals generate alone."""
    cfg = CONFIGS["tiny"]
    m, N = cfg.chunk_size, cfg.max_seq_len
    model = make_model(cfg)
    table = TableRetriever(cfg)
    g = torch.Generator().manual_seed(9)
    long_prompt = torch.randint(1, cfg.vocab_size, (N,), generator=g)  # slides at its first token
    short = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in (3, 5, 2)]
    decoder = BatchDecoder(model, slots=4, k=2)
    first = Sequence(long_prompt.tolist(), m + 4, batch_retrieve(table))
    decoder.add(first)
    decoder.step()  # the long prompt is encoded; its next token fills the window
    seqs = [Sequence(p.tolist(), 6, batch_retrieve(table)) for p in short]
    for s in seqs:
        decoder.add(s)
    calls = []
    real = model.prefill_rows
    model.prefill_rows = lambda cache, rows, windows, nb: (
        calls.append(sorted(len(w) for w in windows)) or real(cache, rows, windows, nb)
    )
    decoder.step()  # the long window slides as the three join
    assert len(calls) == 2  # not one pass padded to the long window, not one per sequence
    assert sorted(n for c in calls for n in c)[:3] == [2, 3, 5]
    assert max(n for c in calls for n in c) > 2 * m  # the slid window was among them
    for c in calls:
        assert len(c) * max(c) <= 1.25 * sum(c) or max(c) <= 2 * m
    while decoder.running:
        for s, _ in decoder.step():
            if s.finished:
                decoder.remove(s)
    assert first.tokens == model.generate(long_prompt[None], m + 4, retrieve=table)[0].tolist()
    for p, s in zip(short, seqs, strict=True):
        assert s.tokens == model.generate(p[None], 6, retrieve=table)[0].tolist()
