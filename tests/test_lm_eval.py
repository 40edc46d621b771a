"""lm-evaluation-harness, unchanged, scores a model served by `retrolm serve`: its
`local-completions` model with the server's own tokenizer (`tokenizer_backend=remote`: the
harness tokenizes through `/tokenize`, nothing is downloaded) on a task of local files only
(tests/lm_eval_task/retrolm_heldout.yaml over the test database's held-out documents)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from retrolm.database import Database
from retrolm.evaluate import EvalConfig, evaluate_run
from retrolm.serve.app import create_app
from retrolm.serve.settings import ServeSettings
from tests.test_evaluate import build_world
from tests.test_serve import Server
from tests.test_serve_api import reference_logprobs

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it (lm-eval[api])

TASKS = Path(__file__).parent / "lm_eval_task"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("lm-eval-world"))


def heldout_texts(db_path) -> list[str]:
    """The text of each valid-split document of the database, in database order."""
    db = Database.open(db_path)
    ids = np.asarray(db.split_chunk_ids("valid"))
    docs = np.asarray(db.chunk_doc)[ids]
    return [
        db.tokenizer.decode(np.asarray(db.chunk_tokens(ids[docs == d])).reshape(-1).tolist())
        for d in dict.fromkeys(docs.tolist())
    ]


def run_harness(url: str, name: str, max_length: int) -> dict:
    """`lm_eval.simple_evaluate` of the local task against the server (samples logged)."""
    from lm_eval.tasks import TaskManager

    model_args = (
        f"base_url={url}/v1/completions,model={name},tokenizer_backend=remote,"
        f"max_length={max_length},custom_prefix_token_id=1,max_retries=1"
    )
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["retrolm_heldout"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
    )
    return out


def expected_loglikelihood(model, db, text: str, max_length: int) -> float:
    """The log-likelihood of `text` over the harness's own rolling windows (after the <eos>
    prefix, max_length - 2 tokens predicted per window), each window read in one forward pass
    with retrieval as `retrolm eval` reads: computed here, without the server."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = db.tokenizer.encode(text)
    windows = get_rolling_token_windows(
        token_list=ids, prefix_token=db.tokenizer.eos_id, max_seq_len=max_length - 2,
        context_len=1,
    )  # fmt: skip
    total = 0.0
    for context, continuation in map(make_disjoint_window, windows):
        logp = reference_logprobs(model, db, context + continuation, model.cfg.retrieval)
        total += float(logp[-len(continuation) :].sum())
    return total


@pytest.mark.parametrize("run,key", [("retro", "retro_on"), ("base", "baseline")])
def test_the_harness_bits_per_byte_agree_with_retrolm_eval(world, tmp_path, monkeypatch, run, key):
    """The harness's bits_per_byte of the served model (RETRO[ON], retrieving from the
    database as it reads; or the baseline without retrieval) is within 2% of `retrolm eval`'s
    on the same held-out documents.

    They do not score quite the same tokens: `retrolm eval` lays the documents end to end (each
    ending with <eos> and padding to a whole chunk) and reads them with sliding windows of the
    training seq_len (64) moved by half of it, and it also scores each <eos> (bits, no bytes);
    the harness scores each document alone, after a <eos> prefix token, in disjoint rolling
    windows (max_length - 2 = 126 tokens predicted per window of 127, one token of context), and
    its chunks are those of its windows (shifted one token from the database's by the prefix),
    so that the neighbours retrieved differ a little. The <eos> bits make most of the
    difference (about 1%).

    Each document's log-likelihood from the harness also equals, to float rounding, the sum over
    the harness's windows of one forward pass each with retrieval, computed here without the
    server (a token lost or added at a window's edge would show)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    texts = heldout_texts(world["db"])
    assert len(texts) >= 3
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "retrolm_heldout.jsonl").write_text(lines, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the task's data_files path is relative

    report = evaluate_run(
        world[run], world["db"], config=EvalConfig(device="cpu"), show_progress=False
    )
    assert report.documents == len(texts)
    app = create_app(world[run], world["db"], ServeSettings(reload_interval=0))
    model = app.state.engine.model
    with Server(app) as s:
        out = run_harness(s.url, run, model.cfg.max_seq_len)
        metrics = httpx.get(f"{s.url}/metrics").text
    got = out["results"]["retrolm_heldout"]
    assert got["sample_len"] == len(texts)
    harness, ours = got["bits_per_byte,none"], report.bpb[key]
    assert abs(harness - ours) / ours < 0.02, (harness, ours)
    # each document's log-likelihood is the one its windows have read directly: no token of a
    # window lost or added between the harness's context length and the server's echo
    db = Database.open(world["db"])
    for sample in out["samples"]["retrolm_heldout"]:
        text = sample["doc"]["text"]
        expected = expected_loglikelihood(model, db, text, model.cfg.max_seq_len)
        assert sample["filtered_resps"][0] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # every window was one completion request scoring its prompt (echo, logprobs)
    assert 'retrolm_http_requests_total{code="200",route="/v1/completions"}' in metrics
