"""The HTTP API: an OpenAI-compatible `/v1/completions` with retrieval attribution, `/v1/search`,
`/v1/models`, `/health` and a web page at `/`.

`create_app(run, db, settings)` loads the model and opens the database (errors surface before
the server binds), and returns a FastAPI app whose lifespan starts the model worker
(`Engine`) and the database watcher (`LiveDatabase`). Every error answer has the body
`{"error": {"message": ..., "type": ...}}`.
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

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from retrolm.serve.engine import Completion, Engine, LiveDatabase, QueueFull
from retrolm.serve.settings import ServeSettings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# request bodies


class CompletionRequest(BaseModel):
    """The OpenAI completions request (the fields retrolm uses; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr = Field(min_length=1)
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr = Field(min_length=1)
    k: StrictInt = Field(5, ge=1)


# ---------------------------------------------------------------------------------------------
# errors


def error_response(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    headers = extra.pop("headers", None)
    body = {"error": {"message": message, "type": kind, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({detail}); send a JSON object", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
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
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
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
    engine = Engine(
        model,
        live,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        neighbours=settings.neighbours,
        device=device,
    )
    max_prompt = settings.max_prompt_tokens  # longer prompts are read as the window holds them
    name = settings.model_name or Path(run).resolve().name
    created = int(time.time())
    state = {"shutting_down": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        live.start()
        log.info("serving %s (max batch %d) with database %s", name, settings.max_batch, db)
        try:
            yield
        finally:
            state["shutting_down"] = True
            live.stop()
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="retrolm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.database, app.state.settings = engine, live, settings
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise HTTPException(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("retrolm.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        current = live.current
        return {
            "status": "shutting_down" if state["shutting_down"] else "ok",
            "model": name,
            "retrieval": cfg.retrieval,
            "database": {
                "path": str(live.path),
                "version": live.version,
                "documents": len(current.documents),
                "chunks": int(current.num_chunks),
            },
            "running": engine.running,
            "queued": engine.queued,
            "max_batch": settings.max_batch,
            "completed": engine.completed,
        }

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
            raise HTTPException(400, f"k: at most {settings.max_search_k} (--max-search-k)")
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
    async def completions(body: CompletionRequest) -> Any:
        if body.max_tokens > settings.max_tokens:
            raise HTTPException(
                400, f"max_tokens: at most {settings.max_tokens} on this server (--max-tokens)"
            )
        ids = live.current.tokenizer.encode(body.prompt)
        if not ids:
            raise HTTPException(400, "prompt: it encodes to no tokens; give some text")
        if len(ids) > max_prompt:
            raise HTTPException(
                400,
                f"prompt: {len(ids)} tokens, more than the {max_prompt} this server accepts "
                "(--max-prompt-tokens); shorten it",
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
            raise HTTPException(429, str(exc), headers={"Retry-After": "1"}) from exc
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
                        status = 504 if ev["error_type"] == "timeout" else 503
                        return error_response(status, ev["message"], ev["error_type"])
                    else:
                        break
            finally:
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
                    else:
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
