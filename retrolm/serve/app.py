"""The HTTP API: an OpenAI-compatible `/v1/completions` with retrieval attribution (prompts as
text or token ids, `n`, `logprobs`, `echo` scoring), `/v1/search`, `/v1/tokenize`,
`/v1/detokenize`, `/v1/models`, `/health`, Prometheus `/metrics` and a web page at `/`.

`create_app(run, db, settings)` loads the model and opens the database (errors surface before
the server binds; with `background=True` they load in a thread once the app runs, and
`/health` says "loading" meanwhile), and returns a FastAPI app whose lifespan starts the model
worker (`Engine`) and the database watcher (`LiveDatabase`). Every error answer has the body
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
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
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

from retrolm.errors import InputError, UserError
from retrolm.serve.engine import Completion, Engine, LiveDatabase, QueueFull
from retrolm.serve.metrics import CONTENT_TYPE, RequestCounter, ServeMetrics
from retrolm.serve.scoring import MAX_LOGPROBS
from retrolm.serve.settings import ServeSettings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# request bodies


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed integer, which torch's generators take
MAX_STOP_CHARS = 1000  # each stop string is searched for at every token


PROMPT_KINDS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_text(s: str, what: str = "a prompt") -> None:
    if not s:
        raise ValueError(f"{what} is an empty string; give some text")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
            "text; send valid UTF-8"
        ) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False

    @field_validator("include_usage", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any) -> Any:
        return False if v is None else v


class CompletionRequest(BaseModel):
    """The OpenAI completions request. Fields retrolm does not implement (`suffix`, penalties,
    `logit_bias`) are accepted at their defaults only (`unsupported`); other unknown fields are
    ignored. A null field takes its default."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: Any = Field(...)  # PROMPT_KINDS, checked by `_prompt`
    max_tokens: StrictInt = Field(16, ge=0)
    temperature: StrictFloat = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1)
    best_of: StrictInt | None = Field(None, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0)
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
        if isinstance(v, str):
            _check_text(v)
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(f"give {PROMPT_KINDS}" + (" (got an empty list)" if v == [] else ""))
        if all(isinstance(x, str) for x in v):
            for x in v:
                _check_text(x, "a prompt of the list")
        elif all(isinstance(x, list) for x in v):
            if not all(x and all(_is_id(i) for i in x) for x in v):
                raise ValueError("each token-id list is a non-empty list of integers")
        elif not all(_is_id(x) for x in v):
            raise ValueError(f"give {PROMPT_KINDS}, not a mix of them")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_LOGPROBS:
            raise ValueError(f"at most {MAX_LOGPROBS} (the OpenAI completions limit)")
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

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or a list of token ids."""
        v = self.prompt
        if isinstance(v, str) or _is_id(v[0]):
            return [v]
        return list(v)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to a value this server does not implement."""
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", (
                f"best_of = {self.best_of} is not supported by this server unless it equals n "
                f"({self.n}): every sample is returned; leave it out"
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


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` (`add_special_tokens` and other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr

    @field_validator("prompt")
    @classmethod
    def _utf8(cls, v: str) -> str:
        if v:
            _check_text(v, "the prompt")
        return v


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[StrictInt]


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
    fields = CompletionRequest.model_fields | SearchRequest.model_fields
    if loc and loc[0] in fields | DetokenizeRequest.model_fields:
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


@dataclasses.dataclass
class Loaded:
    """What `create_app` loads: the model's worker and the live database."""

    engine: Engine
    live: LiveDatabase
    cfg: Any

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer


def load_served(
    run: str | Path,
    db: str | Path,
    settings: ServeSettings,
    model: Any = None,
    metrics: ServeMetrics | None = None,
) -> Loaded:
    """Load the run's model (unless given), open the database and build the engine.

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
            metrics=metrics,
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
    return Loaded(engine, live, cfg)


class Served:
    """What an app serves from (`app.state.served`): its settings and metrics, and the model and
    database once loaded (by `create_app`, or by `load_in_background` once the app runs)."""

    def __init__(
        self,
        app: FastAPI,
        run: str | Path,
        db: str | Path,
        settings: ServeSettings,
        model: Any,
        metrics: ServeMetrics,
    ) -> None:
        self.app, self.run, self.db, self.model = app, run, db, model
        self.settings, self.metrics = settings, metrics
        self.name = settings.model_name or Path(run).resolve().name
        self.created = int(time.time())
        self.max_prompt = settings.max_prompt_tokens  # longer prompts: read as the window holds
        self.shutting_down = False
        self.loaded: Loaded | None = None
        self.error: str | None = None  # why loading failed
        self.up = False  # between the lifespan's start and its end
        self.loading = False
        self.guard = threading.Lock()  # the loader thread and the lifespan start / stop the engine

    def install(self, loaded: Loaded) -> None:
        self.metrics.watch(loaded.engine, loaded.live)
        self.app.state.engine, self.app.state.database = loaded.engine, loaded.live
        self.loaded = loaded

    def start(self, loaded: Loaded) -> None:
        loaded.engine.start()
        loaded.live.start()
        log.info(
            "serving %s (max batch %d) with database %s",
            self.name,
            self.settings.max_batch,
            self.db,
        )

    def load_in_background(self) -> None:
        try:
            loaded = load_served(self.run, self.db, self.settings, self.model, self.metrics)
        except Exception as exc:
            self.error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if isinstance(exc, UserError):  # a bad run, database or setting: its message says
                log.error("could not load the model and database: %s", self.error)
            else:
                log.exception("could not load the model and database")
            failed = getattr(self.app.state, "on_load_error", None)
            if failed is not None:
                failed(exc)
            return
        with self.guard:
            self.install(loaded)
            if self.up:
                self.start(loaded)

    def drain(self, timeout: float) -> None:
        """From the event loop, at shutdown: refuse new completions, and end those still
        running after `timeout` seconds with an error event."""
        self.shutting_down = True
        message = (
            f"the server shut down before this request finished (it was given "
            f"{timeout:g} s, --shutdown-timeout); retry it"
        )
        if self.loaded is not None:
            asyncio.get_running_loop().call_later(timeout, self.loaded.engine.abort, message)

    def has_key(self, request: Request) -> bool:
        if self.settings.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode(), self.settings.api_key.encode()
        )

    def ready(self) -> Loaded:
        """The loaded model and database; 503 while they load (or if they could not be)."""
        if self.loaded is not None:
            return self.loaded
        if self.error is not None:
            raise ApiError(
                503,
                f"the model and database could not be loaded ({self.error}); see the server log",
                code="load_failed",
            )
        raise HTTPException(
            503, "the model and database are loading; retry shortly", headers={"Retry-After": "1"}
        )

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.ready().tokenizer.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ApiError(
                400,
                f"{param}: token id {bad} is not in the vocabulary (0 to {vocab - 1})",
                param=param,
            )

    def prompt_ids(self, body: CompletionRequest, loaded: Loaded) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt of the request; 400 for one that cannot be served."""
        out = []
        for p in body.prompts():
            if isinstance(p, str):
                ids, text = loaded.tokenizer.encode(p), p
            else:
                self.check_ids(p, "prompt")
                ids, text = list(p), loaded.tokenizer.decode(p)
            if not ids:
                raise ApiError(
                    400, "prompt: it encodes to no tokens; give some text", param="prompt"
                )
            if len(ids) > self.max_prompt:
                raise ApiError(
                    400,
                    f"prompt: {len(ids)} tokens, more than the {self.max_prompt} this server "
                    "accepts (--max-prompt-tokens); shorten it",
                    param="prompt",
                )
            out.append((ids, text))
        return out

    def check_completion(self, body: CompletionRequest) -> None:
        """400 (or 404) for what the fields allow but this server does not serve."""
        settings = self.settings
        if body.model is not None and body.model != self.name:
            raise ApiError(
                404,
                f"The model `{body.model[:100]}` does not exist; this server serves "
                f"`{self.name}` (GET /v1/models), or leave model out",
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
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(
                400,
                "max_tokens: 0 only scores the prompt, with echo: true; give 1 or more",
                param="max_tokens",
            )
        if body.n > settings.max_n:
            raise ApiError(400, f"n: at most {settings.max_n} on this server (--max-n)", param="n")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only with stream: true", param="stream_options")


def create_app(
    run: str | Path,
    db: str | Path,
    settings: ServeSettings | None = None,
    *,
    model: Any = None,
    background: bool = False,
) -> FastAPI:
    """The FastAPI app serving the run's model with retrieval from `db`: the module's routes
    (`router`) over a `Served` in `app.state.served`.

    Loads the model and the database now (errors raise here), or with `background` in a thread
    that the app's lifespan starts: `/health` answers 503 `{"status": "loading"}` until they
    are loaded, and the other routes 503 too; a failed load is logged, `/health` says "error",
    and `app.state.on_load_error(exc)` is called if set (the CLI stops the server with it).

    Raises:
        InputError, MismatchError, CorruptArtifactError: a bad run, database or device.
    """
    from retrolm.runs import read_run_meta

    settings = settings or ServeSettings()
    if background:  # what is quick to check is checked now: a missing run, a missing database
        read_run_meta(run)
        if not Path(db).is_dir():
            raise InputError(f"database {db} does not exist; build one with `retrolm db build`")
    metrics = ServeMetrics()
    app = FastAPI(
        title="retrolm",
        version="1",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    served = Served(app, run, db, settings, model, metrics)
    app.state.served, app.state.settings, app.state.metrics = served, settings, metrics
    app.state.drain = served.drain
    if not background:
        served.install(load_served(run, db, settings, model, metrics))
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostCheck, settings=settings)  # before anything else but the count
    paths = {getattr(r, "path", "") for r in router.routes}  # the label of a counted request
    app.add_middleware(RequestCounter, metrics=metrics, routes=lambda: paths)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the worker and the database watcher (or the loading thread); stop them at the end."""
    served: Served = app.state.served
    served.shutting_down = False
    with served.guard:
        served.up = True
        if served.loaded is not None:
            served.start(served.loaded)
        elif served.error is None and not served.loading:
            served.loading = True
            threading.Thread(
                target=served.load_in_background, name="retrolm-load", daemon=True
            ).start()
    try:
        yield
    finally:
        served.shutting_down = True
        with served.guard:
            served.up = False
            loaded = served.loaded
        if loaded is not None:
            loaded.live.stop()
            await run_in_threadpool(loaded.engine.stop)


# ---------------------------------------------------------------------------------------------
# routes

router = APIRouter()


def _served(request: Request) -> Served:
    return request.app.state.served


async def authorize(request: Request) -> None:
    if not _served(request).has_key(request):
        raise HTTPException(
            401,
            "missing or wrong API key: send the header `Authorization: Bearer KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = resources.files("retrolm.serve").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(html, headers={"X-Content-Type-Options": "nosniff"})


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
async def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(authorize)])
async def prometheus(request: Request) -> Response:
    return Response(_served(request).metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/health", response_model=None)
async def health(request: Request) -> Any:
    served = _served(request)
    loaded = served.loaded
    if loaded is None:
        status = "error" if served.error is not None else "loading"
        body: dict[str, Any] = {"status": status}
        if status == "error" and served.has_key(request):
            body["error"] = served.error
        return JSONResponse(body, status_code=503)
    engine, live = loaded.engine, loaded.live
    status = "shutting_down" if served.shutting_down else "ok"
    if not served.shutting_down and not engine.alive:
        status = "error"  # the decoding worker is gone: nothing would be answered
    if not served.has_key(request):  # the rest describes the deployment: for key holders only
        return JSONResponse({"status": status}, status_code=503 if status == "error" else 200)
    current = live.current
    body = {
        "status": status,
        "model": served.name,
        "retrieval": loaded.cfg.retrieval,
        "database": {
            "path": str(live.path),
            "version": live.version,
            "documents": len(current.documents),
            "chunks": int(current.num_chunks),
            "refused": live.refused,
        },
        "running": engine.running,
        "queued": engine.queued,
        "max_batch": served.settings.max_batch,
        "completed": engine.completed,
        "failed": engine.failed,
        "cancelled": engine.cancelled,
    }
    return JSONResponse(body, status_code=503 if status == "error" else 200)


@router.get("/v1/models", dependencies=[Depends(authorize)])
async def models(request: Request) -> dict[str, Any]:
    served = _served(request)
    cfg, settings = served.ready().cfg, served.settings
    return {
        "object": "list",
        "data": [
            {
                "id": served.name,
                "object": "model",
                "created": served.created,
                "owned_by": "retrolm",
                "max_seq_len": cfg.max_seq_len,
                "max_model_len": cfg.max_seq_len,
                "chunk_size": cfg.chunk_size,
                "retrieval": cfg.retrieval,
                "limits": {
                    "max_prompt_tokens": served.max_prompt,
                    "max_tokens": settings.max_tokens,
                    "max_n": settings.max_n,
                    "max_logprobs": MAX_LOGPROBS,
                },
            }
        ],
    }


@router.post("/v1/search", dependencies=[Depends(authorize)])
async def search(body: SearchRequest, request: Request) -> dict[str, Any]:
    served = _served(request)
    live = served.ready().live
    if body.k > served.settings.max_search_k:
        raise ApiError(
            400, f"k: at most {served.settings.max_search_k} (--max-search-k)", param="k"
        )
    current = live.current

    def run_search() -> list[Any]:
        with live.lock:
            return current.search(body.query, k=body.k)[0]

    hits = await run_in_threadpool(run_search)
    return {
        "object": "list",
        "data": [
            {"chunk_id": h.chunk_id, "document": h.document_name, "score": h.score, "text": h.text}
            for h in hits
        ],
        "metric": current.metric,  # l2: lower scores are nearer; ip and bm25: higher
        "database_version": live.version,
    }


@router.post("/v1/tokenize", dependencies=[Depends(authorize)])
@router.post("/tokenize", dependencies=[Depends(authorize)], include_in_schema=False)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    loaded = _served(request).ready()
    ids = loaded.tokenizer.encode(body.prompt) if body.prompt else []
    return {"tokens": ids, "count": len(ids), "max_model_len": loaded.cfg.max_seq_len}


@router.post("/v1/detokenize", dependencies=[Depends(authorize)])
@router.post("/detokenize", dependencies=[Depends(authorize)], include_in_schema=False)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    served = _served(request)
    served.check_ids(body.tokens, "tokens")
    return {"prompt": served.ready().tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info", dependencies=[Depends(authorize)], include_in_schema=False)
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """What lm-evaluation-harness's remote tokenizer reads (`tokenizer_backend=remote`)."""
    loaded = _served(request).ready()
    tok = loaded.tokenizer

    def text(i: int | None) -> str | None:
        return None if i is None else tok.hf.id_to_token(i)

    return {
        "eos_token": text(tok.eos_id),
        "eos_token_id": tok.eos_id,
        "bos_token": text(tok.bos_id),
        "bos_token_id": tok.bos_id,
        "pad_token": text(tok.pad_id),
        "pad_token_id": tok.pad_id,
        "vocab_size": tok.vocab_size,
        "model_max_length": loaded.cfg.max_seq_len,
    }


@router.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    served = _served(request)
    settings = served.settings
    if served.shutting_down:
        raise HTTPException(503, "the server is shutting down; retry on another one")
    loaded = served.ready()
    engine = loaded.engine
    served.check_completion(body)
    prompts = served.prompt_ids(body, loaded)
    if len(prompts) * body.n > settings.max_queue:
        raise ApiError(
            400,
            f"prompt: {len(prompts)} prompts x n = {len(prompts) * body.n} completions, more "
            f"than this server queues (--max-queue {settings.max_queue}); send fewer",
            param="prompt",
        )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cs = [
        Completion(
            prompt_ids=ids,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=_nth_seed(body.seed, i),
            stop=body.stop or [],  # type: ignore[arg-type]
            loop=loop,
            events=events,
            logprobs=body.logprobs,
            echo=body.echo,
            index=p * body.n + i,
        )
        for p, (ids, _) in enumerate(prompts)
        for i in range(body.n)
    ]
    deadline = loop.time() + settings.request_timeout
    try:
        engine.submit(*cs)
    except QueueFull as exc:
        status = 503 if served.shutting_down or "shutting down" in str(exc) else 429
        raise HTTPException(status, str(exc), headers={"Retry-After": "1"}) from exc
    served.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts))
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    base = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
    }
    choices = [
        Choice(c.index, prompts[c.index // body.n][1] if body.echo else "", body.logprobs)
        for c in cs
    ]

    def cancel_all() -> None:
        for c in cs:
            c.cancel()  # no-op once done; frees the rows if the client went away

    async def next_event() -> dict[str, Any]:
        remaining = deadline - loop.time()
        try:
            return await asyncio.wait_for(events.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            cancel_all()
            return {
                "type": "error",
                "message": f"the request took longer than {settings.request_timeout:g} s "
                "(--request-timeout)",
                "error_type": "timeout",
            }

    if not body.stream:
        watcher = asyncio.create_task(_watch_disconnect(request, cs, events))
        try:
            while not all(ch.done for ch in choices):
                ev = await next_event()
                if ev["type"] == "error":
                    status = _ERROR_STATUS.get(ev["error_type"], 500)
                    return error_response(status, ev["message"], ev["error_type"])
                choices[ev["index"]].take(ev)
        finally:
            watcher.cancel()
            cancel_all()
        return {
            **base,
            "choices": [ch.json() for ch in choices],
            "usage": _usage(prompts, choices),
            "retrieved": choices[0].retrieved,  # the first choice's (each has its own)
        }

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def sse(obj: Any) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    def chunk(ch: dict[str, Any], **more: Any) -> str:
        return sse({**base, "choices": [ch], **extra, **more})

    async def stream() -> AsyncIterator[str]:
        try:
            if body.echo and body.logprobs is None:  # the prompts first, as they are
                for ch in choices:
                    yield chunk(ch.piece(ch.echo, []))
            while not all(ch.done for ch in choices):
                ev = await next_event()
                if ev["type"] == "error":
                    yield sse({"error": {"message": ev["message"], "type": ev["error_type"]}})
                    break
                ch = choices[ev["index"]]
                piece = ch.take(ev)
                if ev["type"] == "chunk":
                    yield chunk(ch.piece("", []), retrieved=[ch.retrieved[-1]])
                elif piece is not None:
                    yield chunk(piece)
                elif ev["type"] == "done":
                    last = all(c.done for c in choices)
                    usage = {"usage": _usage(prompts, choices)} if last else {}
                    final = ch.piece("", [], ev["finish_reason"])
                    yield chunk(final, **({} if include_usage else usage))
                    if last and include_usage:
                        yield sse({**base, "choices": [], "usage": usage["usage"]})
            yield sse("[DONE]")
        finally:
            cancel_all()  # the client went away (or we are done): free the rows

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _nth_seed(seed: int | None, i: int) -> int | None:
    """The seed of sample i of a request (seed, seed + 1, ... within the int64 range)."""
    if seed is None or i == 0:
        return seed
    return (seed + i - SEED_MIN) % 2**64 + SEED_MIN


def _usage(prompts: list[tuple[list[int], str]], choices: list[Choice]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once, the tokens of every choice."""
    prompt = sum(len(ids) for ids, _ in prompts)
    completion = sum(ch.completion_tokens for ch in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class Choice:
    """One choice of a completion as its events arrive: text, log-probabilities, sources."""

    def __init__(self, index: int, echo: str, logprobs: int | None) -> None:
        self.index, self.echo, self.logprobs = index, echo, logprobs
        self.pieces: list[str] = [echo]
        self.tokens: list[dict[str, Any]] = []
        self.retrieved: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.done = False

    def take(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        """Record an event; the stream's choice object for the text it adds (None: none)."""
        if ev["type"] == "chunk":
            self.retrieved.append(_chunk_json(ev["chunk"]))
        elif ev["type"] == "done":
            self.finish_reason, self.done = ev["finish_reason"], True
            self.completion_tokens = ev["completion_tokens"]
        elif ev["type"] == "prompt_logprobs":  # the prompt's: echoed at offset 0
            tokens = ev["tokens"]
            self.tokens += tokens
            return self.piece(self.echo, tokens)
        elif ev["type"] == "text":
            start = len(self.echo)  # generated offsets are from the completion's start
            tokens = [{**t, "offset": t["offset"] + start} for t in ev.get("tokens", [])]
            self.tokens += tokens
            self.pieces.append(ev["text"])
            return self.piece(ev["text"], tokens)
        return None

    def piece(
        self, text: str, tokens: list[dict[str, Any]], finish: str | None = None
    ) -> dict[str, Any]:
        lp = None if self.logprobs is None else _logprobs_json(tokens)
        return {"text": text, "index": self.index, "logprobs": lp, "finish_reason": finish}

    def json(self) -> dict[str, Any]:
        lp = None if self.logprobs is None else _logprobs_json(self.tokens)
        return {
            "text": "".join(self.pieces),
            "index": self.index,
            "logprobs": lp,
            "finish_reason": self.finish_reason,
            "retrieved": self.retrieved,
        }


def _logprobs_json(tokens: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """OpenAI's (and vLLM's) completions `logprobs` object."""
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [t["top"] for t in tokens],
        "text_offset": [t["offset"] for t in tokens],
    }


_ERROR_STATUS = {"timeout": 504, "shutdown": 503, "server_error": 500, "cancelled": 499}


async def _watch_disconnect(request: Request, cs: list[Completion], events: asyncio.Queue) -> None:
    """Cancel `cs` when the client of a non-streamed completion goes away (its body has been
    read: the next ASGI message is the disconnect), and wake its handler."""
    while True:
        try:
            message = await request.receive()
        except Exception:  # the server's receive failed: nothing more to learn from it
            return
        if message["type"] == "http.disconnect":
            for c in cs:
                c.cancel()
            gone = {"type": "error", "message": "the client went away", "error_type": "cancelled"}
            events.put_nowait({**gone, "index": 0})
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
