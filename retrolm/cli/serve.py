"""`retrolm serve`: an HTTP API (OpenAI-compatible completions, search) and a web page."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

from retrolm.errors import InputError

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    from retrolm.serve.settings import API_KEY_ENV, ServeSettings

    d = ServeSettings()
    p = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP: completions with their sources, search, a web page",
        description="Serve RUN's model with retrieval from DB: POST /v1/completions (OpenAI "
        "completions API, streaming with `stream: true`, plus the retrieved sources), POST "
        "/v1/search, GET /v1/models, GET /health, and a web page at /. Concurrent requests are "
        "decoded in one batch. The database is reloaded when its manifest changes (after "
        "`retrolm db add`). Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("run", type=Path, help="training run folder")
    p.add_argument("--db", type=Path, required=True, help="database folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on every /v1/* request (or set {API_KEY_ENV})",
    )
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--neighbours", type=int, help="k neighbours per chunk (default: the model's)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests decoded together")
    p.add_argument(
        "--max-queue", type=int, default=d.max_queue, help="requests waiting; more get 429"
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=d.max_prompt_tokens,
        help="longest prompt in tokens (a prompt longer than the model's window loses its "
        "oldest whole chunks, as generation does past the window)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens of a request"
    )
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-search-k", type=int, default=d.max_search_k)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="seconds a request may take, waiting included",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=d.reload_interval,
        help="seconds between checks of the database manifest (0: never reload)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish before ending them",
    )
    p.add_argument("--model-name", help="model id in /v1/models (default: the run folder's name)")
    p.set_defaults(handler=run)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} must be positive, got {value}")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from retrolm.serve.app import create_app
    from retrolm.serve.settings import API_KEY_ENV, ServeSettings

    _positive(args, "port", "max_batch", "max_queue", "max_prompt_tokens", "max_tokens",
              "max_body_bytes", "max_search_k", "request_timeout", "neighbours")  # fmt: skip
    if args.reload_interval < 0 or args.shutdown_timeout < 0:
        raise InputError("--reload-interval and --shutdown-timeout must be >= 0")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("binding %s without --api-key: anyone who can reach it may use it", args.host)
    settings = ServeSettings(
        api_key=api_key,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
        max_search_k=args.max_search_k,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        reload_interval=args.reload_interval,
        neighbours=args.neighbours,
        device=args.device,
        model_name=args.model_name,
    )
    if not args.db.exists():
        raise InputError(f"database {args.db} does not exist; build one with `retrolm db build`")
    app = create_app(args.run, args.db, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.shutdown_timeout) or None,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers
    # in place that re-raise returns, so SIGTERM / Ctrl-C end with exit status 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(
            f"retrolm serve: http://{args.host}:{args.port}/ (Ctrl-C or SIGTERM to stop)",
            flush=True,
        )
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        raise InputError(
            f"could not serve on {args.host}:{args.port} (is the port in use?); choose another --port"
        ) from exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        raise InputError(f"could not serve on {args.host}:{args.port} (is the port in use?)")
    print("retrolm serve: stopped", flush=True)
    return 0
