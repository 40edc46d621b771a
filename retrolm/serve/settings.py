"""`retrolm serve` settings, importable without the web stack (the CLI parser reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from retrolm.errors import ConfigError

API_KEY_ENV = "RETROLM_API_KEY"

# Host names that always reach the server: a page of another site cannot make a browser send
# them (DNS rebinding needs a name the attacker controls)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key (None: it can). A key is what a client sends after
    `Bearer `: visible ASCII, nothing blank around it (HTTP strips it)."""
    if not key.strip():
        return "is empty; give a non-empty key (or none, to serve without one)"
    if key != key.strip():
        return "starts or ends with whitespace, which HTTP headers drop; remove it"
    if not all(" " <= ch <= "~" for ch in key):
        return "has characters other than printable ASCII, which HTTP headers cannot carry"
    return None


@dataclass
class ServeSettings:
    """Everything `retrolm serve` can set, with their defaults; the CLI's flags are made from
    these fields and their comments (`retrolm.cli.flags`).

    Raises:
        ConfigError: a value out of range (an empty API key, a batch of 0 rows, ...).
    """

    api_key: str | None = None  # every /v1/* request needs `Authorization: Bearer KEY`
    # tokens a prompt may have; one longer than the model's window loses its oldest whole chunks
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024  # the largest `max_tokens` a request may ask for
    max_n: int = 8  # the largest `n` (samples per prompt) a request may ask for
    max_body_bytes: int = 65536  # the largest request body; larger ones get 413
    max_search_k: int = 50  # the largest `k` of a /v1/search request
    max_batch: int = 16  # requests decoded together (rows of the batch, allocated at start-up)
    max_queue: int = 64  # requests waiting for a row; more get 429
    request_timeout: float = 300.0  # seconds a request may take, waiting included
    reload_interval: float = 1.0  # seconds between database manifest polls (0: never reload)
    neighbours: int | None = None  # k per chunk (default: the model's)
    device: str = "cpu"  # where the model runs: cpu, cuda, or auto (cuda when there is one)
    model_name: str | None = None  # the id in /v1/models (default: the run folder's name)
    # Host header names served besides LOOPBACK_HOSTS (any port); "*" serves any Host, and
    # "*.example.com" any subdomain of example.com
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.api_key is not None:
            if not isinstance(self.api_key, str):
                raise ConfigError(f"api_key must be a string, got {type(self.api_key).__name__}")
            problem = api_key_problem(self.api_key)
            if problem:
                raise ConfigError(f"api_key {problem}")
        for name in ("max_prompt_tokens", "max_tokens", "max_n", "max_body_bytes",
                     "max_search_k", "max_batch", "max_queue", "neighbours"):  # fmt: skip
            value = getattr(self, name)
            if name == "neighbours" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, low in (("request_timeout", 0.0), ("reload_interval", 0.0)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (
                not ok
                or not math.isfinite(value)
                or value < low
                or (name == "request_timeout" and value == 0)
            ):
                what = "positive" if name == "request_timeout" else ">= 0"
                raise ConfigError(f"{name} must be a finite number {what}, got {value!r}")
        if self.model_name is not None and (
            not isinstance(self.model_name, str) or not self.model_name.strip()
        ):
            raise ConfigError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if isinstance(self.allowed_hosts, str):
            self.allowed_hosts = tuple(h for h in self.allowed_hosts.split(",") if h.strip())
        hosts = []
        for host in self.allowed_hosts:
            name = host.strip().lower().rstrip(".") if isinstance(host, str) else ""
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            if not name or any(c in name for c in "/ @") or "*" in name.lstrip("*."):
                raise ConfigError(
                    f"allowed host {host!r} is not a host name; give names like example.com, "
                    "*.example.com, 10.0.0.5, or * for any"
                )
            hosts.append(name)
        self.allowed_hosts = tuple(hosts)

    def host_allowed(self, host: str) -> bool:
        """Whether a request's Host header (`name` or `name:port`, `[v6]:port`) is served."""
        if "*" in self.allowed_hosts:
            return True
        name = host_name(host)
        if name is None:
            return False
        for allowed in (*LOOPBACK_HOSTS, *self.allowed_hosts):
            if name == allowed or (allowed.startswith("*.") and name.endswith(allowed[1:])):
                return True
        return False


def host_name(host: str) -> str | None:
    """The name in a Host header value, lowercase, without its port (None: malformed)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, port = host[1:].partition("]")
        if not sep or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
        if not port.isdigit():
            return None
    else:
        name = host  # a bare name, or an IPv6 address without brackets
    name = name.rstrip(".")
    if not name or any(c in name for c in "/@ \\"):
        return None
    return name
