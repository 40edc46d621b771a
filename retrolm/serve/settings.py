"""`retrolm serve` settings, importable without the web stack (the CLI parser reads them)."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "RETROLM_API_KEY"


@dataclass
class ServeSettings:
    """Everything `retrolm serve` can set (the CLI flags), with their defaults."""

    api_key: str | None = None  # every /v1/* request needs `Authorization: Bearer KEY`
    # tokens a prompt may have; one longer than the model's window loses its oldest whole chunks
    max_prompt_tokens: int = 8192
    max_tokens: int = 1024  # the largest `max_tokens` a request may ask for
    max_body_bytes: int = 65536
    max_search_k: int = 50
    max_batch: int = 16  # requests decoded together (rows of the batch)
    max_queue: int = 64  # requests waiting for a row; more get 429
    request_timeout: float = 300.0  # seconds from arrival to the last token
    reload_interval: float = 1.0  # seconds between database manifest polls (0: never reload)
    neighbours: int | None = None  # k per chunk (default: the model's)
    device: str = "cpu"
    model_name: str | None = None  # the id in /v1/models (default: the run folder's name)
