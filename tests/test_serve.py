"""`retrolm serve`: the HTTP contracts (completions, streaming, attribution, search, models,
health), auth, every kind of bad request, batching of concurrent requests, the queue limit,
timeouts, cancelled streams, a live `db add`, graceful SIGTERM, the OpenAI client."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from retrolm.cli import main as cli_main
from retrolm.database import Database
from retrolm.generate import generate_text
from retrolm.model import RETRO
from retrolm.serve.app import create_app
from retrolm.serve.settings import ServeSettings
from tests.test_evaluate import build_world

PROMPT = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jugs"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def varied_model(run: Path) -> RETRO:
    """The run's model with fresh random weights: after 4 training steps the tiny model writes
    only spaces, which would make "same text alone and in a batch" an empty check."""
    model = RETRO.load(run / "model")
    torch.manual_seed(0)
    model.reset_parameters()
    with torch.no_grad():  # <eos> (id 1) scores 0, below the best of 299 random logits: the
        model.lm_head.weight[1] = 0  # server ends at <eos>, `generate_text` does not
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("serve-world"))
    w["model"] = varied_model(w["retro"])
    return w


class Server:
    """A uvicorn server on 127.0.0.1 (a free port) in a thread, always stopped."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("the test server did not start in 15 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"

    @property
    def engine(self):
        return self.app.state.engine


def serve(world, db=None, run=None, **settings) -> Server:
    """A server of the varied model (or of `run`'s own model) on the world's database."""
    settings.setdefault("api_key", KEY)
    settings.setdefault("reload_interval", 0)
    model = world["model"] if run is None else None
    app = create_app(
        run or world["retro"], db or world["db"], ServeSettings(**settings), model=model
    )
    return Server(app)


@pytest.fixture(scope="module")
def server(world):
    with serve(world, max_tokens=400, max_prompt_tokens=1000) as s:
        yield s


def complete(url: str, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=timeout)


def stream_events(response: httpx.Response) -> list:
    """The SSE `data:` payloads of a streamed response (JSON decoded, "[DONE]" kept as is)."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_same_sources(got: list, expected: list) -> None:
    """Equal attribution; distances up to float rounding (the embedder batches differently)."""

    def strip(chunks):
        return [
            {**c, "neighbours": [{**n, "score": None} for n in c["neighbours"]]} for c in chunks
        ]

    assert strip(got) == strip(expected)
    distances = [[n["score"] for n in c["neighbours"]] for c in got]
    expected_d = [[n["score"] for n in c["neighbours"]] for c in expected]
    for a, b in zip(distances, expected_d, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def wait_until(condition, seconds: float = 20.0, what: str = "condition") -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {seconds} s")


# ---------------------------------------------------------------------------------------------
# contracts


def test_health_models_and_page(server, world):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key: status only
    h = httpx.get(f"{server.url}/health", headers=AUTH).json()
    assert h["status"] == "ok" and h["retrieval"] is True
    db = Database.open(world["db"])
    assert h["database"]["documents"] == len(db.documents)
    assert h["database"]["chunks"] == db.num_chunks
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "retro"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/completions" in page.text


def test_completion_equals_generate_and_attributes_every_chunk(server, world):
    r = complete(server.url, prompt=PROMPT, max_tokens=40, temperature=0)
    assert r.status_code == 200
    d = r.json()
    alone = generate_text(
        world["retro"], world["db"], PROMPT, max_new_tokens=40, model=world["model"]
    )
    assert d["object"] == "text_completion" and d["model"] == "retro"
    assert d["choices"][0]["text"] == alone.text and alone.text.strip()
    assert d["choices"][0]["finish_reason"] == "length"
    assert d["usage"] == {
        "prompt_tokens": alone.prompt_tokens,
        "completion_tokens": 40,
        "total_tokens": alone.prompt_tokens + 40,
    }
    # one entry per completed chunk that a later token read, as `retrolm generate` reports them
    assert_same_sources(
        d["retrieved"],
        [
            {**c.__dict__, "neighbours": [n.__dict__ for n in c.neighbours]}
            for c in alone.attribution
        ],
    )
    db = Database.open(world["db"])
    assert len(d["retrieved"]) == (alone.prompt_tokens + 40 - 1) // db.chunk_size
    for chunk in d["retrieved"]:
        hits = db.search(chunk["text"], k=2)[0]
        assert [n["document"] for n in chunk["neighbours"]] == [h.document_name for h in hits]
        assert [n["text"] for n in chunk["neighbours"]] == [h.text for h in hits]
        np.testing.assert_allclose(
            [n["score"] for n in chunk["neighbours"]], [h.score for h in hits], rtol=1e-5
        )


def test_streaming_sends_pieces_sources_usage_then_done(server, world):
    body = dict(prompt=PROMPT, max_tokens=50, temperature=0)
    pieces: list[str] = []  # what `retrolm generate` streams for the same greedy completion
    generate_text(
        world["retro"], world["db"], PROMPT, max_new_tokens=50, model=world["model"],
        on_text=pieces.append,
    )  # fmt: skip
    whole = complete(server.url, **body).json()
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
        timeout=60,
    ) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = stream_events(r)
    assert events[-1] == "[DONE]"
    events = events[:-1]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == whole["choices"][0]["text"]
    # token by token, not at once: the pieces `generate_text` streams (how many depends on the
    # bytes this random model writes: a token inside a UTF-8 character waits for the next)
    assert [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]] == pieces
    assert len(pieces) > 3
    chunks = [c for e in events for c in e.get("retrieved", [])]
    assert_same_sources(chunks, whole["retrieved"])
    assert all(e["id"] == events[0]["id"] and e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"] == whole["usage"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_generation_past_the_window(server, world):
    n = 300  # the tiny model's max_seq_len is 128
    r = complete(server.url, prompt="the quick", max_tokens=n, temperature=0).json()
    alone = generate_text(
        world["retro"], world["db"], "the quick", max_new_tokens=n, model=world["model"]
    )
    assert r["choices"][0]["text"] == alone.text
    assert r["usage"]["completion_tokens"] == n
    assert len(r["retrieved"]) == (alone.prompt_tokens + n - 1) // 16


def test_a_prompt_longer_than_the_window_is_read_as_generate_reads_it(server, world):
    """A prompt over max_seq_len loses its oldest whole chunks (as `retrolm generate` and the
    model's own window do): the same text, and sources for the kept chunks only."""
    prompt = PROMPT * 20  # about 5 x the tiny model's max_seq_len of 128 tokens
    r = complete(server.url, prompt=prompt, max_tokens=30, temperature=0).json()
    alone = generate_text(
        world["retro"], world["db"], prompt, max_new_tokens=30, model=world["model"]
    )
    assert alone.prompt_tokens > 128 and r["usage"]["prompt_tokens"] == alone.prompt_tokens
    assert r["choices"][0]["text"] == alone.text
    indexes = [c["chunk_index"] for c in r["retrieved"]]
    assert indexes == [c.chunk_index for c in alone.attribution] and indexes[0] > 0


def test_a_baseline_run_is_served_without_retrieval(world):
    with serve(world, run=world["base"]) as s:
        d = complete(s.url, prompt=PROMPT, max_tokens=20, temperature=0).json()
        alone = generate_text(world["base"], world["db"], PROMPT, max_new_tokens=20)
        assert d["choices"][0]["text"] == alone.text and d["retrieved"] == []
        assert httpx.get(f"{s.url}/health", headers=AUTH).json()["retrieval"] is False


def test_stop_strings_and_seeded_sampling(server):
    greedy = complete(server.url, prompt=PROMPT, max_tokens=40, temperature=0).json()
    text = greedy["choices"][0]["text"]
    stop = text[10:13]
    cut = complete(server.url, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00"])
    d = cut.json()
    assert d["choices"][0]["text"] == text[: text.index(stop)]
    assert d["choices"][0]["finish_reason"] == "stop"
    body = dict(prompt=PROMPT, max_tokens=30, temperature=1.0, top_p=0.9, top_k=50)
    a = complete(server.url, **body, seed=7).json()["choices"][0]["text"]
    b = complete(server.url, **body, seed=7).json()["choices"][0]["text"]
    c = complete(server.url, **body, seed=8).json()["choices"][0]["text"]
    assert a == b and a != c


def test_eos_ends_a_completion_with_finish_reason_stop(world):
    """A model made to prefer <eos> (id 1) where greedy decoding would write a token seen
    first at step >= 5 ends there: the text before <eos>, finish_reason "stop", and the <eos>
    counted in completion_tokens. The expected tokens come from `generate_text` with the same
    model (which does not stop at <eos>)."""
    import copy

    alone = generate_text(
        world["retro"], world["db"], PROMPT, max_new_tokens=40, model=world["model"]
    )
    generated = alone.tokens[alone.prompt_tokens :]
    j = next(i for i in range(5, len(generated)) if generated[i] not in generated[:i])
    eos_model = copy.deepcopy(world["model"])
    with torch.no_grad():  # <eos> scores 1.01x that token's logit: above it wherever it leads
        eos_model.lm_head.weight[1] = 1.01 * eos_model.lm_head.weight[generated[j]]
    expected = generate_text(
        world["retro"], world["db"], PROMPT, max_new_tokens=40, model=eos_model
    ).tokens[alone.prompt_tokens :]
    assert 1 in expected, "the constructed model never writes <eos>"
    stop = expected.index(1)
    tokenizer = Database.open(world["db"]).tokenizer
    app = create_app(
        world["retro"],
        world["db"],
        ServeSettings(api_key=KEY, reload_interval=0),
        model=eos_model,
    )
    with Server(app) as s:
        d = complete(s.url, prompt=PROMPT, max_tokens=40, temperature=0).json()
    assert d["choices"][0]["finish_reason"] == "stop"
    assert d["usage"]["completion_tokens"] == stop + 1  # <eos> was computed: counted, as vLLM does
    assert d["choices"][0]["text"] == tokenizer.decode(expected[:stop])


def test_search_returns_the_database_hits(server, world):
    r = httpx.post(f"{server.url}/v1/search", json={"query": "lazy dog", "k": 3}, headers=AUTH)
    assert r.status_code == 200
    hits = Database.open(world["db"]).search("lazy dog", k=3)[0]
    assert [(h["chunk_id"], h["document"], h["text"]) for h in r.json()["data"]] == [
        (h.chunk_id, h.document_name, h.text) for h in hits
    ]


def test_api_key_is_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
        r = httpx.post(f"{server.url}/v1/search", json={"query": "a"}, headers=headers)
        assert r.status_code == 401
    assert complete(server.url, prompt="a", max_tokens=1).status_code == 200


BAD_REQUESTS = {
    "malformed json": ("/v1/completions", b'{"prompt": "a",', 400),
    "not an object": ("/v1/completions", b'["a"]', 400),
    "missing prompt": ("/v1/completions", {"max_tokens": 3}, 400),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400),
    "prompt not a string": ("/v1/completions", {"prompt": 12}, 400),
    "max_tokens a string": ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400),
    "max_tokens a float": ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}, 400),
    "stream not a bool": ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400),
    "stop not strings": ("/v1/completions", {"prompt": "a", "stop": [1]}, 400),
    "five stops": ("/v1/completions", {"prompt": "a", "stop": list("abcde")}, 400),
    "max_tokens 0": ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    "max_tokens over the limit": ("/v1/completions", {"prompt": "a", "max_tokens": 401}, 400),
    "negative temperature": ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400),
    "top_p 0": ("/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    "top_k 0": ("/v1/completions", {"prompt": "a", "top_k": 0}, 400),
    "prompt too long": ("/v1/completions", {"prompt": "dog " * 1200}, 400),  # > 1000 tokens
    "body too large": ("/v1/completions", {"prompt": "x" * 70_000}, 413),
    "search k 0": ("/v1/search", {"query": "a", "k": 0}, 400),
    "search k over the limit": ("/v1/search", {"query": "a", "k": 51}, 400),
    "search no query": ("/v1/search", {"k": 2}, 400),
    "unknown path": ("/v1/chat/nothing", {}, 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_one_json_error_shape(server, case):
    path, body, status = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server.url + path, content=content, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in r.text
    assert isinstance(error["type"], str)


def test_oversized_body_without_content_length_is_refused(server):
    def chunks():
        for _ in range(20):
            yield b"x" * 8192

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("the request body")
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405


# ---------------------------------------------------------------------------------------------
# concurrency


def test_sixteen_concurrent_requests_share_forward_passes_and_match_alone(server):
    prompts = [f"{PROMPT[: 5 + 4 * i]}" for i in range(16)]
    alone = [
        complete(server.url, prompt=p, max_tokens=30 + i, temperature=0).json()
        for i, p in enumerate(prompts)
    ]
    steps_before = server.engine.decoder.steps
    with ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(complete, server.url, prompt=p, max_tokens=30 + i, temperature=0)
            for i, p in enumerate(prompts)
        ]
        together = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in together)
    for a, t in zip(alone, together, strict=True):
        assert t.json()["choices"][0]["text"] == a["choices"][0]["text"]
        assert_same_sources(t.json()["retrieved"], a["retrieved"])
    assert len({a["choices"][0]["text"] for a in alone}) > 8  # distinct texts, not one answer
    tokens = sum(30 + i for i in range(16))
    assert server.engine.decoder.steps - steps_before < tokens / 3  # rows shared steps


def test_queue_limit_429_and_a_cancelled_stream_frees_its_row(world):
    with serve(world, max_batch=1, max_queue=1, max_tokens=4000) as s:
        with httpx.Client(headers=AUTH, timeout=60) as client:
            body = {"prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "stream": True}
            with client.stream("POST", f"{s.url}/v1/completions", json=body) as held:
                lines = held.iter_lines()
                next(line for line in lines if line.startswith("data:"))  # it is decoding
                assert s.engine.running == 1
                with ThreadPoolExecutor(1) as pool:  # waits in the queue for the row
                    waiting = pool.submit(complete, s.url, prompt="fox", max_tokens=5)
                    wait_until(lambda: s.engine.queued == 1, what="one request queued")
                    r = complete(s.url, prompt="dog", max_tokens=5)
                    assert r.status_code == 429
                    assert r.json()["error"]["type"] == "rate_limit_error"
                    # the stream is closed here, long before its 4000 tokens
                    held.close()
                    assert waiting.result(timeout=30).status_code == 200
        wait_until(lambda: s.engine.running == 0 and s.engine.queued == 0, what="rows freed")
        assert s.engine.completed == 1  # the cancelled stream never completed


def test_request_timeout(world):
    with serve(world, request_timeout=0.3, max_tokens=4000) as s:
        r = complete(s.url, prompt=PROMPT, max_tokens=4000, temperature=0)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        # greedy: sampled at temperature 1, <eos> could end the stream before the timeout
        body = {"prompt": PROMPT, "max_tokens": 4000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=AUTH) as r:
            events = stream_events(r)
        errors = [e["error"]["type"] for e in events[:-1] if isinstance(e, dict) and "error" in e]
        assert events[-1] == "[DONE]" and errors == ["timeout"], events[-3:]
        wait_until(lambda: s.engine.running == 0, what="timed-out rows freed")


# ---------------------------------------------------------------------------------------------
# live database


def test_db_add_is_served_within_seconds_without_failing_a_request_in_flight(world, tmp_path):
    db = shutil.copytree(world["db"], tmp_path / "db")
    new = tmp_path / "new"
    new.mkdir()
    marker = "zebra xylophone quartz nebula"
    for i in range(4):  # some land in the valid split, which is not searched
        (new / f"extra{i}.txt").write_text(f"{marker} {i} " * 6, encoding="utf-8")
    with serve(world, db=db, reload_interval=0.2) as s:
        before = httpx.get(f"{s.url}/health", headers=AUTH).json()["database"]
        results: dict = {}

        def in_flight():
            body = {"prompt": PROMPT, "max_tokens": 120, "temperature": 0, "stream": True}
            with httpx.stream(
                "POST", f"{s.url}/v1/completions", json=body, headers=AUTH, timeout=120
            ) as r:
                results["status"] = r.status_code
                results["events"] = stream_events(r)

        thread = threading.Thread(target=in_flight)
        thread.start()
        wait_until(lambda: s.engine.running == 1, what="a request in flight")
        assert cli_main(["db", "add", str(db), str(new)]) == 0
        added = [
            d.name for d in Database.open(db).documents if "extra" in d.name and d.split == "train"
        ]
        assert added, "no added document in the train split"

        def found() -> bool:
            r = httpx.post(f"{s.url}/v1/search", json={"query": marker, "k": 3}, headers=AUTH)
            return any(h["document"] in added for h in r.json()["data"])

        wait_until(found, seconds=20, what="the added documents served")
        after = httpx.get(f"{s.url}/health", headers=AUTH).json()["database"]
        assert after["version"] > before["version"]
        assert after["documents"] == before["documents"] + 4
        thread.join(timeout=60)
        assert results["status"] == 200 and results["events"][-1] == "[DONE]"
        assert results["events"][-2]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------
# the command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_and_sigterm_lets_the_request_in_flight_finish(world):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RETROLM_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "retrolm", "serve", str(world["retro"]), "--db", str(world["db"])]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--max-tokens", "3000"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            return False

        wait_until(up, seconds=60, what="the server up")
        assert complete(url, prompt="fox", max_tokens=3).status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key from the environment
        body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=120
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        events = [json.loads(x[6:]) for x in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
        assert events[-1]["usage"]["completion_tokens"] == 300
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped" in proc.stdout.read()


def test_cli_bad_arguments_are_one_line_errors(world, tmp_path, capsys):
    args = ["serve", str(world["retro"]), "--db", str(world["db"])]
    assert cli_main([*args, "--max-batch", "0"]) == 2
    assert "--max-batch must be a positive integer" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path / "none"), "--db", str(world["db"])]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main([*args[:2], "--db", str(tmp_path / "nodb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_openai_client_works(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == ["retro"]
    out = client.completions.create(model="retro", prompt=PROMPT, max_tokens=20, temperature=0)
    expected = complete(server.url, prompt=PROMPT, max_tokens=20, temperature=0).json()
    assert out.choices[0].text == expected["choices"][0]["text"]
    assert out.usage.completion_tokens == 20
    assert_same_sources(out.model_extra["retrieved"], expected["retrieved"])
    pieces = client.completions.create(
        model="retro", prompt=PROMPT, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == expected["choices"][0]["text"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="retro", prompt=PROMPT, max_tokens=0)
