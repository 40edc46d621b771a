"""Evaluation: bits per byte (analytic checks), sliding windows, leakage buckets, database checks."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retrolm.cli import main as cli_main
from retrolm.config import RetroConfig
from retrolm.database import Database, DatabaseConfig, build_database
from retrolm.database.embed import make_tiny_bert
from retrolm.errors import InputError, MismatchError
from retrolm.evaluate import (
    EvalConfig,
    bucket_bpb,
    evaluate_run,
    leakage_ratio,
    longest_common_run,
    score_stream,
    sliding_windows,
    token_byte_lengths,
)
from retrolm.model import RETRO
from retrolm.runs import read_metrics
from retrolm.train import TrainConfig, train

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "bad",
    "jugs",
]


def make_corpus(folder: Path, n_docs: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words) + " ünï\n", encoding="utf-8")
    return folder


VALID_DOCS = (2, 7, 11, 16, 19, 23)  # of make_corpus's 24


def build_world(root: Path, *, vocab_size: int = 300, chunk_size: int = 16) -> dict[str, Path]:
    """A tiny database (tiny deterministic BERT embedder), a RETRO run and a baseline run.

    The valid split is a fixed quarter of the documents: a split by hash of the documents'
    names would change with the temporary folder's path."""
    bert = make_tiny_bert(root / "bert")
    corpus = make_corpus(root / "corpus")
    valid = root / "valid.txt"
    valid.write_text("".join(f"{corpus / f'doc{i:02d}.txt'}\n" for i in VALID_DOCS), "utf-8")
    cfg = DatabaseConfig(
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        embedder=f"bert-mean:{bert}",
        valid_list=str(valid),
        neighbours=4,
        block_rows=64,
    )
    db = build_database([corpus], root / "db", cfg, show_progress=False)
    train_cfg = dict(preset="tiny", max_steps=4, batch_size=4, seq_len=64, eval_every=0, lr=3e-3)
    retro = train(TrainConfig(**train_cfg), db, root / "retro", show_progress=False)
    base = train(
        TrainConfig(**train_cfg, no_retrieval=True), db, root / "base", show_progress=False
    )
    return {"root": root, "bert": bert, "db": db, "retro": retro, "base": base}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


class Bigram(nn.Module):
    """A model of known distribution: the next token depends only on the current one."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def forward(self, tokens, neighbours=None):
        return self.table[tokens]


@pytest.mark.parametrize(
    "length,window,stride", [(64, 16, 8), (64, 16, 16), (40, 32, 8), (17, 64, 32)]
)
def test_sliding_windows_score_every_token_once(length, window, stride):
    scored = np.zeros(length, dtype=int)
    for start, n, first in sliding_windows(length, window, stride):
        assert 0 < n <= window and start % stride == 0
        scored[start + 1 + first : start + 1 + n] += 1
        if start > 0:
            assert first >= window - stride or start + n == length - 1  # context kept
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_bpb_of_a_known_distribution_matches_the_analytic_value():
    rng = np.random.default_rng(0)
    vocab, m = 12, 8
    stream = rng.integers(1, vocab, 10 * m)
    stream[37:40] = 0  # a padded tail: pad targets are not scored
    model = Bigram(vocab)
    bits = score_stream(model, stream, None, chunk_size=m, window=16, stride=8, pad_id=0)
    logp = torch.log_softmax(model.table, -1)
    expect = [
        -logp[stream[t - 1], stream[t]].item() / math.log(2) if stream[t] != 0 else np.nan
        for t in range(1, len(stream))
    ]
    assert np.isnan(bits[0])
    np.testing.assert_allclose(bits[1:], expect, rtol=1e-6)
    nbytes = np.full(len(stream), 2)
    nbytes[stream == 0] = 0
    nbytes[0] = 0
    total = np.nansum(expect) / nbytes.sum()
    chunk_of = np.arange(len(stream)) // m
    assert bucket_bpb(bits, nbytes, chunk_of, np.ones(10, bool)) == pytest.approx(total)


def test_uniform_model_gives_log2_vocab_bits_per_token(world):
    db = Database.open(world["db"])
    table = token_byte_lengths(db.tokenizer)
    for doc in db.documents:  # per-token bytes add up to the document's UTF-8 length
        ids = np.arange(doc.first_chunk, doc.first_chunk + doc.num_chunks)
        assert table[db.chunk_tokens(ids)].sum() == doc.byte_length
    model = RETRO.load(world["base"] / "model")
    for p in model.parameters():
        p.data.zero_()  # logits all 0: the uniform distribution over the vocabulary
    model.save(world["root"] / "uniform" / "model")
    (world["root"] / "uniform" / "run.json").write_text((world["base"] / "run.json").read_text())
    report = evaluate_run(world["root"] / "uniform", world["db"], show_progress=False)
    valid = db.split_chunk_ids("valid")
    stream = db.chunk_tokens(valid).reshape(-1)
    scored = int((stream[1:] != db.pad_id).sum())
    nbytes = int(table[stream].sum() - table[stream[0]])
    assert report.tokens == scored and report.bytes == nbytes
    assert report.bytes == sum(d.byte_length for d in db.documents if d.split == "valid") - int(
        table[stream[0]]
    )
    expect = scored * math.log2(model.cfg.vocab_size) / nbytes
    assert report.bpb["baseline"] == pytest.approx(expect, rel=1e-6)  # float32 log-softmax


def test_longest_common_run_on_constructed_overlaps():
    m = 8
    chunk = np.arange(1, 9)[None]  # 1..8
    nbrs = np.full((1, 3, 16), 50)
    nbrs[0, 0, 5:8] = [3, 4, 5]  # run of 3
    nbrs[0, 1, 10:15] = [2, 3, 4, 5, 6]  # run of 5
    nbrs[0, 2, :4] = [1, 2, 9, 4]  # broken run: 2
    assert longest_common_run(chunk, nbrs, pad_id=0).tolist() == [5]
    # padding never matches padding
    padded = np.array([[7, 7, 0, 0, 0, 0, 0, 0]])
    nb_pad = np.zeros((1, 1, 16), dtype=np.int64)
    nb_pad[0, 0, :2] = 7
    assert longest_common_run(padded, nb_pad, pad_id=0).tolist() == [2]
    # four chunks with overlaps 0, 2, 4, 8 tokens -> r = 0, .25, .5, 1
    chunks = np.tile(np.arange(1, 9), (4, 1))
    nb = np.full((4, 2, 16), 99)
    for i, run in enumerate([0, 2, 4, 8]):
        nb[i, 1, 3 : 3 + run] = np.arange(1, 1 + run)
    r = leakage_ratio(chunks, nb, m, pad_id=0)
    assert r.tolist() == [0.0, 0.25, 0.5, 1.0]
    bits = np.repeat([1.0, 2.0, 3.0, 4.0], m)  # bits per token of each chunk
    nbytes = np.ones(4 * m)
    chunk_of = np.arange(4 * m) // m
    buckets = {a: bucket_bpb(bits, nbytes, chunk_of, r <= a) for a in (0.125, 0.25, 0.5, 1.0)}
    assert buckets == {0.125: 1.0, 0.25: 1.5, 0.5: 2.0, 1.0: 2.5}


def test_retro_on_off_and_baseline_side_by_side(world):
    config = EvalConfig(window=64, stride=32)
    report = evaluate_run(
        world["retro"], world["db"], config=config, baseline=world["base"], show_progress=False
    )
    d = report.to_dict()
    for key in ("retro_bpb", "retro_off_bpb", "baseline_bpb"):
        assert 0 < d[key] < 20
    assert d["retro_bpb"] != d["retro_off_bpb"]  # the neighbours are read
    rows = report.filtered
    assert [r["alpha"] for r in rows] == [0.125, 0.25, 0.5, 0.75, 1.0]
    counts = [r["chunks"] for r in rows]
    assert counts == sorted(counts) and counts[-1] == report.chunks
    assert rows[-1]["retro_on"] == pytest.approx(report.bpb["retro_on"])
    assert set(d["filtered"]["0.5"]) == {"chunks", "retro_bpb", "retro_off_bpb", "baseline_bpb"}
    # RETRO[OFF] is the same model without neighbours, RETRO[ON] with the k=2 nearest stored
    # neighbours of each chunk, whole (2m tokens each): score both directly
    db = Database.open(world["db"])
    valid = db.split_chunk_ids("valid")
    stream = db.chunk_tokens(valid).reshape(-1)
    nearest = np.asarray(db.neighbours(valid)[0])[:, :2]
    neighbours = np.asarray(db.neighbour_tokens(nearest), dtype=np.int64)  # (C, 2, 32)
    assert neighbours.shape == (len(valid), 2, 32)
    table = token_byte_lengths(db.tokenizer)
    nbytes = table[stream]
    nbytes[0] = 0
    model = RETRO.load(world["retro"] / "model")
    for key, nb in (("retro_off_bpb", None), ("retro_bpb", neighbours)):
        bits = score_stream(model, stream, nb, chunk_size=16, window=64, stride=32, pad_id=0)
        assert d[key] == pytest.approx(np.nansum(bits) / nbytes.sum(), rel=1e-9), key
    assert "RETRO[ON]" in report.to_text()


def test_database_with_another_tokenizer_is_refused(world, tmp_path, capsys):
    other = build_database(
        [make_corpus(tmp_path / "c", n_docs=6, seed=3)],
        tmp_path / "other",
        DatabaseConfig(vocab_size=280, chunk_size=16, retriever="bm25", valid_fraction=0.3),
        show_progress=False,
    )
    with pytest.raises(MismatchError, match="tokenizer_sha256"):
        evaluate_run(world["retro"], other, show_progress=False)
    assert cli_main(["eval", str(world["retro"]), "--db", str(other)]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_missing_run_is_a_clear_error(world, tmp_path, capsys):
    with pytest.raises(InputError, match="does not exist"):
        evaluate_run(tmp_path / "nope", world["db"], show_progress=False)
    assert cli_main(["eval", str(tmp_path / "nope"), "--db", str(world["db"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err


def test_cli_eval_json(world, capsys):
    code = cli_main(
        [
            "eval",
            str(world["retro"]),
            "--db",
            str(world["db"]),
            "--json",
            "--no-progress",
            "--max-tokens",
            "256",
        ]
    )
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    # the first 256 tokens' chunks of 16, or fewer where the valid split is shorter (document
    # names, and so the split, include the temporary folder's path: CI once had 10 chunks)
    assert 1 <= d["chunks"] <= 16 and 0 < d["tokens"] <= 16 * d["chunks"] and "retro_bpb" in d


def test_cli_train_preset_quickstart_trains_the_quickstart_model(world, tmp_path):
    """`retrolm train --preset quickstart`: the quickstart's model, on the database's chunks."""
    run = tmp_path / "qs"
    args = ["train", "--db", str(world["db"]), "--out", str(run), "--preset", "quickstart"]
    args += ["--steps", "1", "--batch-size", "2", "--seq-len", "64", "--no-progress"]
    assert cli_main(args) == 0
    cfg = RETRO.load(run / "model").cfg
    db = Database.open(world["db"])
    m, vocab = db.chunk_size, db.tokenizer.vocab_size
    assert cfg == RetroConfig.preset(
        "quickstart", chunk_size=m, neighbour_len=2 * m, vocab_size=vocab
    )
    assert (cfg.dec_dim, cfg.cca_match, cfg.max_seq_len) == (128, 4, 256)


def test_cli_train_config_file_refusal_resume_and_errors(world, tmp_path, capsys):
    """`retrolm train` on a real database: YAML config + flags, refusal, resume, bad input."""
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text("preset: tiny\nbatch_size: 4\nseq_len: 64\nlr: 0.002\neval_every: 1\n")
    args = ["train", "--db", str(world["db"]), "--out", str(run), "--config", str(config)]
    assert cli_main([*args, "--steps", "2", "--no-progress"]) == 0
    stored = json.loads((run / "train_config.json").read_text())
    assert stored["lr"] == 0.002 and stored["max_steps"] == 2 and stored["preset"] == "tiny"
    assert [r["valid_loss"] > 0 for r in read_metrics(run)] == [True, True]
    capsys.readouterr()
    assert cli_main([*args, "--steps", "2", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0  # finished
    assert cli_main(["train", "--out", str(tmp_path / "new"), "--preset", "tiny"]) == 2
    assert "--db is required" in capsys.readouterr().err
    missing = ["train", "--db", str(tmp_path / "nodb"), "--out", str(tmp_path / "x")]
    assert cli_main(missing) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([*args[:4], str(tmp_path / "y"), "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer, got 0" in capsys.readouterr().err
    assert cli_main([*args[:4], str(tmp_path / "z"), "--config", str(config), "--lr", "-1"]) == 2
    assert "--lr must be a finite number > 0, got -1.0" in capsys.readouterr().err
    config.write_text("preset: tiny\nwarmup_steps: -3\n")  # a file's field keeps its name
    assert cli_main([*args[:4], str(tmp_path / "w"), "--config", str(config)]) == 2
    assert "TrainConfig.warmup_steps must be >= 0, got -3" in capsys.readouterr().err


def test_kept_scores_read_back_equal_and_a_damaged_file_is_a_clear_error(tmp_path):
    from retrolm.errors import CorruptArtifactError
    from retrolm.evaluate import Scores

    bits = {"baseline": np.array([np.nan, 1.5, 2.25]), "ralm": np.array([np.nan, 1.0, 2.0])}
    kept = Scores(bits, {"baseline": 3.0}, {"ralm": {"k": 1}}, {"window": 64, "knnlm": {"k": 2}})
    kept.save(tmp_path / "s.npz")
    back = Scores.load(tmp_path / "s.npz")
    assert back.seconds == kept.seconds and back.comparators == kept.comparators
    assert back.take(kept.key).keys() == bits.keys()
    for name, b in bits.items():
        np.testing.assert_array_equal(back.bits[name], b)
    with pytest.raises(MismatchError, match="window=64"):
        back.take({"window": 128, "knnlm": {"k": 2}})
    data = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "s.npz").write_bytes(data[: len(data) // 2])  # cut short
    with pytest.raises(CorruptArtifactError, match="delete it to score again"):
        Scores.load(tmp_path / "s.npz")


def test_eval_scores_a_kept_checkpoint_as_its_model(world, tmp_path, capsys):
    """`eval --checkpoint STEP` scores that step's model: the last checkpoint scores as the final
    model does, an earlier one otherwise; a step not kept is a one-line error naming those kept."""
    run = tmp_path / "run"
    cfg = TrainConfig(preset="tiny", max_steps=4, batch_size=4, seq_len=64, eval_every=0,
                      lr=3e-3, checkpoint_every=2, keep_checkpoints=2)  # fmt: skip
    train(cfg, world["db"], run, show_progress=False)

    def bpb(*extra: str) -> dict:
        args = ["eval", str(run), "--db", str(world["db"]), "--json", "--no-progress", *extra]
        assert cli_main(args) == 0
        return json.loads(capsys.readouterr().out)

    final, last, early = bpb(), bpb("--checkpoint", "4"), bpb("--checkpoint", "2")
    assert last["checkpoint"] == 4 and "checkpoint" not in final
    assert last["retro_bpb"] == final["retro_bpb"]
    assert early["retro_bpb"] != final["retro_bpb"]
    assert cli_main(["eval", str(run), "--db", str(world["db"]), "--checkpoint", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no checkpoint of step 3" in err and "2, 4" in err


def test_leakage_buckets_count_near_copies_among_retrieval_only_chunks(world, tmp_path):
    """r(C) is measured against the retrieval-only chunks too: near-copies of the held-out
    documents (one word changed) among them move held-out chunks to high r(C)."""
    plain = Database.open(world["db"])
    extra = tmp_path / "extra"
    extra.mkdir()
    held_out = [d for d in plain.documents if d.split == "valid"]
    for i, doc in enumerate(held_out):
        words = Path(doc.name).read_text(encoding="utf-8").split(" ")
        words[-1] = "changed\n"
        (extra / f"near{i:02d}.txt").write_text(" ".join(words), encoding="utf-8")
    leaky = build_database(
        [world["root"] / "corpus"],
        tmp_path / "db",
        plain.config,
        retrieval_only=[extra],
        show_progress=False,
    )
    config = EvalConfig(window=64, stride=32)
    before = evaluate_run(world["retro"], world["db"], config=config, show_progress=False)
    after = evaluate_run(world["retro"], leaky, config=config, show_progress=False)
    assert after.chunks == before.chunks  # the same held-out chunks
    low = {r["alpha"]: r["chunks"] for r in before.filtered}
    low_after = {r["alpha"]: r["chunks"] for r in after.filtered}
    assert low_after[0.5] < 0.5 * low[0.5]
