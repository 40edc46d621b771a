"""Generation past the context window: cached decoding equals re-computation of each window."""

from __future__ import annotations

import pytest
import torch

from retrolm.config import RetroConfig
from retrolm.decoding import window_start
from retrolm.model import RETRO
from tests.test_model_generate import TableRetriever, make_model

WINDOW_CONFIGS = {
    "tiny": RetroConfig.preset("tiny", max_seq_len=32),  # m = 8: 4 chunks in the window
    "match": RetroConfig.preset(
        "tiny", vocab_size=16, chunk_size=4, neighbour_len=6, cca_match=2, max_seq_len=12
    ),
    "copy": RetroConfig.preset(
        "tiny",
        vocab_size=16,
        chunk_size=4,
        neighbour_len=6,
        cca_match=2,
        max_seq_len=12,
        copy_head=True,
    ),
    "deepnet": RetroConfig.preset(
        "tiny", dec_depth=3, cca_layers=(2, 3), use_deepnet=True, max_seq_len=24
    ),
}


def window_of(t: int, N: int, m: int) -> int:
    """The windowing rule, written out: drop the oldest whole chunks until <= N tokens remain."""
    s = 0
    while t - s > N:
        s += m
    return s


def greedy_windowed_by_recomputation(model: RETRO, prompt, new: int, retrieve) -> torch.Tensor:
    """Re-run the whole window for every token: model(tokens[s:t], neighbours of its chunks)."""
    m, N = model.cfg.chunk_size, model.cfg.max_seq_len
    out = prompt
    for _ in range(new):
        t = out.shape[1]
        s = window_of(t, N, m)
        neighbours = None
        if retrieve is not None:
            chunks = [retrieve(out[:, u * m : (u + 1) * m]) for u in range(s // m, t // m)]
            k, r = retrieve.table.shape[1:]
            neighbours = (
                torch.stack(chunks, dim=1)
                if chunks
                else torch.zeros(out.shape[0], 0, k, r, dtype=torch.long)
            )
        with torch.no_grad():
            logits = model(out[:, s:t], neighbours)[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out


def test_window_start_rule():
    N, m = 32, 8
    assert [window_start(t, N, m) for t in (1, 31, 32)] == [0, 0, 0]
    assert [window_start(t, N, m) for t in (33, 40, 41, 48, 49)] == [8, 8, 16, 16, 24]
    for t in range(1, 200):
        s = window_start(t, N, m)
        assert s == window_of(t, N, m) and s % m == 0
        assert t - s <= N and (t <= N or t - s > N - m)


@pytest.mark.parametrize(
    "name, prompt_len",
    [("tiny", 11), ("match", 5), ("deepnet", 24), ("tiny", 75), ("copy", 12 * 3 + 2)],
)  # the last two: prompts longer than the window (max_seq_len 32 and 12)
@pytest.mark.parametrize("retrieval", [True, False])
def test_cached_generation_past_the_window_equals_recomputation(name, prompt_len, retrieval):
    cfg = WINDOW_CONFIGS[name]
    m, N = cfg.chunk_size, cfg.max_seq_len
    model = make_model(cfg)
    new = 2 * N + 3 * m + 1  # the window slides more than a dozen times
    prompt = torch.randint(
        1, cfg.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(3)
    )
    reference = greedy_windowed_by_recomputation(
        model, prompt, new, TableRetriever(cfg) if retrieval else None
    )
    retriever = TableRetriever(cfg) if retrieval else None
    out = model.generate(prompt, max_new_tokens=new, retrieve=retriever)
    assert out.shape == (2, prompt_len + new)
    assert torch.equal(out, reference)
    if retriever is not None:  # every chunk the model reads retrieved once, in order
        first = window_start(prompt_len, N, m) // m  # a long prompt's dropped chunks: never
        total = prompt_len + new - 1
        assert len(retriever.calls) == total // m - first
        for u, chunk in enumerate(retriever.calls, start=first):
            assert torch.equal(chunk, out[:, u * m : (u + 1) * m])


def test_sampled_generation_past_the_window_is_seeded():
    cfg = WINDOW_CONFIGS["tiny"]
    model = make_model(cfg)
    prompt = torch.randint(1, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 80, TableRetriever(cfg), temperature=1.0, generator=g)

    assert torch.equal(sample(4), sample(4))
    assert sample(4).shape == (1, 85)


def _windowed_reference(model: RETRO, seqs, nbrs) -> dict[tuple[int, int], torch.Tensor]:
    """(row b, t) -> logits (V,) predicting token t of row b, recomputed over its window by
    `model(window, neighbours)`: the training path."""
    m, N = model.cfg.chunk_size, model.cfg.max_seq_len
    reference = {}
    for t in range(1, seqs.shape[1]):
        s = window_start(t, N, m)
        with torch.no_grad():
            logits = model(seqs[:, s:t], nbrs[:, s // m : t // m])[:, -1]  # (B, V)
        logits = logits.log_softmax(-1)  # a copy head gives log-probabilities where it reads
        reference.update({(b, t): logits[b] for b in range(seqs.shape[0])})
    return reference


@pytest.mark.parametrize("name", ["tiny", "match", "copy", "deepnet"])
def test_training_cached_and_row_decoding_paths_give_the_same_logits(name):
    """The three entry points of the one decoder forward agree to float rounding (float64):
    `model(window)` recomputed, `generate`'s `prefill_rows` + `decode_rows` with the rows in
    step (window slides included), and the same calls with rows at other positions;
    with padding inside the sequences and in the neighbours (and cca_match in "match")."""
    cfg = WINDOW_CONFIGS[name]
    m, N, pad = cfg.chunk_size, cfg.max_seq_len, cfg.pad_id
    model = make_model(cfg)
    g = torch.Generator().manual_seed(3)
    total = N + 2 * m + 3  # the window slides three times
    seqs = torch.randint(1, cfg.vocab_size, (3, total), generator=g)
    seqs[0, 2], seqs[1, m + 1], seqs[2, 2 * m - 1] = pad, pad, pad  # pad tokens to be skipped
    table = TableRetriever(cfg)  # some neighbours padded or absent
    nbrs = torch.stack([table(seqs[:, u * m : (u + 1) * m]) for u in range(total // m)], 1)
    reference = _windowed_reference(model, seqs, nbrs)

    # generate's path: the rows in step, each window encoded by one `prefill_rows`, then one
    # `decode_rows` per token for all three rows
    cache, start, rows = model.new_cache(3), -1, torch.arange(3)
    for t in range(3, total):
        s = window_start(t, N, m)
        if s != start:
            start = s
            chunks = [nbrs[b, s // m : t // m] for b in range(3)]
            logits = model.prefill_rows(cache, rows, list(seqs[:, s:t]), chunks)
        else:
            new = nbrs[:, t // m - 1] if t % m == 0 else None  # the fed token ends a chunk
            logits = model.decode_rows(
                cache, rows, seqs[:, t - 1], torch.full((3,), t - 1 - s), new
            )
        for b in range(3):
            torch.testing.assert_close(logits[b].log_softmax(-1), reference[b, t])

    # the server's path: rows 2, 0, 3 of a slot cache, at other positions in every step
    slots = model.new_cache(4)
    rows, offsets = [2, 0, 3], [0, 5, 2 * m + 1]
    starts = [-1, -1, -1]
    for step in range(3, total - max(offsets)):
        decode, logits_of = [], {}
        for b, (row, off) in enumerate(zip(rows, offsets, strict=True)):
            t = step + off
            s = window_start(t, N, m)
            if s != starts[b]:  # joins, or its window slid: encode the window into the row
                chunks = nbrs[b, s // m : t // m]  # (U, k, r)
                logits_of[b] = model.prefill_rows(slots, [row], [seqs[b, s:t]], [chunks])[0]
                starts[b] = s
            else:
                decode.append(b)
        if decode:
            pos = torch.tensor([step + offsets[b] - 1 - starts[b] for b in decode])
            tokens = torch.stack([seqs[b, step + offsets[b] - 1] for b in decode])
            done = [b for b, p in zip(decode, pos.tolist(), strict=True) if (p + 1) % m == 0]
            chunk_nbrs = [nbrs[b, (step + offsets[b] - 1) // m] for b in done]
            out = model.decode_rows(
                slots,
                torch.tensor([rows[b] for b in decode]),
                tokens,
                pos,
                torch.stack(chunk_nbrs) if chunk_nbrs else None,
            )
            logits_of.update(zip(decode, out, strict=True))
        for b, logits in logits_of.items():
            torch.testing.assert_close(logits.log_softmax(-1), reference[b, step + offsets[b]])
