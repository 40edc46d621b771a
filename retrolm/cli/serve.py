"""`retrolm serve`: an HTTP API (OpenAI-compatible completions, search) and a web page."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

from retrolm.cli.flags import add_config_flags, config_from_flags
from retrolm.errors import InputError, UserError

log = logging.getLogger(__name__)

# ServeSettings fields that are flags as they are (--api-key and --allowed-hosts are read apart)
SETTINGS_FLAGS = (
    "device", "neighbours", "max_batch", "max_queue", "max_prompt_tokens", "max_tokens",
    "max_n", "max_body_bytes", "max_search_k", "request_timeout", "reload_interval",
    "model_name",
)  # fmt: skip


def register(subparsers: Any) -> None:
    from retrolm.serve.settings import API_KEY_ENV, ServeSettings

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
    p.add_argument("--port", type=int, default=8000, help="port to bind, 1 to 65535 (default 8000)")
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="comma-separated Host header names the server answers besides localhost, "
        "127.0.0.1 and [::1] (any port), e.g. `myhost.lan,10.0.0.5`; `*.example.com` takes "
        "its subdomains, `*` any name. Other names get 400, so that no web page can reach the "
        "server through DNS rebinding. A specific --host address is served by default; "
        "--host 0.0.0.0 or :: needs this flag (the names clients will use, or `*`)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on every /v1/* request and /openapi.json "
        f"(or set {API_KEY_ENV}); /health then tells clients without it only its status",
    )
    add_config_flags(p, ServeSettings, SETTINGS_FLAGS, device={"choices": ("auto", "cpu", "cuda")})
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds requests in flight may still run; those still "
        "running then end with an error (a stream gets an error event), and the server exits",
    )
    p.set_defaults(handler=run)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, else from the environment; an empty or unusable one is an error
    (an unset shell variable must not turn authentication off)."""
    from retrolm.serve.settings import API_KEY_ENV, api_key_problem

    if args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif API_KEY_ENV in os.environ:
        key, where = os.environ[API_KEY_ENV], f"the environment variable {API_KEY_ENV}"
    else:
        return None
    problem = api_key_problem(key)
    if problem:
        raise InputError(f"the API key from {where} {problem}")
    return key


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """The Host names served besides loopback: --allowed-hosts, and the --host address."""
    from retrolm.serve.settings import LOOPBACK_HOSTS, host_name

    names: list[str] = []
    if args.allowed_hosts is not None:
        names = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
        if not names:
            raise InputError("--allowed-hosts is empty; give host names (comma-separated) or *")
    address = _address(args.host)
    wildcard = args.host in ("", "*") or (address is not None and address.is_unspecified)
    if wildcard and args.allowed_hosts is None:
        raise InputError(
            f"--host {args.host or '(all addresses)'} answers on every address: say which "
            "names clients will use with --allowed-hosts NAME[,NAME...] (or --allowed-hosts "
            "'*' to answer any Host header)"
        )
    if not wildcard and host_name(args.host) not in LOOPBACK_HOSTS:
        names.append(args.host)
    return tuple(names)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from retrolm.serve.app import GracefulServer, create_app
    from retrolm.serve.settings import ServeSettings

    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be from 1 to 65535, got {args.port}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise InputError(
            f"--shutdown-timeout must be a finite number >= 0, got {args.shutdown_timeout}"
        )
    settings = config_from_flags(ServeSettings, args, SETTINGS_FLAGS)  # checked before the key
    api_key = _api_key(args)
    address = _address(args.host)
    loopback = args.host == "localhost" or (address is not None and address.is_loopback)
    if not loopback and api_key is None:
        log.warning("binding %s without --api-key: anyone who can reach it may use it", args.host)
    settings = dataclasses.replace(settings, api_key=api_key, allowed_hosts=_allowed_hosts(args))
    if not args.db.exists():
        raise InputError(f"database {args.db} does not exist; build one with `retrolm db build`")
    # the model and database load once the server is up (/health: 503 "loading" meanwhile)
    app = create_app(args.run, args.db, settings, background=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = GracefulServer(app, config, args.shutdown_timeout)
    failed: list[BaseException] = []

    def load_failed(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app.state.on_load_error = load_failed
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers
    # in place that re-raise returns, so SIGTERM / Ctrl-C end with exit status 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        shown = f"[{args.host}]" if address is not None and address.version == 6 else args.host
        print(
            f"retrolm serve: http://{shown}:{args.port}/ (Ctrl-C or SIGTERM to stop)",
            flush=True,
        )
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        raise InputError(
            f"could not serve on {args.host}:{args.port}: the port is in use, or the address is "
            "not one of this machine's (see the message above); choose another --port or --host"
        ) from exc
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:  # the model or the database could not be loaded: the server stopped
        if isinstance(failed[0], UserError):
            raise failed[0]
        raise InputError(f"could not load the model and database: {failed[0]}") from failed[0]
    if not server.started:
        raise InputError(f"could not serve on {args.host}:{args.port} (is the port in use?)")
    print("retrolm serve: stopped", flush=True)
    return 0
