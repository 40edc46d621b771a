"""`GET /metrics`: the server's Prometheus metrics, on a registry of each app's own (two apps in
one process do not clash, and nothing of the process-wide default registry is exported).

Names (all prefixed `retrolm_`): `http_requests_total{route,code}`, `prompt_tokens_total`,
`generation_tokens_total`, `requests_running`, `requests_waiting`,
`time_to_first_token_seconds`, `inter_token_latency_seconds`, `retrieval_seconds`,
`database_version`, `database_chunks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)  # fmt: skip
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The metrics of one app. The engine calls `first_token`, `next_token`, `retrieval` and
    `generated` from its worker thread (prometheus_client's metrics are thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "retrolm_http_requests", "HTTP requests answered, by route and status code",
            ["route", "code"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "retrolm_prompt_tokens", "prompt tokens of the completions accepted", registry=r
        )
        self.generation_tokens = Counter(
            "retrolm_generation_tokens", "tokens generated (<eos> included)", registry=r
        )
        self.running = Gauge("retrolm_requests_running", "completions decoding", registry=r)
        self.waiting = Gauge(
            "retrolm_requests_waiting", "completions waiting for a row", registry=r
        )
        self.ttft = Histogram(
            "retrolm_time_to_first_token_seconds",
            "seconds from a completion's arrival to its first generated token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "retrolm_inter_token_latency_seconds",
            "seconds between two generated tokens of a completion",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.retrieval_seconds = Histogram(
            "retrolm_retrieval_seconds",
            "seconds of one retrieval call (the chunks completed in one step, or a prompt's)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.db_version = Gauge(
            "retrolm_database_version", "version of the database served (1, +1 per reload)",
            registry=r,
        )  # fmt: skip
        self.db_chunks = Gauge(
            "retrolm_database_chunks", "chunks in the database served", registry=r
        )

    def watch(self, engine: Any, live: Any) -> None:
        """Read the gauges of the loaded engine and database when scraped."""
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.queued)
        self.db_version.set_function(lambda: live.version)
        self.db_chunks.set_function(lambda: int(live.current.num_chunks))

    # ---- from the engine's worker thread

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def retrieval(self, seconds: float) -> None:
        self.retrieval_seconds.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts every HTTP answer by route (the path of a route the app has, else
    "other") and status code, when its response starts."""

    def __init__(self, app: Any, metrics: ServeMetrics, routes: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.routes() else "other"

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)
