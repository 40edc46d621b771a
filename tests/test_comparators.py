"""In-Context RALM and kNN-LM, the comparators scored beside RETRO on the same tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from retrolm.cli import main as cli_main
from retrolm.comparators import KnnLMConfig, interpolate, knn_log_probs, knnlm_bits, ralm_bits
from retrolm.config import RetroConfig
from retrolm.evaluate import evaluate_run, hidden_stream, score_stream
from retrolm.model import RETRO
from tests.test_evaluate import build_world

M, WINDOW = 16, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("comparators"))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = RetroConfig.preset("tiny", cca_layers=(), chunk_size=M, max_seq_len=WINDOW)
    return RETRO(cfg).eval()


def direct_bits(model, inputs: list[int], targets: list[int]) -> np.ndarray:
    """Bits of `targets`, predicted by the last len(targets) outputs of one unpadded input."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inputs]))[0].double(), dim=-1)
    out = logp[len(inputs) - len(targets) :]
    return -out[torch.arange(len(targets)), torch.tensor(targets)].numpy() / math.log(2)


def test_ralm_scores_each_chunk_after_the_previous_chunks_retrieved_text(lm):
    rng = np.random.default_rng(0)
    pad = lm.cfg.pad_id
    stream = rng.integers(3, 200, size=6 * M)
    retrieved = rng.integers(3, 200, size=(6, 2 * M))
    retrieved[2, 20:] = pad  # a neighbour without continuation: padding is dropped
    retrieved[4] = pad  # no neighbour at all: plain context
    bits = ralm_bits(lm, stream, retrieved, chunk_size=M, window=WINDOW, pad_id=pad, batch_size=4)
    assert np.isnan(bits[0]) and not np.isnan(bits[1:]).any()
    # chunk 0: nothing retrieved yet, plain context
    np.testing.assert_allclose(
        bits[1:M], direct_bits(lm, list(stream[: M - 1]), list(stream[1:M])), atol=1e-4
    )
    for c in range(1, 6):
        text = [t for t in retrieved[c - 1] if t != pad][: WINDOW // 2]
        context = min(c * M - 1, WINDOW - len(text) - M)
        inputs = text + list(stream[c * M - 1 - context : c * M + M - 1])
        expected = direct_bits(lm, inputs, list(stream[c * M : c * M + M]))
        np.testing.assert_allclose(bits[c * M : c * M + M], expected, atol=1e-4)
    # the retrieved text of chunk c-1 changes chunk c's bits only; the last chunk's none
    changed = retrieved.copy()
    changed[2] = rng.integers(3, 200, size=2 * M)
    changed[5] = rng.integers(3, 200, size=2 * M)
    other = ralm_bits(lm, stream, changed, chunk_size=M, window=WINDOW, pad_id=pad, batch_size=4)
    differs = np.flatnonzero(np.abs(np.nan_to_num(other - bits)) > 1e-6)
    assert differs.min() >= 3 * M and differs.max() < 4 * M


def test_knn_log_probs_and_interpolation_on_a_constructed_case():
    values = np.array([5, 7, 5, 9])
    dists = np.array([[0.0, 1.0, 2.0]])
    ids = np.array([[0, 1, 2]])
    w = np.exp(-np.array([0.0, 1.0, 2.0]))
    got = knn_log_probs(dists, ids, values, np.array([5]), temperature=1.0)
    np.testing.assert_allclose(got, np.log((w[0] + w[2]) / w.sum()))
    assert knn_log_probs(dists, ids, values, np.array([9]), 1.0)[0] == -np.inf
    lm_bits = np.array([3.0, 1.5])
    np.testing.assert_array_equal(interpolate(lm_bits, np.array([-1.0, -np.inf]), 0.0), lm_bits)
    mixed = interpolate(np.array([1.0]), np.array([math.log(0.25)]), 0.5)
    np.testing.assert_allclose(mixed, [-math.log2(0.5 * 0.5 + 0.5 * 0.25)])


def knnlm_on(lm, stream, train_stream, train_docs, cfg):
    def score(tokens):
        return score_stream(
            lm,
            tokens,
            None,
            chunk_size=M,
            window=WINDOW,
            stride=WINDOW // 2,
            pad_id=lm.cfg.pad_id,
            hidden=True,
        )

    bits, hidden = score(stream)
    return bits, knnlm_bits(train_stream, train_docs, bits, hidden, stream, score=score, cfg=cfg)


def test_knnlm_with_lambda_zero_is_the_baseline_and_a_datastore_of_the_text_itself_wins(lm):
    rng = np.random.default_rng(1)
    stream = rng.integers(3, 200, size=8 * M)
    other = rng.integers(3, 200, size=16 * M)
    docs = np.repeat(np.arange(4), 4 * M)
    bits, result = knnlm_on(lm, stream, other, docs, KnnLMConfig(lambdas=(0.0,)))
    np.testing.assert_array_equal(result.bits, bits)
    # the datastore holds the evaluated text (document 0) and tunes on a copy of it (document 1)
    train = np.concatenate([stream, stream])
    docs = np.repeat([0, 1], len(stream))
    cfg = KnnLMConfig(tune_fraction=0.0)  # at least one tuning document is always taken
    bits, result = knnlm_on(lm, stream, train, docs, cfg)
    assert result.info["tuning_documents"] == 1 and result.info["lambda"] > 0.3
    assert np.nansum(result.bits) < 0.3 * np.nansum(bits)


def test_datastore_keys_without_bits_are_the_scored_hidden_states(lm):
    """hidden_stream (the datastore's keys, no vocabulary projection) gives the states and the
    scored positions score_stream(hidden=True) gives, and kNN-LM built from them is the same."""
    rng = np.random.default_rng(4)
    pad = lm.cfg.pad_id
    stream = rng.integers(3, 200, size=7 * M)
    stream[5 * M + 3 : 5 * M + 9] = pad  # padding targets are not scored, nor keys
    kw = dict(chunk_size=M, window=WINDOW, stride=WINDOW // 2, pad_id=pad, batch_size=3)
    bits, states = score_stream(lm, stream, None, hidden=True, **kw)
    scored, keys = hidden_stream(lm, stream, **kw)
    np.testing.assert_array_equal(scored, ~np.isnan(bits))
    np.testing.assert_allclose(keys, states, atol=1e-6)
    train = rng.integers(3, 200, size=40 * M)
    docs = np.repeat(np.arange(40), M)
    cfg = KnnLMConfig(lambdas=(0.3,), temperatures=(1.0,), tune_fraction=0.2)

    def score(tokens):
        return score_stream(lm, tokens, None, hidden=True, **kw)

    plain = knnlm_bits(train, docs, bits, states, stream, score=score, cfg=cfg)
    fast = knnlm_bits(
        train, docs, bits, states, stream, score=score,
        keys=lambda tokens: hidden_stream(lm, tokens, **kw), cfg=cfg,
    )  # fmt: skip
    np.testing.assert_allclose(fast.bits, plain.bits, atol=1e-9, equal_nan=True)
    assert fast.info == plain.info


def test_evaluate_run_scores_comparators_on_the_same_tokens(world):
    report = evaluate_run(
        world["retro"],
        world["db"],
        baseline=world["base"],
        compare=("ralm", "knnlm"),
        show_progress=False,
    )
    d = report.to_dict()
    for key in ("retro_bpb", "retro_off_bpb", "baseline_bpb", "ralm_bpb", "knnlm_bpb"):
        assert math.isfinite(d[key]), key
    assert set(d["comparators"]) == {"ralm", "knnlm"} and d["comparators"]["knnlm"]["datastore"] > 0
    assert all("ralm_bpb" in f and "knnlm_bpb" in f for f in d["filtered"].values())
    assert "RALM" in report.to_text() and "kNN-LM" in report.to_text()
    assert set(d["seconds"]) == {"retro_on", "retro_off", "baseline", "ralm", "knnlm"}
    assert all(s > 0 for s in d["seconds"].values())
    zero = evaluate_run(
        world["retro"],
        world["db"],
        baseline=world["base"],
        compare=("knnlm",),
        knnlm=KnnLMConfig(lambdas=(0.0,)),
        show_progress=False,
    ).to_dict()
    assert zero["knnlm_bpb"] == zero["baseline_bpb"] == d["baseline_bpb"]


def test_cli_compare_json_and_its_errors(world, capsys):
    args = ["eval", str(world["retro"]), "--db", str(world["db"]), "--baseline", str(world["base"])]
    assert cli_main([*args, "--compare", "ralm", "--json", "--no-progress"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert math.isfinite(d["ralm_bpb"]) and "knnlm_bpb" not in d
    assert cli_main([*args, "--compare", "magic", "--no-progress"]) == 2
    assert "--compare" in capsys.readouterr().err
    no_base = ["eval", str(world["retro"]), "--db", str(world["db"]), "--compare", "ralm"]
    assert cli_main([*no_base, "--no-progress"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_ivf_datastore_visiting_every_cell_is_the_exact_search():
    """The IVF layout the large datastores get (sqrt(N) cells, a k-means sample of 40 keys per
    cell) returns the exact (flat) neighbours when every cell is visited, most of them when a
    few cells are, and its cost model counts a search of a few cells far below a flat one."""
    from retrolm.comparators import Datastore, datastore_flops, ivf_layout

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((5000, 16)).astype(np.float32)
    values = rng.integers(0, 50, 5000)
    queries = keys[:200] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)
    flat = Datastore(keys, values, KnnLMConfig())
    nlist, n_train = ivf_layout(5000, KnnLMConfig())
    assert (nlist, n_train) == (70, 2800)
    ivf = Datastore(keys, values, KnnLMConfig(exact_below=0, nprobe=nlist))
    assert flat.kind == "Flat" and ivf.kind == f"IVF{nlist},Flat nprobe {nlist}"
    d_flat, i_flat = flat.search(queries, 8)
    d_ivf, i_ivf = ivf.search(queries, 8)
    np.testing.assert_array_equal(i_ivf, i_flat)
    np.testing.assert_allclose(d_ivf, d_flat, rtol=1e-4, atol=1e-4)
    # a few cells: a share of the keys scanned per query, most true neighbours still found
    few = Datastore(keys, values, KnnLMConfig(exact_below=0, nprobe=8))
    _, i_few = few.search(queries, 8)
    assert np.mean([len(set(a) & set(b)) / 8 for a, b in zip(i_few, i_flat)]) > 0.5
    cost = datastore_flops(5000, 200, 16, KnnLMConfig(exact_below=0, nprobe=8))
    assert cost["search"] < datastore_flops(5000, 200, 16, KnnLMConfig())["search"] / 4


@pytest.mark.parametrize(
    "field,value",
    [("k", 0), ("lambdas", ()), ("lambdas", (0.5, 1.5)), ("temperatures", (0.0,)),
     ("tune_fraction", 1.0), ("train_per_cell", 10), ("nprobe", 0), ("max_datastore", 0)],
)  # fmt: skip
def test_knnlm_config_names_a_bad_field(field, value):
    from retrolm.errors import ConfigError

    with pytest.raises(ConfigError, match=f"KnnLMConfig.{field} must be"):
        KnnLMConfig(**{field: value})
    assert KnnLMConfig(tune_fraction=0.0, lambdas=[0, 1]).lambdas == (0.0, 1.0)
