"""`retrolm serve`'s completions API as lm-evaluation-harness and OpenAI clients use it:
`logprobs` (generated and, with `echo`, the prompt's, read with retrieval as `retrolm eval`
reads), `echo` with `max_tokens: 0`, prompts as lists of strings or of token ids, `n`,
`stream_options`; `/v1/tokenize`, `/v1/detokenize`; `/metrics`; `/health` while loading; and
every bad value of the new fields as a one-line 4xx."""

from __future__ import annotations

import math
import threading

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import retrolm.serve.app as app_module
from retrolm.cli import main as cli_main
from retrolm.database import Database
from retrolm.serve.app import create_app
from retrolm.serve.settings import ServeSettings
from tests.test_serve import (
    AUTH,
    KEY,
    PROMPT,
    Server,
    assert_same_sources,
    complete,
    free_port,
    serve,
    stream_events,
    wait_until,
)
from tests.test_serve import world as world  # noqa: F401 (the module's fixture)
from tests.test_serve_hardening import error_of, post


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    with serve(world, max_tokens=400, max_prompt_tokens=1000) as s:
        yield s


@pytest.fixture(scope="module")
def db(world):  # noqa: F811
    return Database.open(world["db"])


def reference_logprobs(model, db, ids: list[int], retrieval: bool = True) -> np.ndarray:
    """log p(token t | tokens < t) for t >= 1 from one forward pass of the whole prompt, chunk
    u's neighbours retrieved (`Database.neighbours_for`) with chunk u as the query."""
    m, k = model.cfg.chunk_size, model.cfg.num_neighbours
    x = torch.tensor([ids[:-1]])
    nb = None
    if retrieval:
        chunks = math.ceil(len(ids[:-1]) / m)
        complete_ = np.asarray(ids[: len(ids) // m * m]).reshape(-1, m)
        found = np.asarray(db.neighbours_for(complete_, k), dtype=np.int64)[:chunks]
        if len(found) < chunks:  # the last chunk is incomplete: nothing reads its neighbours
            found = np.concatenate([found, np.zeros((1, *found.shape[1:]), np.int64)])
        nb = torch.from_numpy(found)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(x, neighbours=nb)[0].float(), -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def score(url: str, prompt, logprobs: int = 1, **body) -> dict:
    r = complete(url, prompt=prompt, max_tokens=0, echo=True, logprobs=logprobs, **body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------
# logprobs and echo


def test_echo_scores_the_prompt_as_the_model_reads_it_with_retrieval(server, world, db):  # noqa: F811
    """`echo` with `max_tokens: 0` gives the prompt, each token's log-probability (the first
    one's null) and its top ids: those of one forward pass over the prompt with chunk u's
    neighbours (retrieved with chunk u) read from the end of chunk u on: RETRO[ON], differing
    from the same model reading no neighbours."""
    prompt = PROMPT * 2
    d = score(server.url, prompt, logprobs=3)
    ids = db.tokenizer.encode(prompt)
    assert len(ids) > 3 * db.chunk_size  # several chunks read their neighbours
    choice = d["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert d["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                          "total_tokens": len(ids)}  # fmt: skip
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids)
    assert "".join(lp["tokens"]) == prompt
    assert all(prompt[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))
    expected = reference_logprobs(world["model"], db, ids)
    np.testing.assert_allclose(lp["token_logprobs"][1:], expected, atol=2e-4)
    off = reference_logprobs(world["model"], db, ids, retrieval=False)
    assert np.abs(expected - off)[db.chunk_size :].max() > 1e-3  # the neighbours count
    for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
        assert len(top) <= 4 and chosen in top.values()  # top 3, the chosen one added
        assert max(top.values()) >= chosen
    # the chunks whose neighbours a prompt token read, as attribution
    assert [c["chunk_index"] for c in d["retrieved"]] == list(range((len(ids) - 1) // 16))


def test_no_token_reads_neighbours_of_its_own_or_a_later_chunk(server, db):
    """The log-probabilities of a prompt's tokens do not change when more text follows: the
    chunk a prompt ends inside is complete (and retrieved for) only in the longer prompt."""
    ids = db.tokenizer.encode(PROMPT * 3)
    head = ids[: 2 * db.chunk_size + 5]
    short = score(server.url, head)["choices"][0]["logprobs"]["token_logprobs"]
    long = score(server.url, ids)["choices"][0]["logprobs"]["token_logprobs"]
    np.testing.assert_allclose(short[1:], long[1 : len(head)], atol=1e-5)


def test_a_prompt_longer_than_the_window_is_scored_with_sliding_windows(server, world, db):  # noqa: F811
    """Past max_seq_len (128) the prompt is scored in windows of 128 moved by 64: the first
    window's tokens as one pass gives them, and every token scored once."""
    prompt = PROMPT * 10
    ids = db.tokenizer.encode(prompt)
    assert len(ids) > 2 * 128
    lp = score(server.url, prompt)["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lp) == len(ids) and lp[0] is None and all(x is not None for x in lp[1:])
    first = reference_logprobs(world["model"], db, ids[:129])
    np.testing.assert_allclose(lp[1:129], first, atol=2e-4)
    # the second window reads tokens 64..191 and scores its last 64 (tokens 129..192)
    second = reference_logprobs(world["model"], db, ids[64:193])
    np.testing.assert_allclose(lp[129:193], second[64:], atol=2e-4)
    # generation after the scoring reuses its neighbours for the window it decodes from
    body = dict(prompt=prompt, max_tokens=12, temperature=0)
    plain = complete(server.url, **body).json()
    echoed = complete(server.url, **body, echo=True, logprobs=1).json()
    assert echoed["choices"][0]["text"] == prompt + plain["choices"][0]["text"]
    assert_same_sources(echoed["retrieved"], plain["retrieved"])


@pytest.mark.parametrize("length", [1, 2, 17, 128, 129, 200, 1000])
@pytest.mark.parametrize("window,m", [(128, 16), (64, 16), (48, 16), (16, 16)])
def test_the_scoring_windows_are_retrolm_evals(length, window, m):
    from retrolm.evaluate import sliding_windows
    from retrolm.serve.scoring import score_windows

    stride = max(m, (window // 2) // m * m)
    assert score_windows(length, window, m) == sliding_windows(length, window, stride)


def test_generated_logprobs_are_those_of_scoring_the_same_text(server, db):
    """A greedy completion's tokens carry the log-probabilities that scoring prompt + completion
    gives them (decoding with caches = one pass), each the best of its top ids; with echo
    the prompt comes first, its offsets then the completion's."""
    r = complete(server.url, prompt=PROMPT, max_tokens=20, temperature=0, logprobs=2, echo=True)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = db.tokenizer.encode(PROMPT)
    assert choice["text"].startswith(PROMPT) and len(lp["tokens"]) == len(ids) + 20
    assert "".join(lp["tokens"]) == choice["text"]
    assert all(choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))
    generated = lp["token_logprobs"][len(ids) :]
    for top, chosen in zip(lp["top_logprobs"][len(ids) :], generated):
        assert chosen == max(top.values())  # greedy: the best of the top ids
    new_ids = db.tokenizer.encode(choice["text"][len(PROMPT) :])
    rescored = score(server.url, ids + new_ids)["choices"][0]["logprobs"]["token_logprobs"]
    if len(new_ids) == 20:  # the text re-encodes to the same tokens (usually)
        np.testing.assert_allclose(generated, rescored[len(ids) :], atol=2e-4)
    plain = complete(server.url, prompt=PROMPT, max_tokens=20, temperature=0, logprobs=2).json()
    assert plain["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(generated, abs=1e-5)
    assert plain["choices"][0]["logprobs"]["text_offset"][0] == 0  # from the completion's start


def test_a_stop_string_cuts_the_logprobs_where_it_cuts_the_text(server):
    body = dict(prompt=PROMPT, max_tokens=40, temperature=0, logprobs=1)
    whole = complete(server.url, **body).json()["choices"][0]
    text = whole["text"]
    stop = text[20:23]
    cut = complete(server.url, **body, stop=[stop]).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    lp, kept = cut["logprobs"], len(cut["logprobs"]["tokens"])
    assert 0 < kept < len(whole["logprobs"]["tokens"])
    assert all(o < len(cut["text"]) for o in lp["text_offset"])  # none begins past the cut
    assert "".join(lp["tokens"]).startswith(cut["text"])
    assert lp["token_logprobs"] == whole["logprobs"]["token_logprobs"][:kept]


def test_streamed_logprobs_are_the_whole_ones_in_pieces(server):
    body = dict(prompt=PROMPT, max_tokens=30, temperature=0, logprobs=1, echo=True)
    whole = complete(server.url, **body).json()["choices"][0]
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
        timeout=60,
    ) as r:  # fmt: skip
        events = stream_events(r)[:-1]
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert choices[0]["text"] == PROMPT  # the prompt first, with its log-probabilities
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in choices for x in c["logprobs"][key]] == whole["logprobs"][key], key


# ---------------------------------------------------------------------------------------------
# prompts, n, stream_options


def test_prompt_lists_and_n_give_choices_prompt_major(server, db):
    a, b = "the quick brown fox", "seven wizards quietly"
    alone = [
        complete(server.url, prompt=p, max_tokens=8, temperature=0).json()["choices"][0]["text"]
        for p in (a, b)
    ]
    d = complete(server.url, prompt=[a, b], max_tokens=8, temperature=0, n=2).json()
    assert [c["index"] for c in d["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in d["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    ids = [db.tokenizer.encode(a), db.tokenizer.encode(b)]
    assert d["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])  # each prompt once
    assert d["usage"]["completion_tokens"] == 4 * 8
    for prompt in (ids, ids[0]):  # token-id lists, and one list of token ids
        t = complete(server.url, prompt=prompt, max_tokens=8, temperature=0).json()
        assert [c["text"] for c in t["choices"]] == alone[: len(t["choices"])]
    echoed = complete(server.url, prompt=ids[1], max_tokens=1, echo=True).json()
    assert echoed["choices"][0]["text"].startswith(b)
    body = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=5, n=3)
    samples = [c["text"] for c in complete(server.url, **body).json()["choices"]]
    assert len(set(samples)) == 3  # independent samples
    assert samples == [c["text"] for c in complete(server.url, **body).json()["choices"]]
    assert samples[0] == complete(server.url, **{**body, "n": 1}).json()["choices"][0]["text"]


def test_stream_options_include_usage_adds_a_last_usage_chunk(server):
    body = dict(prompt=["fox", "dog"], max_tokens=5, temperature=0, stream=True, n=2,
                stream_options={"include_usage": True})  # fmt: skip
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as r:
        events = stream_events(r)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4 * 5
    assert all(e["usage"] is None for e in events[:-2])
    finished = [c["index"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]]
    assert sorted(finished) == [0, 1, 2, 3]
    texts = {i: "".join(c["text"] for e in events[:-2] for c in e["choices"] if c["index"] == i)
             for i in range(4)}  # fmt: skip
    whole = complete(server.url, **{k: v for k, v in body.items() if "stream" not in k}).json()
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]


# ---------------------------------------------------------------------------------------------
# tokenize, detokenize


def test_tokenize_and_detokenize(server, db):
    r = post(server.url, "/v1/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    ids = db.tokenizer.encode(PROMPT)
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 128}
    assert post(server.url, "/v1/detokenize", {"tokens": ids}).json() == {"prompt": PROMPT}
    assert post(server.url, "/tokenize", {"prompt": "fox"}).json()["tokens"] == (
        db.tokenizer.encode("fox")
    )  # vLLM's paths, which lm-evaluation-harness's remote tokenizer calls
    assert post(server.url, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    info = httpx.get(f"{server.url}/tokenizer_info", headers=AUTH).json()
    assert info["eos_token_id"] == db.tokenizer.eos_id and info["model_max_length"] == 128
    for path in ("/v1/tokenize", "/tokenize", "/v1/detokenize", "/metrics", "/tokenizer_info"):
        r = httpx.request("GET" if "info" in path or "metrics" in path else "POST",
                          server.url + path, json={"prompt": "a", "tokens": [1]})  # fmt: skip
        assert error_of(r, 401)["type"] == "authentication_error", path


# ---------------------------------------------------------------------------------------------
# bad values of the new fields


BAD = [
    ({"logprobs": 6}, "logprobs", "at most 5"),
    ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"logprobs": "1"}, "logprobs", "integer"),
    ({"logprobs": 1.0}, "logprobs", "integer"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 9}, "n", "at most 8"),
    ({"n": 2, "best_of": 3}, "best_of", "unless it equals n"),
    ({"best_of": 0}, "best_of", "greater than or equal to 1"),
    ({"max_tokens": 0}, "max_tokens", "echo: true"),
    ({"max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": []}, "prompt", "a list of token-id lists"),
    ({"prompt": [[]]}, "prompt", "non-empty list of integers"),
    ({"prompt": [[1, "a"]]}, "prompt", "non-empty list of integers"),
    ({"prompt": [1, True]}, "prompt", "not a mix"),
    ({"prompt": [1.5]}, "prompt", "not a mix"),
    ({"prompt": ["a", ""]}, "prompt", "empty string"),
    ({"prompt": {"text": "a"}}, "prompt", "a list of strings"),
    ({"prompt": [-1]}, "prompt", "not in the vocabulary"),
    ({"prompt": [[5, 300]]}, "prompt", "token id 300 is not in the vocabulary (0 to 299)"),
    ({"prompt": ["a"] * 9, "n": 8}, "prompt", "--max-queue"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", "boolean"),
    ({"stream": True, "stream_options": 1}, "stream_options", ""),
    ({"echo": "true"}, "echo", "boolean"),
]


@pytest.mark.parametrize("fields,param,message", BAD)
def test_bad_values_of_the_new_fields_are_400s_naming_them(server, fields, param, message):
    body = {"prompt": "fox", "max_tokens": 2, **fields}
    error = error_of(post(server.url, "/v1/completions", body), 400)
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize(
    "path,body,param",
    [("/v1/tokenize", {"prompt": 5}, "prompt"), ("/v1/tokenize", {}, "prompt"),
     ("/v1/tokenize", b'{"prompt": "a\\ud800"}', "prompt"),
     ("/v1/detokenize", {"tokens": [1.5]}, "tokens"), ("/v1/detokenize", {"tokens": "ab"}, "tokens"),
     ("/v1/detokenize", {"tokens": [-1]}, "tokens"), ("/detokenize", {"tokens": [300]}, "tokens"),
     ("/v1/detokenize", {"tokens": [True]}, "tokens")],
)  # fmt: skip
def test_bad_tokenize_and_detokenize_bodies_are_400s(server, path, body, param):
    assert error_of(post(server.url, path, body), 400)["param"] == param


# ---------------------------------------------------------------------------------------------
# metrics


def scrape(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample /metrics gives."""
    r = httpx.get(f"{url}/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def answered(samples: dict, route: str, code: int) -> float | None:
    key = ("retrolm_http_requests_total", (("code", str(code)), ("route", route)))
    return samples.get(key)


def test_metrics_count_requests_tokens_latencies_and_the_database(world, db):  # noqa: F811
    with serve(world) as s, serve(world) as other:  # two apps in one process: own registries
        ids = db.tokenizer.encode(PROMPT)
        assert complete(s.url, prompt=PROMPT, max_tokens=10, temperature=0).status_code == 200
        assert complete(s.url, prompt=PROMPT, max_tokens=0).status_code == 400
        got = scrape(s.url)
        assert answered(got, "/v1/completions", 200) == answered(got, "/v1/completions", 400) == 1
        assert got[("retrolm_prompt_tokens_total", ())] == len(ids)
        assert got[("retrolm_generation_tokens_total", ())] == 10
        assert got[("retrolm_time_to_first_token_seconds_count", ())] == 1
        assert got[("retrolm_inter_token_latency_seconds_count", ())] == 9
        assert got[("retrolm_retrieval_seconds_count", ())] >= 1  # prompt chunks, then new ones
        assert got[("retrolm_requests_running", ())] == 0
        assert got[("retrolm_requests_waiting", ())] == 0
        assert got[("retrolm_database_version", ())] == 1
        assert got[("retrolm_database_chunks", ())] == db.num_chunks
        fresh = scrape(other.url)
        assert fresh[("retrolm_prompt_tokens_total", ())] == 0
        assert answered(fresh, "/v1/completions", 200) is None
        httpx.get(f"{s.url}/nowhere")
        assert answered(scrape(s.url), "other", 404) == 1


# ---------------------------------------------------------------------------------------------
# health while loading; the command


def test_health_is_503_loading_until_the_model_and_database_are_loaded(world, monkeypatch):  # noqa: F811
    """With `background`, the app answers at once: /health 503 {"status": "loading"} and the
    API 503 until the load ends, then 200; a load that fails leaves /health 503 "error"."""
    gate = threading.Event()
    real = app_module.load_served

    def slow(*args, **kwargs):
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_served", slow)
    settings = ServeSettings(api_key=KEY, reload_interval=0)
    app = create_app(world["retro"], world["db"], settings, model=world["model"], background=True)
    with Server(app) as s:
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = complete(s.url, prompt="fox", max_tokens=2)
        assert "loading" in error_of(r, 503)["message"]
        assert error_of(httpx.get(f"{s.url}/v1/models", headers=AUTH), 503)
        gate.set()
        wait_until(lambda: httpx.get(f"{s.url}/health").status_code == 200, what="loaded")
        assert complete(s.url, prompt="fox", max_tokens=2).status_code == 200

    def failing(*args, **kwargs):
        raise RuntimeError("injected load failure")

    monkeypatch.setattr(app_module, "load_served", failing)
    failures: list = []
    app = create_app(world["retro"], world["db"], settings, background=True)
    app.state.on_load_error = failures.append
    with Server(app) as s:
        wait_until(lambda: failures, what="the failed load")
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and r.json() == {"status": "error"}
        h = httpx.get(f"{s.url}/health", headers=AUTH).json()
        assert "injected load failure" in h["error"]
        error = error_of(complete(s.url, prompt="fox", max_tokens=2), 503)
        assert error["code"] == "load_failed"


@pytest.mark.parametrize(
    "flags,message",
    [(["--max-batch", "1000000000"], "lower --max-batch"), (["--neighbours", "100000000"], "--neighbours")],
)  # fmt: skip
def test_cli_a_model_that_cannot_load_stops_the_server_with_a_one_line_error(
    world,  # noqa: F811
    capsys,
    monkeypatch,
    flags,
    message,
):
    """The server is up (it loads in the background) when the decoding cache cannot be
    allocated: it stops, and the command ends with exit status 2 and the reason."""
    monkeypatch.delenv("RETROLM_API_KEY", raising=False)
    args = ["serve", str(world["retro"]), "--db", str(world["db"]), "--port", str(free_port())]
    assert cli_main([*args, *flags]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# a RETRO-fitted Hugging Face model


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    """tests/test_hf_pipeline.py's world: a tiny random GPT-2 RETRO-fitted for 4 steps."""
    from tests.test_evaluate import make_corpus
    from tests.test_hf_pipeline import ENCODER, db_build, make_gpt2_folder

    root = tmp_path_factory.mktemp("hf_serve_api")
    corpus = make_corpus(root / "corpus")
    make_gpt2_folder(root / "gpt2", corpus)
    assert db_build(corpus, root / "db", "--tokenizer", str(root / "gpt2")) == 0
    code = cli_main(
        ["train", "--db", str(root / "db"), "--out", str(root / "run"), "--retrofit",
         str(root / "gpt2"), "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--lr",
         "3e-3", "--warmup", "1", "--eval-every", "0", "--no-progress", *ENCODER]
    )  # fmt: skip
    assert code == 0
    return {"db": root / "db", "run": root / "run"}


def test_a_retrofitted_model_scores_and_gives_logprobs(hf_world):
    from fastapi.testclient import TestClient

    from retrolm.runs import load_run_model

    model = load_run_model(hf_world["run"])[0].eval()
    db = Database.open(hf_world["db"])
    prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron"
    ids = db.tokenizer.encode(prompt)
    assert len(ids) > 2 * db.chunk_size
    app = create_app(hf_world["run"], hf_world["db"], ServeSettings(reload_interval=0))
    with TestClient(app, base_url="http://localhost") as client:
        body = {"prompt": [prompt], "max_tokens": 0, "echo": True, "logprobs": 1}
        scored = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
        body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2, "n": 2}
        d = client.post("/v1/completions", json=body).json()
    np.testing.assert_allclose(
        scored["token_logprobs"][1:], reference_logprobs(model, db, ids), atol=2e-4
    )
    assert [c["index"] for c in d["choices"]] == [0, 1]
    assert d["choices"][0]["logprobs"] == d["choices"][1]["logprobs"]  # greedy twice
    lp = d["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 6
    assert all(x == max(t.values()) for x, t in zip(lp["token_logprobs"], lp["top_logprobs"]))
