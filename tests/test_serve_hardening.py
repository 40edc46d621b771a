"""`retrolm serve` against hostile or careless clients and operators: values at the edges of
what validation accepts, fields it does not implement, a request that fails inside the worker,
clients that go away, Host headers of other sites, keys that are empty, a shutdown that times
out, a database that cannot be reloaded."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import httpx
import pytest
import torch
import uvicorn

import retrolm.decoding as batch_module
from retrolm.cli import main as cli_main
from retrolm.database import Database
from retrolm.decoding import sample_next
from retrolm.errors import ConfigError
from retrolm.serve.app import GracefulServer, create_app
from retrolm.serve.engine import Completion, LiveDatabase, _held_back
from retrolm.serve.settings import ServeSettings, host_name
from tests.test_serve import AUTH, KEY, PROMPT, complete, serve, stream_events, wait_until
from tests.test_serve import world as world  # noqa: F401 (the module's fixture)


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    with serve(world, max_tokens=100_000, max_prompt_tokens=1000) as s:
        yield s


def post(url: str, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in r.text
    return error


def stream(url: str, **body) -> list:
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        return stream_events(r)


# ---------------------------------------------------------------------------------------------
# the decoding worker survives what one request does


@pytest.mark.parametrize("seed", [2**70, 2**64, 2**63, -(2**63) - 1])
def test_a_seed_torch_cannot_take_is_a_400(server, seed):
    error = error_of(complete(server.url, prompt="fox", max_tokens=2, seed=seed), 400)
    assert error["param"] == "seed" and "2**63" in error["message"]


def test_seeds_at_the_int64_edges_are_served(server):
    for seed in (2**63 - 1, -(2**63), -1, 0):
        r = complete(server.url, prompt="fox", max_tokens=2, seed=seed, timeout=30)
        assert r.status_code == 200, r.text


def test_a_request_that_cannot_start_fails_alone_and_the_worker_goes_on(server):
    """A request the worker cannot set up (here a seed that passed no validation) gets an
    error event; the worker serves the next requests."""
    engine = server.engine
    failed = engine.failed
    engine.submit(Completion(prompt_ids=[5, 6, 7], max_tokens=2, seed=2**70))
    wait_until(lambda: engine.failed == failed + 1, seconds=10, what="the request failed")
    assert engine.alive
    assert complete(server.url, prompt="fox", max_tokens=3, timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def greedy_texts(url: str, prompts: list[str], n: int) -> list[str]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        rs = list(pool.map(lambda p: complete(url, prompt=p, max_tokens=n, temperature=0), prompts))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    return [r.json()["choices"][0]["text"] for r in rs]


PROMPTS = ["the quick brown", "a lazy dog", "seven wizards hex", "bad jugs quietly"]
N = 200  # tokens per greedy request: past the window, and long enough to overlap the others


def test_a_sequence_whose_sampling_fails_ends_alone(server, monkeypatch):
    """Sampling raises for the rows at temperature 1.25 only: those requests get a 500 JSON
    error (streamed: an error event, then [DONE]); the requests decoded in the same batch
    finish with the text they give alone, and later requests are served."""
    alone = greedy_texts(server.url, PROMPTS, N)
    real = batch_module.sample_next

    def failing(logits, temperature, *args):
        if temperature == 1.25:
            raise RuntimeError("injected sampling failure")
        return real(logits, temperature, *args)

    monkeypatch.setattr(batch_module, "sample_next", failing)
    engine = server.engine
    failed = engine.failed
    with ThreadPoolExecutor(8) as pool:
        together = pool.submit(greedy_texts, server.url, PROMPTS, N)
        wait_until(lambda: engine.running == len(PROMPTS), what="the greedy requests decoding")
        sampled = pool.submit(complete, server.url, prompt="dog", max_tokens=30, temperature=0.7)
        bad = pool.submit(complete, server.url, prompt="fox", max_tokens=30, temperature=1.25)
        bad_stream = pool.submit(stream, server.url, prompt="fox", max_tokens=30, temperature=1.25)
        assert together.result() == alone
        assert sampled.result().status_code == 200
        error = error_of(bad.result(), 500)
        assert error["type"] == "server_error" and "injected sampling failure" in error["message"]
        events = bad_stream.result()
    assert events[-1] == "[DONE]" and "injected sampling failure" in events[-2]["error"]["message"]
    assert engine.failed == failed + 2
    wait_until(lambda: engine.running == 0, what="rows freed")
    assert greedy_texts(server.url, PROMPTS[:2], N) == alone[:2]


def test_a_forward_pass_that_fails_fails_only_its_request(server, monkeypatch):
    """The batched forward pass raises whenever one request's window is in it: the step is
    retried one sequence at a time (each row encoded again), that request fails, and the
    others give the text they give alone."""
    tokenizer = Database.open(server.app.state.database.path).tokenizer
    poison = "zebra xylophone quartz nebula " * 3
    head = tokenizer.encode(poison)[:6]
    alone = greedy_texts(server.url, PROMPTS, N)
    model = server.engine.decoder.model
    real = model.prefill_rows

    def failing(cache, rows, windows, neighbours):
        if any(w[:6].tolist() == head for w in windows):
            raise RuntimeError("injected forward failure")
        return real(cache, rows, windows, neighbours)

    monkeypatch.setattr(model, "prefill_rows", failing)
    with ThreadPoolExecutor(5) as pool:
        together = pool.submit(greedy_texts, server.url, PROMPTS, N)
        wait_until(lambda: server.engine.running == len(PROMPTS), what="the others decoding")
        bad = complete(server.url, prompt=poison, max_tokens=5, temperature=0)
        assert together.result() == alone
    assert "injected forward failure" in error_of(bad, 500)["message"]
    assert greedy_texts(server.url, PROMPTS[:1], N) == alone[:1]


# ---------------------------------------------------------------------------------------------
# sampling at the edges of what validation accepts


@pytest.mark.parametrize("temperature", [5e-324, 1e-320, 1e-300, 1e-6, 1e-4, 0.01, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [None, 5e-324, 1e-300, 1e-8, 0.5, 1.0])
def test_sample_next_draws_a_valid_token_for_every_accepted_value(temperature, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 30
    logits[1, 7] = 1e30  # would overflow to inf divided by a small temperature
    for top_k in (None, 1, 5):
        tokens = sample_next(logits, temperature, top_k, top_p, g)
        assert tokens.shape == (3,) and ((tokens >= 0) & (tokens < 50)).all()
        if temperature < 1e-5 or top_k == 1 or (top_p is not None and top_p < 1e-6):
            assert tokens.tolist() == logits.argmax(-1).tolist()


def test_sample_next_never_draws_nan_and_prefers_inf():
    g = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 1.0, 2.0], [inf, 0.0, inf], [-inf, -inf, -inf], [nan] * 3])
    for _ in range(20):
        a, b, c, d = sample_next(logits, 1.0, None, None, g).tolist()
        assert a in (1, 2) and b in (0, 2) and 0 <= c < 3 and 0 <= d < 3
        assert sample_next(logits, 0.7, 2, 0.5, g).tolist()[:2] in ([2, 0], [2, 2])


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 1e-320}, {"top_p": 1e-300}, {"temperature": 1e-300, "top_p": 5e-324}],
)
def test_tiny_temperature_or_top_p_are_served_as_greedy(server, sampling):
    greedy = complete(server.url, prompt=PROMPT, max_tokens=12, temperature=0).json()
    r = complete(server.url, prompt=PROMPT, max_tokens=12, seed=3, **sampling)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


# ---------------------------------------------------------------------------------------------
# request fields


UNSUPPORTED = [("best_of", 3), ("suffix", "tail"), ("presence_penalty", 0.5),
               ("frequency_penalty", -1), ("logit_bias", {"50": 100})]  # fmt: skip
DEFAULTS = [("n", 1), ("best_of", 1), ("best_of", None), ("logprobs", None), ("echo", False),
            ("suffix", None), ("suffix", ""), ("presence_penalty", 0), ("frequency_penalty", 0.0),
            ("logit_bias", {}), ("logit_bias", None), ("user", "someone"), ("n", None)]  # fmt: skip


@pytest.mark.parametrize("field,value", UNSUPPORTED)
def test_fields_this_server_does_not_implement_are_refused(server, field, value):
    r = post(server.url, "/v1/completions", {"prompt": "fox", "max_tokens": 2, field: value})
    error = error_of(r, 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(field) and "not supported by this server" in error["message"]


@pytest.mark.parametrize("field,value", DEFAULTS)
def test_those_fields_at_their_defaults_are_accepted(server, field, value):
    r = post(server.url, "/v1/completions", {"prompt": "fox", "max_tokens": 2, field: value})
    assert r.status_code == 200, r.text


STRICT = [("temperature", "0.5"), ("temperature", True), ("top_p", "1"), ("top_p", False),
          ("max_tokens", True), ("max_tokens", "3"), ("max_tokens", 2.0), ("top_k", True),
          ("top_k", 2.0), ("seed", True), ("seed", "7"), ("seed", 1.5), ("stream", 1),
          ("stream", "true"), ("n", True), ("n", 1.0), ("presence_penalty", "0"),
          ("echo", 0), ("logprobs", True)]  # fmt: skip


@pytest.mark.parametrize("field,value", STRICT)
def test_numbers_and_booleans_are_strict(server, field, value):
    r = post(server.url, "/v1/completions", {"prompt": "fox", "max_tokens": 2, field: value})
    assert error_of(r, 400)["param"] == field


@pytest.mark.parametrize("body", [{"k": True}, {"k": "3"}, {"k": 2.0}])
def test_search_k_is_strict(server, body):
    r = post(server.url, "/v1/search", {"query": "dog", **body})
    assert error_of(r, 400)["param"] == "k"


def test_integers_are_numbers_and_null_is_the_default(server):
    for body in ({"temperature": 0, "top_p": 1}, {"temperature": 1, "seed": 4},
                 {"temperature": None, "top_p": None, "max_tokens": None, "stream": None}):  # fmt: skip
        r = post(server.url, "/v1/completions", {"prompt": "fox", "max_tokens": 2, **body})
        assert r.status_code == 200, r.text
    assert post(server.url, "/v1/search", {"query": "dog", "k": None}).status_code == 200


@pytest.mark.parametrize("stream_it", [False, True])
def test_another_model_is_a_404_model_not_found(server, stream_it):
    for model in ("gpt-4", ""):
        r = post(
            server.url, "/v1/completions", {"prompt": "a", "model": model, "stream": stream_it}
        )
        error = error_of(r, 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert f"`{model}` does not exist" in error["message"] and "retro" in error["message"]
    for body in ({"model": "retro"}, {}, {"model": None}):
        r = post(server.url, "/v1/completions", {"prompt": "a", "max_tokens": 1, **body})
        assert r.status_code == 200, r.text


BAD_BODIES = {
    "no body": (b"", "the body is empty"),
    "null": (b"null", "must be a JSON object"),
    "a string": (b'"abc"', "must be a JSON object"),
    "invalid UTF-8": (b'{"prompt": "\xff\xfe"}', "could not be read as JSON"),
    "nested 20000 deep": (b"[" * 20000 + b"]" * 20000, "could not be read as JSON"),
    "an integer of 5000 digits": (
        b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
        "could not be read as JSON",
    ),  # fmt: skip
    "temperature NaN": (b'{"prompt": "a", "temperature": NaN}', "finite"),
    "top_p Infinity": (b'{"prompt": "a", "top_p": Infinity}', "finite"),
    "an empty list of prompts": (b'{"prompt": []}', "a list of token-id lists"),
    "strings and token ids mixed": (b'{"prompt": ["a", 2]}', "not a mix of them"),
    "a lone surrogate in stop": (b'{"prompt": "a", "stop": "\\udc00"}', "lone surrogate"),
    "a lone surrogate in the prompt": (b'{"prompt": "a\\ud800"}', "prompt"),
    "a stop of 1001 characters": (
        json.dumps({"prompt": "a", "stop": "x" * 1001}).encode(),
        "at most 1000 characters",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_a_message_saying_what_to_send(server, case):
    body, expected = BAD_BODIES[case]
    assert expected in error_of(post(server.url, "/v1/completions", body), 400)["message"]


def test_a_body_sent_as_text_plain_is_told_to_say_json(server):
    r = post(server.url, "/v1/completions", {"prompt": "a"}, {"Content-Type": "text/plain"})
    assert "Content-Type: application/json" in error_of(r, 400)["message"]


def test_a_lone_surrogate_in_a_search_query_is_a_400(server):
    assert error_of(post(server.url, "/v1/search", b'{"query": "a\\ud800"}'), 400)


def test_held_back_equals_the_plain_definition():
    """The characters held back are the longest end of the text that begins a stop string."""
    import random

    def plain(text, stops):
        return max(
            [n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1)
             if text.endswith(s[:n])] or [0]
        )  # fmt: skip

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 10)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(3)]
        assert _held_back(text, stops) == plain(text, stops), (text, stops)


# ---------------------------------------------------------------------------------------------
# hosts, keys, what clients without a key see


@pytest.mark.parametrize(
    "host,status",
    [("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400),
     ("localhost.evil.example", 400), ("evil.example:80@localhost", 400), ("localhost:abc", 400),
     ("localhost:8000", 200), ("LOCALHOST", 200), ("localhost.", 200), ("127.0.0.1:1", 200),
     ("[::1]:8000", 200), ("[::1]", 200)],
)  # fmt: skip
def test_only_loopback_host_names_are_served_by_default(server, host, status):
    for r in (
        httpx.get(f"{server.url}/health", headers={"Host": host}),
        post(server.url, "/v1/completions", {"prompt": "a", "max_tokens": 1}, {"Host": host}),
    ):
        assert r.status_code == status, r.text
        if status == 400:
            error = r.json()["error"]
            assert error["code"] == "host_not_allowed" and "--allowed-hosts" in error["message"]


def test_a_request_without_host_is_refused(server):
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"no Host header" in answer


@pytest.mark.parametrize(
    "allowed,host,ok",
    [(("*",), "evil.example", True), (("example.com",), "example.com:443", True),
     (("example.com",), "www.example.com", False), (("*.example.com",), "a.b.example.com", True),
     (("*.example.com",), "example.com", False), (("*.example.com",), "badexample.com", False),
     (("[::1]",), "[::1]:1", True), (("10.0.0.5",), "10.0.0.5:8000", True), ((), "10.0.0.5", False),
     (("Example.COM.",), "example.com", True), ("a.example,b.example", "b.example", True)],
)  # fmt: skip
def test_allowed_hosts(allowed, host, ok):
    assert ServeSettings(allowed_hosts=allowed).host_allowed(host) is ok


@pytest.mark.parametrize("value", ["a/b", "", "x*y", "a b"])
def test_allowed_hosts_that_are_not_names_are_config_errors(value):
    with pytest.raises(ConfigError, match="is not a host name"):
        ServeSettings(allowed_hosts=(value,))


def test_host_name_parsing():
    assert host_name("LocalHost:80") == "localhost" and host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1" and host_name("a:b") is None and host_name("[::1") is None


def test_a_server_with_allowed_hosts_serves_those(world):  # noqa: F811
    with serve(world, allowed_hosts=("retro.lan",)) as s:
        assert httpx.get(f"{s.url}/health", headers={"Host": "retro.lan:8000"}).status_code == 200
        assert httpx.get(f"{s.url}/health", headers={"Host": "other.lan"}).status_code == 400
        assert httpx.get(f"{s.url}/health").status_code == 200  # loopback always


@pytest.mark.parametrize("key", ["", "   ", " padded", "tab\t", "kéy"])
def test_an_unusable_api_key_is_a_config_error(key):
    with pytest.raises(ConfigError, match="api_key"):
        ServeSettings(api_key=key)


@pytest.mark.parametrize(
    "settings",
    [{"max_batch": 0}, {"max_queue": -1}, {"max_tokens": True}, {"neighbours": 0},
     {"request_timeout": float("nan")}, {"request_timeout": 0}, {"reload_interval": -1},
     {"reload_interval": float("inf")}, {"model_name": " "}],
)  # fmt: skip
def test_settings_out_of_range_are_config_errors(settings):
    with pytest.raises(ConfigError):
        ServeSettings(**settings)


def test_health_and_openapi_tell_clients_without_the_key_nothing_more(server, world):  # noqa: F811
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert httpx.get(f"{server.url}/health", headers=headers).json() == {"status": "ok"}
        r = httpx.get(f"{server.url}/openapi.json", headers=headers)
        assert error_of(r, 401)["type"] == "authentication_error"
    full = httpx.get(f"{server.url}/health", headers=AUTH).json()
    assert full["database"]["path"] == str(world["db"]) and full["model"] == "retro"
    assert (
        "/v1/completions" in httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()["paths"]
    )
    page = httpx.get(f"{server.url}/").text
    assert str(world["db"]) not in page and "retro" not in page.replace("retrolm", "")
    with serve(world, api_key=None) as s:  # no key: nothing to hide
        assert "database" in httpx.get(f"{s.url}/health").json()
        assert httpx.get(f"{s.url}/openapi.json").status_code == 200


def test_the_page_inserts_server_text_as_text_only():
    """Document names and texts, generated text and errors reach the page through
    textContent / text nodes: its only innerHTML writes clear an element."""
    html = resources.files("retrolm.serve").joinpath("static/index.html").read_text("utf-8")
    writes = re.findall(r"\.(innerHTML|outerHTML)\s*[+]?=\s*([^;]*);", html)
    assert writes and all(value.strip() == '""' for _, value in writes), writes
    assert "insertAdjacentHTML" not in html and "document.write" not in html
    assert 'fetch("/health", { headers: authHeaders() })' in html  # the key, where one is set


def test_an_in_process_client_names_a_served_host_and_the_app_restarts(world):  # noqa: F811
    """TestClient's default Host (testserver) is not a loopback name: it is refused like any
    other; the app runs again after its lifespan ended."""
    from fastapi.testclient import TestClient

    app = create_app(
        world["retro"], world["db"], ServeSettings(reload_interval=0), model=world["model"]
    )
    body = {"prompt": "fox", "max_tokens": 3, "temperature": 0}
    with TestClient(app) as client:
        assert client.post("/v1/completions", json=body).json()["error"]["code"] == (
            "host_not_allowed"
        )
    for _ in range(2):
        with TestClient(app, base_url="http://localhost") as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            assert client.get("/health").json()["status"] == "ok"


def test_health_is_503_error_when_the_worker_is_gone(world):  # noqa: F811
    with serve(world) as s:
        s.engine.stop()
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and r.json() == {"status": "error"}
        assert error_of(complete(s.url, prompt="fox", max_tokens=2), 503)


def test_while_draining_completions_are_503_and_health_says_shutting_down(world):  # noqa: F811
    from fastapi.testclient import TestClient

    app = create_app(
        world["retro"], world["db"], ServeSettings(reload_interval=0), model=world["model"]
    )
    with TestClient(app, base_url="http://localhost") as client:
        client.portal.call(app.state.drain, 60.0)
        r = client.post("/v1/completions", json={"prompt": "fox", "max_tokens": 2})
        assert "shutting down" in error_of(r, 503)["message"]
        assert client.get("/health").json()["status"] == "shutting_down"


# ---------------------------------------------------------------------------------------------
# clients that go away, shutdown


def test_a_non_streamed_client_that_goes_away_frees_its_row(server):
    engine = server.engine
    completed, cancelled = engine.completed, engine.cancelled
    body = {"prompt": PROMPT, "max_tokens": 50_000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=1.0)
    wait_until(lambda: engine.running == 0, seconds=5, what="the row freed")
    assert engine.cancelled == cancelled + 1 and engine.completed == completed


class GracefulThread:
    """`GracefulServer` on a free port in a thread (as `retrolm serve` runs it)."""

    def __init__(self, app, shutdown_timeout: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning")
        self.server = GracefulServer(app, config, shutdown_timeout)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        wait_until(lambda: self.server.started, seconds=15, what="the server up")


def test_streams_still_running_at_the_shutdown_timeout_end_with_an_error_event(world):  # noqa: F811
    app = create_app(
        world["retro"],
        world["db"],
        ServeSettings(api_key=KEY, reload_interval=0, max_tokens=100_000),
        model=world["model"],
    )
    s = GracefulThread(app, shutdown_timeout=0.5)
    body = {"prompt": PROMPT, "max_tokens": 100_000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        start = time.monotonic()
        s.server.should_exit = True  # what SIGTERM does
        rest = [line for line in lines if line]
    took = time.monotonic() - start
    s.thread.join(timeout=30)
    s.sock.close()
    assert not s.thread.is_alive()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2][len("data: ") :])["error"]
    assert error["type"] == "shutdown" and "--shutdown-timeout" in error["message"]
    assert 0.4 < took < 3, took


# ---------------------------------------------------------------------------------------------
# the database under the server


def test_a_refused_reload_is_logged_once_per_manifest_change(world, tmp_path, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setattr(logging.getLogger("retrolm"), "propagate", True)  # the CLI's setup stops it
    db = shutil.copytree(world["db"], tmp_path / "db")
    live = LiveDatabase(db, Database.open(db), interval=0)
    manifest = db / "manifest.json"
    good = manifest.read_text()
    caplog.set_level(logging.DEBUG, logger="retrolm.serve.engine")

    def warnings() -> int:
        return sum(
            r.levelno == logging.WARNING and r.name == "retrolm.serve.engine"
            for r in caplog.records
        )

    manifest.write_text(good[: len(good) // 2])
    for _ in range(5):  # the watcher retries at every poll
        assert live.reload(live._stat()) is False
    assert warnings() == 1 and "is not served" in live.refused
    manifest.write_text(good[: len(good) // 3])  # changed again: said again, once
    for _ in range(3):
        assert live.reload(live._stat()) is False
    assert warnings() == 2
    manifest.write_text(good)
    assert live.reload(live._stat()) is True and live.refused is None and live.version == 2


def test_health_says_why_the_database_on_disk_is_not_served(world, tmp_path):  # noqa: F811
    db = shutil.copytree(world["db"], tmp_path / "db")
    manifest = db / "manifest.json"
    good = manifest.read_text()
    with serve(world, db=db, reload_interval=0.1) as s:
        live = s.app.state.database
        manifest.write_text("{")
        wait_until(lambda: live.refused, seconds=10, what="the refusal")
        h = httpx.get(f"{s.url}/health", headers=AUTH).json()
        assert "is not served" in h["database"]["refused"] and h["database"]["version"] == 1
        assert complete(s.url, prompt="fox", max_tokens=3).status_code == 200
        manifest.unlink()
        wait_until(lambda: "no manifest.json" in (live.refused or ""), what="the missing one")
        assert complete(s.url, prompt="fox", max_tokens=3).status_code == 200
        manifest.write_text(good)
        wait_until(lambda: live.refused is None and live.version == 2, what="the reload")


# ---------------------------------------------------------------------------------------------
# the command


def never_serve(*args, **kwargs):
    raise AssertionError("the command went on to serve")


@pytest.mark.parametrize(
    "flags,message",
    [(["--port", "70000"], "--port must be from 1 to 65535"),
     (["--port", "0"], "--port must be from 1 to 65535"),
     (["--max-batch", "-1"], "--max-batch must be a positive integer"),
     (["--request-timeout", "nan"], "--request-timeout must be a finite number"),
     (["--request-timeout", "inf"], "--request-timeout must be a finite number"),
     (["--reload-interval", "nan"], "--reload-interval must be a finite number"),
     (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a finite number"),
     (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a finite number"),
     (["--model-name", " "], "--model-name must be a non-empty string"),
     (["--api-key", ""], "the API key from --api-key is empty"),
     (["--api-key", "  "], "the API key from --api-key is empty"),
     (["--host", "0.0.0.0"], "--allowed-hosts"),
     (["--host", "::"], "--allowed-hosts"),
     (["--allowed-hosts", ""], "--allowed-hosts is empty"),
     (["--allowed-hosts", "a/b"], "is not a host name"),
     (["--max-n", "0"], "--max-n must be a positive integer")],
)  # fmt: skip
def test_cli_bad_flags_are_one_line_errors(world, capsys, monkeypatch, flags, message):  # noqa: F811
    monkeypatch.delenv("RETROLM_API_KEY", raising=False)
    monkeypatch.setattr(GracefulServer, "run", never_serve)
    args = ["serve", str(world["retro"]), "--db", str(world["db"])]
    assert cli_main([*args, *flags]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["", " "])
def test_cli_an_empty_api_key_in_the_environment_is_an_error(world, capsys, monkeypatch, value):  # noqa: F811
    monkeypatch.setenv("RETROLM_API_KEY", value)
    monkeypatch.setattr(GracefulServer, "run", never_serve)
    assert cli_main(["serve", str(world["retro"]), "--db", str(world["db"])]) == 2
    assert "RETROLM_API_KEY is empty" in capsys.readouterr().err


def test_serve_flags_are_the_settings_fields_with_their_defaults_and_comments():
    """Each ServeSettings field the CLI sets as it is has a flag with the field's default and its
    comment as help, and the flags given reach the settings (`retrolm.cli.flags`)."""
    import argparse
    import dataclasses

    from retrolm.cli.flags import config_from_flags, field_comments
    from retrolm.cli.serve import SETTINGS_FLAGS, register
    from retrolm.serve.settings import ServeSettings

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    serve = parser._subparsers._group_actions[0].choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    defaults, comments = ServeSettings(), field_comments(ServeSettings)
    assert comments["max_queue"] == "requests waiting for a row; more get 429"
    assert comments["max_prompt_tokens"].startswith("tokens a prompt may have;")  # a comment above
    for name in SETTINGS_FLAGS:
        assert actions[name].option_strings == ["--" + name.replace("_", "-")]
        assert actions[name].default == getattr(defaults, name)
        assert actions[name].help == comments[name] != ""
    args = parser.parse_args(
        ["serve", "RUN", "--db", "DB", "--max-batch", "3", "--request-timeout", "9"]
    )
    settings = config_from_flags(ServeSettings, args, SETTINGS_FLAGS)
    assert dataclasses.replace(defaults, max_batch=3, request_timeout=9.0) == settings
