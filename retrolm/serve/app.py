"""The HTTP API: an OpenAI-compatible `/v1/completions` with retrieval attribution, `/v1/search`,
`/v1/models`, `/health` and a web page at `/`.

`create_app(run, db, settings)` loads the model and opens the database (errors surface before
the server binds), and returns a FastAPI app whose lifespan starts the model worker
(`Engine`) and the database watcher (`LiveDatabase`). Every error answer has the body
`{"error": {"message": ..., "type": ...}}` (plus `param` and `code` where they apply).

Requests whose Host header is not one of `settings.allowed_hosts` (loopback names by default)
get 400, so that a web page elsewhere cannot reach a local server through DNS rebinding. With
an API key set, `/v1/*` and `/openapi.json` need it, and `/health` tells clients without it
only its status. `GracefulServer` is uvicorn's server ending, at shutdown, the requests still
running after `shutdown_timeout` seconds with an error event rather than cutting them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from retrolm.errors import InputError
from retrolm.serve.engine import Completion, Engine, LiveDatabase, QueueFull
from retrolm.serve.settings import ServeSettings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# request bodies


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed integer, which torch's generators take
MAX_STOP_CHARS = 1000  # each stop string is searched for at every token


class CompletionRequest(BaseModel):
    """The OpenAI completions request. Fields retrolm does not implement (`n`, `best_of`,
    `logprobs`, `echo`, `suffix`, penalties, `logit_bias`) are accepted at their defaults
    only (`unsupported`); other unknown fields are ignored. A null field takes its default."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr = Field(min_length=1)
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    n: StrictInt = 1
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    presence_penalty: StrictFloat = Field(0.0, allow_inf_nan=False)
    frequency_penalty: StrictFloat = Field(0.0, allow_inf_nan=False)
    logit_bias: dict[str, Any] | None = None

    @field_validator(
        "max_tokens", "temperature", "top_p", "stream", "n", "echo", "presence_penalty",
        "frequency_penalty", mode="before",
    )  # fmt: skip
    @classmethod
    def _null_is_default(cls, v: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            raise ValueError(
                "one string per request; lists of prompts or of token ids are not supported "
                "by this server"
            )
        return v

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and not SEED_MIN <= v <= SEED_MAX:
            raise ValueError("a seed is an integer from -2**63 to 2**63 - 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        for s in stops:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "a stop string holds a lone surrogate (an unpaired \\ud800-\\udfff "
                    "escape), which is not text; send valid UTF-8"
                ) from None
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to a value this server does not implement."""
        if self.n != 1:
            return "n", (
                f"n = {self.n} is not supported by this server (one completion per request); "
                "leave n out and send several requests (with different seeds)"
            )
        if self.best_of is not None and self.best_of != 1:
            return (
                "best_of",
                f"best_of = {self.best_of} is not supported by this server; leave it out",
            )
        if self.logprobs is not None:
            return "logprobs", (
                f"logprobs = {self.logprobs} is not supported by this server (it returns no "
                "log probabilities); leave it out or send null"
            )
        if self.echo:
            return "echo", (
                "echo = true is not supported by this server; leave it out and put the prompt "
                "before the text yourself"
            )
        if self.suffix:
            return "suffix", "suffix is not supported by this server (no insertion); leave it out"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                return name, (
                    f"{name} = {getattr(self, name):g} is not supported by this server; leave it "
                    "out or send 0"
                )
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server; leave it out"
        return None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr = Field(min_length=1)
    k: StrictInt = Field(5, ge=1)

    @field_validator("k", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any) -> Any:
        return 5 if v is None else v


# ---------------------------------------------------------------------------------------------
# errors


def error_response(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    body = {"error": {"message": message, "type": kind, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
    """An error answer with a `param` or a `code` (HTTPException carries neither)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


def _is_json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _validation_message(exc: RequestValidationError, request: Request) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({detail}); send a JSON object", None
    if e.get("loc") == ("body",) and e.get("type") == "missing":
        return 'the body is empty; send a JSON object, e.g. {"prompt": "..."}', None
    if e.get("loc") == ("body",) and not _is_json(request):
        return "the body is not JSON; send a JSON object with Content-Type: application/json", None
    if e.get("loc") == ("body",):
        return 'the body must be a JSON object, e.g. {"prompt": "..."}', None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if loc and loc[0] in CompletionRequest.model_fields | SearchRequest.model_fields:
        loc = loc[:1]  # not the member of a union that the value failed
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    if e.get("type") == "missing":
        return f"{param} is required", param
    if not loc:
        return f"the body must be a JSON object ({msg})", None
    got = e.get("input")
    shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, type(None))) else ""
    return f"{param}: {msg}" + (f" (got {shown})" if shown else ""), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request)
        return error_response(400, message, "invalid_request_error", param=param)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        extra = {"param": exc.param} | ({"code": exc.code} if exc.code else {})
        kind = _KINDS.get(exc.status, "server_error")
        return error_response(exc.status, exc.message, kind, **extra)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if detail == "There was an error parsing the body":  # FastAPI's, for any failure
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {str(cause)[:100]}" if cause else "unreadable"
            detail = f"the body could not be read as JSON ({why}); send a JSON object in UTF-8"
        kind = _KINDS.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, detail, kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error (see the server log)", "server_error")


class BodyLimit:
    """ASGI middleware: bodies over `max_bytes` get 413 (by Content-Length, or while read)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = (
            f"the request body is larger than {self.max_bytes} bytes (--max-body-bytes); "
            "send a shorter prompt"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, too_large, "invalid_request_error")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, too_large)
            return message

        return await self.app(scope, limited, send)


class HostCheck:
    """ASGI middleware: a Host header that `settings.host_allowed` refuses gets 400."""

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.settings.host_allowed(host):
            return await self.app(scope, receive, send)
        names = ", ".join(
            dict.fromkeys(("localhost", "127.0.0.1", "[::1]", *self.settings.allowed_hosts))
        )
        shown = json.dumps(host[:100])
        message = (
            f"the Host header {shown} is not served here; reach the server as {names} "
            "(or start it with --allowed-hosts NAME to serve that name)"
            if host
            else "the request has no Host header; send one"
        )
        response = error_response(400, message, "invalid_request_error", code="host_not_allowed")
        return await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# the app


def _chunk_json(chunk: Any) -> dict[str, Any]:
    return dataclasses.asdict(chunk)


def create_app(
    run: str | Path,
    db: str | Path,
    settings: ServeSettings | None = None,
    *,
    model: Any = None,
) -> FastAPI:
    """The FastAPI app serving the run's model with retrieval from `db`.

    Raises:
        InputError, MismatchError, CorruptArtifactError: a bad run, database or device.
    """
    from retrolm.runs import (
        check_database,
        load_run_model,
        open_database,
        read_run_meta,
        resolve_device,
    )

    settings = settings or ServeSettings()
    if model is None:
        model, meta = load_run_model(run)
    else:
        meta = read_run_meta(run)
    database = open_database(db)
    check_database(meta["database"], database, str(run))
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    cfg = model.cfg
    live = LiveDatabase(
        db,
        database,
        settings.reload_interval,
        check=lambda new: check_database(meta["database"], new, str(run)),
    )
    try:
        engine = Engine(
            model,
            live,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            neighbours=settings.neighbours,
            device=device,
        )
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        k = settings.neighbours or cfg.num_neighbours
        raise InputError(
            f"could not allocate the decoding cache of {settings.max_batch} rows with {k} "
            f"neighbours per chunk on {device} ({str(exc).splitlines()[0][:160]}); lower "
            "--max-batch (or --neighbours)"
        ) from None
    max_prompt = settings.max_prompt_tokens  # longer prompts are read as the window holds them
    name = settings.model_name or Path(run).resolve().name
    created = int(time.time())
    state = {"shutting_down": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["shutting_down"] = False
        engine.start()
        live.start()
        log.info("serving %s (max batch %d) with database %s", name, settings.max_batch, db)
        try:
            yield
        finally:
            state["shutting_down"] = True
            live.stop()
            await run_in_threadpool(engine.stop)

    def drain(timeout: float) -> None:
        """From the event loop, at shutdown: refuse new completions, and end those still
        running after `timeout` seconds with an error event."""
        state["shutting_down"] = True
        message = (
            f"the server shut down before this request finished (it was given "
            f"{timeout:g} s, --shutdown-timeout); retry it"
        )
        asyncio.get_running_loop().call_later(timeout, engine.abort, message)

    app = FastAPI(
        title="retrolm",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine, app.state.database, app.state.settings = engine, live, settings
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostCheck, settings=settings)  # outermost: before anything else

    def has_key(request: Request) -> bool:
        if settings.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        )

    async def authorize(request: Request) -> None:
        if not has_key(request):
            raise HTTPException(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("retrolm.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/health", response_model=None)
    async def health(request: Request) -> Any:
        status = "shutting_down" if state["shutting_down"] else "ok"
        if not state["shutting_down"] and not engine.alive:
            status = "error"  # the decoding worker is gone: nothing would be answered
        if not has_key(request):  # the rest describes the deployment: for key holders only
            return JSONResponse({"status": status}, status_code=503 if status == "error" else 200)
        current = live.current
        body = {
            "status": status,
            "model": name,
            "retrieval": cfg.retrieval,
            "database": {
                "path": str(live.path),
                "version": live.version,
                "documents": len(current.documents),
                "chunks": int(current.num_chunks),
                "refused": live.refused,
            },
            "running": engine.running,
            "queued": engine.queued,
            "max_batch": settings.max_batch,
            "completed": engine.completed,
            "failed": engine.failed,
            "cancelled": engine.cancelled,
        }
        return JSONResponse(body, status_code=503 if status == "error" else 200)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "retrolm",
                    "max_seq_len": cfg.max_seq_len,
                    "chunk_size": cfg.chunk_size,
                    "retrieval": cfg.retrieval,
                    "limits": {"max_prompt_tokens": max_prompt, "max_tokens": settings.max_tokens},
                }
            ],
        }

    @app.post("/v1/search", dependencies=[Depends(authorize)])
    async def search(body: SearchRequest) -> dict[str, Any]:
        if body.k > settings.max_search_k:
            raise ApiError(400, f"k: at most {settings.max_search_k} (--max-search-k)", param="k")
        current = live.current

        def run_search() -> list[Any]:
            with live.lock:
                return current.search(body.query, k=body.k)[0]

        hits = await run_in_threadpool(run_search)
        return {
            "object": "list",
            "data": [
                {
                    "chunk_id": h.chunk_id,
                    "document": h.document_name,
                    "distance": h.distance,
                    "text": h.text,
                }
                for h in hits
            ],  # fmt: skip
            "database_version": live.version,
        }

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if state["shutting_down"]:
            raise HTTPException(503, "the server is shutting down; retry on another one")
        if body.model is not None and body.model != name:
            raise ApiError(
                404,
                f"The model `{body.model[:100]}` does not exist; this server serves `{name}` "
                "(GET /v1/models), or leave model out",
                param="model",
                code="model_not_found",
            )
        refused = body.unsupported()
        if refused is not None:
            raise ApiError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if body.max_tokens > settings.max_tokens:
            raise ApiError(
                400,
                f"max_tokens: at most {settings.max_tokens} on this server (--max-tokens)",
                param="max_tokens",
            )
        ids = live.current.tokenizer.encode(body.prompt)
        if not ids:
            raise ApiError(400, "prompt: it encodes to no tokens; give some text", param="prompt")
        if len(ids) > max_prompt:
            raise ApiError(
                400,
                f"prompt: {len(ids)} tokens, more than the {max_prompt} this server accepts "
                "(--max-prompt-tokens); shorten it",
                param="prompt",
            )
        loop = asyncio.get_running_loop()
        c = Completion(
            prompt_ids=ids,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop or [],  # type: ignore[arg-type]
            loop=loop,
            events=asyncio.Queue(),
        )
        deadline = loop.time() + settings.request_timeout
        try:
            engine.submit(c)
        except QueueFull as exc:
            status = 503 if state["shutting_down"] or "shutting down" in str(exc) else 429
            raise HTTPException(status, str(exc), headers={"Retry-After": "1"}) from exc
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name}

        async def next_event() -> dict[str, Any]:
            remaining = deadline - loop.time()
            try:
                return await asyncio.wait_for(c.events.get(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                c.cancel()
                return {
                    "type": "error",
                    "message": f"the request took longer than {settings.request_timeout:g} s "
                    "(--request-timeout)",
                    "error_type": "timeout",
                }

        if not body.stream:
            watcher = asyncio.create_task(_watch_disconnect(request, c))
            try:
                pieces: list[str] = []
                retrieved: list[dict[str, Any]] = []
                while True:
                    ev = await next_event()
                    if ev["type"] == "text":
                        pieces.append(ev["text"])
                    elif ev["type"] == "chunk":
                        retrieved.append(_chunk_json(ev["chunk"]))
                    elif ev["type"] == "error":
                        status = _ERROR_STATUS.get(ev["error_type"], 500)
                        return error_response(status, ev["message"], ev["error_type"])
                    else:
                        break
            finally:
                watcher.cancel()
                c.cancel()  # no-op once done; frees the row if the client went away
            return {
                **base,
                "choices": [
                    {
                        "text": "".join(pieces),
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": ev["finish_reason"],
                    }
                ],  # fmt: skip
                "usage": {
                    "prompt_tokens": ev["prompt_tokens"],
                    "completion_tokens": ev["completion_tokens"],
                    "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"],
                },
                "retrieved": retrieved,
            }

        def sse(obj: Any) -> str:
            return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        async def stream() -> AsyncIterator[str]:
            try:
                while True:
                    ev = await next_event()
                    if ev["type"] == "text":
                        yield sse({**base, "choices": [choice(ev["text"], None)]})
                    elif ev["type"] == "chunk":
                        chunk = _chunk_json(ev["chunk"])
                        yield sse({**base, "choices": [choice("", None)], "retrieved": [chunk]})
                    elif ev["type"] == "error":
                        yield sse({"error": {"message": ev["message"], "type": ev["error_type"]}})
                        break
                    elif ev["type"] == "done":
                        usage = {
                            "prompt_tokens": ev["prompt_tokens"],
                            "completion_tokens": ev["completion_tokens"],
                            "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"],
                        }
                        final = choice("", ev["finish_reason"])
                        yield sse({**base, "choices": [final], "usage": usage})
                        break
                yield sse("[DONE]")
            finally:
                c.cancel()  # the client went away (or we are done): free the row

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return app


_ERROR_STATUS = {"timeout": 504, "shutdown": 503, "server_error": 500, "cancelled": 499}


async def _watch_disconnect(request: Request, c: Completion) -> None:
    """Cancel `c` when the client of a non-streamed completion goes away (its body has been
    read: the next ASGI message is the disconnect), and wake its handler."""
    while True:
        try:
            message = await request.receive()
        except Exception:  # the server's receive failed: nothing more to learn from it
            return
        if message["type"] == "http.disconnect":
            c.cancel()
            if c.events is not None:
                gone = {
                    "type": "error",
                    "message": "the client went away",
                    "error_type": "cancelled",
                }
                c.events.put_nowait(gone)
            return


# seconds uvicorn waits, past `shutdown_timeout`, for the error events to reach the clients
CUT_GRACE = 3.0


class GracefulServer(uvicorn.Server):
    """uvicorn's server for `app`: at shutdown (SIGTERM, Ctrl-C) it stops accepting, lets the
    requests in flight run `shutdown_timeout` seconds, then ends those still running with an
    error event (a stream gets `data: {"error": ...}` and `data: [DONE]`); only after
    CUT_GRACE more seconds does uvicorn cut the connections left."""

    def __init__(self, app: FastAPI, config: uvicorn.Config, shutdown_timeout: float) -> None:
        config.timeout_graceful_shutdown = shutdown_timeout + CUT_GRACE  # type: ignore[assignment]
        super().__init__(config)
        self.retrolm_app, self.shutdown_timeout = app, shutdown_timeout

    async def shutdown(self, sockets: Any = None) -> None:
        self.retrolm_app.state.drain(self.shutdown_timeout)
        await super().shutdown(sockets)
