"""The CLI end to end on a RETRO-fitted Hugging Face model: a tiny random GPT-2 folder with its
own byte-level BPE tokenizer -> db build --tokenizer FOLDER -> train --retrofit FOLDER ->
eval --baseline FOLDER -> generate."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import safetensors.torch
import torch
import transformers
from safetensors.torch import load_file

from retrolm.checkpoint import latest_checkpoint, load_checkpoint_state
from retrolm.cli import main as cli_main
from retrolm.hf import RetroFitted, weights_sha256
from retrolm.hf.model import WEIGHTS_FILE
from retrolm.io import read_json
from retrolm.runs import load_run_model, read_metrics
from retrolm.tokenizer import train_tokenizer
from tests.test_evaluate import VALID_DOCS, make_corpus

M = 16  # chunk size
ENCODER = ["--model", "enc_dim=16", "--model", "enc_heads=2", "--model", "enc_depth=1"]


def make_gpt2_folder(folder, corpus) -> None:
    """A random 4-layer GPT-2 whose vocabulary is a BPE tokenizer trained on the corpus, with
    `<pad>` (0) and `<eos>` (1), saved with the model as a Hugging Face folder would be."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, n_positions=256, vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")


def db_build(corpus, out, *extra: str) -> int:
    """A BM25 database of the corpus, its valid split a fixed quarter of the documents (a split
    by hash of the names would change with the temporary folder's path)."""
    valid = out.parent / f"{out.name}-valid.txt"
    valid.write_text("".join(f"{corpus / f'doc{i:02d}.txt'}\n" for i in VALID_DOCS), "utf-8")
    return cli_main(
        ["db", "build", str(corpus), "--out", str(out), "--chunk-size", str(M), "--retriever",
         "bm25", "--split-list", str(valid), "--neighbours", "2", "--no-progress", *extra]
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_pipeline")
    corpus = make_corpus(root / "corpus")
    base = root / "gpt2"
    make_gpt2_folder(base, corpus)
    assert db_build(corpus, root / "db", "--tokenizer", str(base)) == 0
    run = root / "run"
    code = cli_main(
        ["train", "--db", str(root / "db"), "--out", str(run), "--retrofit", str(base),
         "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--lr", "3e-3", "--warmup", "1",
         "--checkpoint-every", "2", "--eval-every", "0", "--no-progress", *ENCODER]
    )  # fmt: skip
    assert code == 0
    return {"root": root, "corpus": corpus, "base": base, "db": root / "db", "run": run}


def test_train_saves_only_the_retrieval_weights_and_records_the_base(world):
    run, base = world["run"], world["base"]
    model, meta = load_run_model(run)
    assert isinstance(model, RetroFitted)
    digest = weights_sha256(base)
    assert meta["retrofit_base_sha256"] == digest == model.cfg.base_sha256
    assert meta["retrofit_from"] == str(base.resolve())
    stored = load_file(str(run / "model" / WEIGHTS_FILE))
    assert set(stored) == {name for name, _ in model.retrieval_parameters()}
    # trained: the CCA output projections left zero; the optimizer held nothing else
    assert all(cca.out.weight.abs().sum() > 0 for cca in model.cca.values())
    trainer_state, _ = load_checkpoint_state(latest_checkpoint(run / "checkpoints"))
    optimized = sum(len(g["params"]) for g in trainer_state["optimizer"]["param_groups"])
    assert optimized == len(stored)
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_eval_with_the_base_as_baseline_off_equals_it_exactly(world, capsys):
    args = ["eval", str(world["run"]), "--db", str(world["db"]), "--baseline", str(world["base"])]
    assert cli_main([*args, "--compare", "ralm", "knnlm", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["retro_off_bpb"] == report["baseline_bpb"]  # RETRO[OFF] is the base
    assert math.isfinite(report["retro_bpb"]) and report["retro_bpb"] != report["baseline_bpb"]
    # the comparators read the base through the same contract (logits, hidden states)
    assert math.isfinite(report["ralm_bpb"]) and math.isfinite(report["knnlm_bpb"])


def test_eval_scores_the_base_and_retro_on_from_one_lower_pass_as_if_alone(world, monkeypatch):
    from retrolm.evaluate import EvalConfig, evaluate_run

    def report():
        return evaluate_run(world["run"], world["db"], config=EvalConfig(),
                            baseline=world["base"], compare=("knnlm",),
                            show_progress=False).to_dict()  # fmt: skip

    calls = []
    real = RetroFitted.base_and_retro
    monkeypatch.setattr(RetroFitted, "base_and_retro",
                        lambda self, *a: calls.append(1) or real(self, *a))  # fmt: skip
    together = report()
    assert calls  # the shared pass was used
    monkeypatch.delattr(RetroFitted, "base_and_retro")
    alone = report()
    for key in ("retro_bpb", "retro_off_bpb", "baseline_bpb", "knnlm_bpb"):
        assert together[key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key
    for alpha, row in alone["filtered"].items():
        assert together["filtered"][alpha] == pytest.approx(row, rel=1e-6, nan_ok=True), alpha


def test_base_scores_kept_from_before_training_equal_scoring_with_the_run(
    world, tmp_path, monkeypatch
):
    """A quickstart scores the base and the comparators before it trains; the evaluation after
    training takes those bits: its report equals one that scores everything itself, and it
    scores neither the base nor a comparator again."""
    import retrolm.evaluate as evaluate
    from retrolm.errors import MismatchError
    from retrolm.evaluate import EvalConfig, Scores, evaluate_run, score_baseline

    cfg = EvalConfig(window=64)
    both = ("ralm", "knnlm")
    kept = score_baseline(world["base"], world["db"], config=cfg, compare=both,
                          show_progress=False)  # fmt: skip
    kept.save(tmp_path / "scores.npz")
    scores = Scores.load(tmp_path / "scores.npz")

    def report(**kw):
        return evaluate_run(world["run"], world["db"], config=cfg, baseline=world["base"],
                            compare=both, show_progress=False, **kw)  # fmt: skip

    fresh = report().to_dict()
    monkeypatch.setattr(evaluate, "ralm_bits", lambda *a, **k: pytest.fail("RALM rescored"))
    monkeypatch.setattr(evaluate, "knnlm_bits", lambda *a, **k: pytest.fail("kNN-LM rescored"))
    monkeypatch.setattr(RetroFitted, "base_and_retro", lambda *a: pytest.fail("base rescored"))
    taken = report(scores=scores)
    assert taken.seconds["ralm"] == kept.seconds["ralm"]  # what scoring took, when it was
    taken = taken.to_dict()
    for key in ("retro_bpb", "retro_off_bpb", "baseline_bpb", "ralm_bpb", "knnlm_bpb"):
        assert taken[key] == pytest.approx(fresh[key], rel=1e-6, abs=1e-9), key
    assert taken["comparators"]["knnlm"] == fresh["comparators"]["knnlm"]
    for alpha, row in fresh["filtered"].items():
        assert taken["filtered"][alpha] == pytest.approx(row, rel=1e-6, nan_ok=True), alpha
    # scores of other windows are refused, not mixed in
    with pytest.raises(MismatchError, match="stride"):
        evaluate_run(world["run"], world["db"], config=EvalConfig(window=64, stride=16),
                     baseline=world["base"], scores=scores, show_progress=False)  # fmt: skip


def test_generate_on_the_retrofitted_run(world, capsys):
    args = ["generate", str(world["run"]), "--db", str(world["db"]), "alpha beta gamma delta"]
    assert cli_main([*args, "--max-new-tokens", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["tokens"]) == result["prompt_tokens"] + 40
    assert result["attribution"]  # chunks completed during generation retrieved neighbours


def test_a_database_in_other_tokens_is_refused(world, capsys):
    other = world["root"] / "db_other"
    assert db_build(world["corpus"], other, "--vocab-size", "280") == 0
    code = cli_main(
        ["train", "--db", str(other), "--out", str(world["root"] / "run2"), "--retrofit",
         str(world["base"]), "--steps", "1", "--no-progress", *ENCODER]
    )  # fmt: skip
    assert code == 2
    assert "another tokenizer than the base model" in capsys.readouterr().err
    assert not (world["root"] / "run2" / "config.json").exists()


def test_a_changed_base_is_refused_when_the_run_is_loaded(world, tmp_path, capsys):
    run = world["run"]
    config = read_json(run / "model" / "config.json")
    assert config["base_path"] == str(world["base"].resolve())
    changed = tmp_path / "run"
    shutil.copytree(run, changed)
    config["base_sha256"] = "0" * 64  # as if the base's weights were replaced since training
    (changed / "model" / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(changed / "model" / WEIGHTS_FILE))
    safetensors.torch.save_file(tensors, str(changed / "model" / WEIGHTS_FILE))  # no metadata
    args = ["generate", str(changed), "--db", str(world["db"]), "alpha beta"]
    assert cli_main([*args, "--max-new-tokens", "2"]) == 2
    assert "other weights" in capsys.readouterr().err


def test_served_retrofitted_sequences_equal_generate_alone(world):
    """The server's decoder on a RETRO-fitted model (rows at their own positions in one
    forward pass): two greedy sequences, one running past max_seq_len, each equal
    to `generate` alone with the same retrieval."""
    import numpy as np

    from retrolm.database import Database
    from retrolm.decoding import BatchDecoder, Sequence

    model = load_run_model(world["run"])[0].eval()
    db = Database.open(world["db"])
    k, n = model.cfg.num_neighbours, model.cfg.max_seq_len
    tokens = db.chunk_tokens(np.arange(4)).reshape(-1).tolist()  # (4 * M,) real text

    def batch_retrieve(chunks):
        return db.neighbours_for(chunks, k)

    def retrieve(chunk):
        return torch.from_numpy(db.neighbours_for(chunk.numpy(), k))

    decoder = BatchDecoder(model, slots=2, k=k)
    long = Sequence(tokens=tokens[: M + 3], max_new_tokens=n + M, retrieve=batch_retrieve)
    short = Sequence(tokens=tokens[: 2 * M + 5], max_new_tokens=30, retrieve=batch_retrieve)
    decoder.add(long)
    decoder.add(short)
    while decoder.running:
        decoder.step()
    for seq in (long, short):
        prompt = torch.tensor([seq.tokens[: seq.prompt_len]])
        alone = model.generate(prompt, seq.max_new_tokens, retrieve=retrieve)
        assert seq.tokens == alone[0].tolist()


def test_serve_completes_on_a_retrofitted_run(world):
    from fastapi.testclient import TestClient

    from retrolm.generate import generate_text
    from retrolm.serve.app import create_app
    from retrolm.serve.settings import ServeSettings

    app = create_app(world["run"], world["db"], ServeSettings(reload_interval=0))
    prompt = "alpha beta gamma delta epsilon zeta eta theta"
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0}
        )
    assert r.status_code == 200, r.text
    alone = generate_text(world["run"], world["db"], prompt, max_new_tokens=30)
    assert r.json()["choices"][0]["text"] == alone.text


def test_a_killed_retrofit_run_resumes_exactly(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "model")  # as if killed after the step-2 checkpoint
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(world["run"])]
    a, b = load_run_model(run)[0], load_run_model(world["run"])[0]
    for (name, p), (_, q) in zip(a.retrieval_parameters(), b.retrieval_parameters()):
        assert torch.equal(p, q), name
