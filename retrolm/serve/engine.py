"""The model worker: one thread owns the model and runs every decoding step for all requests.

Requests come from the event loop (`Engine.submit`), wait in a bounded queue until a row of the
`BatchDecoder` is free, and get their results back as events on an asyncio queue
(`Completion.events`, shared by the choices of one HTTP request): with `echo` and `logprobs`
the prompt's log-probabilities first (`retrolm.serve.scoring`), text pieces (with their tokens'
log-probabilities when asked), retrieved chunks as they complete, then "done" (or "error");
each event names its choice (`index`). A cancelled request (client gone, timeout) is dropped at
the next step and its row freed. Whatever fails inside the worker fails only the requests it concerns (with an "error"
event): a step that raises is retried one sequence at a time, and the worker goes on serving.
`LiveDatabase` reopens the database when its manifest changes; each request keeps the snapshot
it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrolm.decoding import BatchDecoder, Sequence, TokenLogprobs, window_start
from retrolm.errors import InputError
from retrolm.generate import RetrievedChunk, attribute
from retrolm.runs import neighbours_read
from retrolm.serve.scoring import (
    neighbours_of,
    prompt_logprobs,
    token_pieces,
    top_json,
)

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The wait queue holds --max-queue requests already."""


# ---------------------------------------------------------------------------------------------
# the live database


MISSING = (-1, -1)  # the manifest signature of a folder without manifest.json


class LiveDatabase:
    """The current `Database` of a folder, reopened when its manifest.json changes.

    `current` is swapped atomically (one reference assignment) once the new database is open,
    its index loaded and its embedder ready; requests that hold the old snapshot finish on it
    (its files are replaced by rename, never rewritten, so its memory maps stay valid). A
    manifest that is mid-update (an unfinished `db add`) is retried at the next poll.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        opened: Any,
        interval: float = 1.0,
        check: Callable[[Any], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.interval = interval
        self.check = check  # raises if a reopened database no longer suits the model
        self.current = opened
        self.version = 1
        self.lock = threading.Lock()  # searches of every snapshot (shared embedder / index)
        self._signature = self._stat()
        self.refused: str | None = None  # why the manifest on disk is not served (None: it is)
        self._refused_signature: tuple[int, int] | None = None  # logged once per signature
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepare(opened)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = (self.path / "manifest.json").stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _prepare(self, db: Any) -> None:
        _ = db.index  # loaded now, not lazily from files that a later `db add` may replace
        if db.manifest.index.kind != "bm25":
            _ = db.embedder

    def start(self) -> None:
        if self.interval > 0 and (self._thread is None or not self._thread.is_alive()):
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._watch, name="retrolm-db-watch", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            signature = self._stat()
            if signature is None:
                gone = "has no manifest.json (deleted?); the version loaded is served meanwhile"
                self._refuse(MISSING, logging.WARNING, gone)
                continue
            if signature == self._signature:
                self.refused, self._refused_signature = None, None  # the served one is back
                continue
            try:
                self.reload(signature)
            except Exception:  # the watcher outlives anything one reload does
                log.exception("reloading database %s failed", self.path)

    def _refuse(self, signature: tuple[int, int] | None, level: int, message: str) -> None:
        """Log why the manifest is not served: once per manifest signature, then at debug."""
        if signature is not None and signature == self._refused_signature:
            level = logging.DEBUG
        self._refused_signature = signature
        self.refused = message
        log.log(level, "database %s %s", self.path, message)

    def reload(self, signature: tuple[int, int] | None = None) -> bool:
        """Open the database again and swap it in; False (old one kept) if it is unfinished."""
        from retrolm.database import Database

        signature = signature or self._stat()
        old = self.current
        try:
            db = Database.open(self.path)
            if self.check is not None:
                self.check(db)
            if db.manifest.index.kind != "bm25":
                with contextlib.suppress(Exception):  # same embedder: reuse the loaded one
                    db.set_embedder(old.embedder)
            self._prepare(db)
        except InputError as exc:  # unfinished (a `db add` under way): keep the old snapshot
            msg = f"changed but cannot be opened yet ({exc}); retrying"
            self._refuse(signature, logging.INFO, msg)
            return False
        except Exception as exc:  # mid-write, or no longer the model's tokenizer / chunk size
            msg = f"changed but is not served ({exc}); the previous version is served meanwhile"
            self._refuse(signature, logging.WARNING, msg)
            return False
        self.current = db
        self.version += 1
        self._signature = signature
        self.refused, self._refused_signature = None, None
        log.info(
            "database %s reloaded: %d documents, %d chunks (version %d)",
            self.path,
            len(db.documents),
            db.num_chunks,
            self.version,
        )
        return True


class DatabaseRetriever:
    """`BatchRetrieve` over one database snapshot: neighbour tokens plus (ids, distances).
    `observe(seconds)`, if given, is told how long each call took."""

    def __init__(
        self,
        db: Any,
        k: int,
        lock: threading.Lock,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.db, self.k, self.lock, self.observe = db, k, lock, observe

    def __call__(self, chunks: np.ndarray) -> tuple[np.ndarray, list[tuple[Any, Any]]]:
        start = time.perf_counter()
        with self.lock:
            ids, dists = self.db.search_chunks(chunks, self.k)
        tokens = np.asarray(self.db.neighbour_tokens(ids), dtype=np.int64)
        if self.observe is not None:
            self.observe(time.perf_counter() - start)
        return tokens, list(zip(ids, dists))


# ---------------------------------------------------------------------------------------------
# requests


@dataclass(eq=False)
class Completion:
    """One completion request: what it asks for, and where its events go."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    logprobs: int | None = None  # top ids per token to give with each token's log-probability
    echo: bool = False  # score the prompt too (its log-probabilities, with `logprobs`)
    index: int = 0  # the choice it answers (events carry it)
    # set by the engine
    db: Any = None
    sequence: Sequence | None = None
    text: str = ""  # emitted so far
    generated: list[int] = field(default_factory=list)
    chunks_sent: int = 0
    skipped: int = 0  # the oldest prompt tokens a prompt longer than the window drops, unread
    started: float = field(default_factory=time.monotonic)
    last_token: float | None = None  # when the last token came (for inter-token latency)
    lengths: list[int] = field(default_factory=list)  # len(decoded text) after each token
    lp_sent: int = 0  # tokens whose log-probabilities were sent
    full: str = ""  # the text of every token so far (an incomplete character included)

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: dict[str, Any]) -> None:
        if self.loop is None or self.events is None:
            return
        event = {**event, "index": self.index}
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could begin a stop string (not sent yet)."""
    hold = 0
    for stop in stops:
        # the first place in the last len(stop) - 1 characters where the rest of `text` begins
        # `stop` gives the longest such ending
        i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while i >= 0 and len(text) - i > hold:
            if stop.startswith(text[i:]):
                hold = len(text) - i
                break
            i = text.find(stop[0], i + 1)
    return hold


# ---------------------------------------------------------------------------------------------
# the engine


class Engine:
    """Owns the model and the `BatchDecoder`; runs the decoding loop in one worker thread."""

    def __init__(
        self,
        model: Any,
        database: LiveDatabase,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        neighbours: int | None = None,
        device: torch.device | str = "cpu",
        metrics: Any = None,
    ) -> None:
        self.model = model
        self.metrics = metrics  # `ServeMetrics` (or None): told of tokens and retrievals
        self.database = database
        self.k = neighbours_read(neighbours, model.cfg)
        self.decoder = BatchDecoder(model, max_batch, self.k, device)
        self.decoder.reserve()  # a batch that cannot fit in memory is refused now
        self.max_batch, self.max_queue = max_batch, max_queue
        self.tokenizer = database.current.tokenizer
        self.eos_id = self.tokenizer.eos_id
        self._pending: deque[Completion] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._abort: str | None = None  # set: every request, running or to come, ends with it
        self._thread: threading.Thread | None = None
        self._retrievers: dict[int, DatabaseRetriever] = {}
        self.completed = 0
        self.failed = 0
        self.cancelled = 0

    # ---- called from the event loop

    def start(self) -> None:
        """Start the worker (again, after `stop`)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop, self._abort = False, None
            self._thread = threading.Thread(target=self._run, name="retrolm-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def abort(self, message: str) -> None:
        """End every request, running or waiting (and any submitted later), with an error."""
        with self._cond:
            self._abort = message
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before `start` and after `stop`)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, *completions: Completion) -> None:
        """Queue requests (all or none); raises QueueFull when --max-queue requests would be
        waiting."""
        with self._cond:
            if self._stop or self._abort is not None:
                raise QueueFull("the server is shutting down")
            room = self.max_queue - len(completions)
            if len(self._pending) > room:  # requests given up on leave first
                self._pending = deque(c for c in self._pending if not c.cancelled)
            if len(self._pending) > room:
                raise QueueFull(
                    f"{len(self._pending)} requests are waiting already (--max-queue "
                    f"{self.max_queue}); retry later"
                )
            for completion in completions:
                completion.db = self.database.current  # the snapshot it keeps to the end
                self._pending.append(completion)
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return len(self.decoder.running)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ---- the worker thread

    def _retriever(self, db: Any) -> DatabaseRetriever | None:
        if not self.model.cfg.retrieval:
            return None
        key = id(db)
        found = self._retrievers.get(key)
        if found is None or found.db is not db:
            observe = None if self.metrics is None else self.metrics.retrieval
            found = self._retrievers[key] = DatabaseRetriever(
                db, self.k, self.database.lock, observe
            )
            live = {id(c.db) for c in self._pending} | {id(self.database.current)}
            live |= {id(s.tag.db) for s in self.decoder.running}
            for stale in [k for k in self._retrievers if k not in live]:  # old snapshots
                del self._retrievers[stale]
        return found

    def _admit(self) -> None:
        with self._cond:
            while not self._stop and not self._pending and not self.decoder.running:
                self._cond.wait(0.5)
            while self._pending and self.decoder.has_room:
                c = self._pending.popleft()
                if c.cancelled:
                    self.cancelled += 1
                    continue
                if self._abort is not None:
                    self._fail(c, self._abort, "shutdown")
                    continue
                try:
                    self._start(c)
                except Exception as exc:  # this request only: it cannot start
                    log.exception("a request could not start")
                    self._fail(c, f"the request could not start: {exc}")

    def _start(self, c: Completion) -> None:
        m = self.decoder.cfg.chunk_size
        generator = None
        if c.temperature > 0:
            seed = c.seed if c.seed is not None else int.from_bytes(os.urandom(6), "big")
            generator = torch.Generator(device=self.decoder.device).manual_seed(seed)
        retrieve = self._retriever(c.db)
        neighbours, infos = None, []
        if c.echo and c.logprobs is not None:  # the prompt's own log-probabilities first
            neighbours, infos = neighbours_of(c.prompt_ids, m, retrieve)
            scored = prompt_logprobs(
                self.model, c.prompt_ids, neighbours, top=c.logprobs, device=self.decoder.device
            )
            c.emit({"type": "prompt_logprobs", "tokens": self._prompt_json(c, scored)})
        if c.max_tokens == 0:  # scoring only: the sources of the chunks a prompt token read
            read = (len(c.prompt_ids) - 1) // m if neighbours is not None else 0
            for u in range(read):
                nb_ids, dists = infos[u]
                chunk = np.asarray(c.prompt_ids[u * m : (u + 1) * m])
                entry = attribute(c.db, u, m, len(c.prompt_ids), chunk, nb_ids, dists)
                c.emit({"type": "chunk", "chunk": entry})
            self._done(c, "length", 0)
            return
        # a prompt longer than the window: decoded from the window it leaves, as
        # `RETRO.generate` does (the dropped whole chunks are never read again)
        c.skipped = window_start(len(c.prompt_ids), self.decoder.cfg.max_seq_len, m)
        sequence = Sequence(
            c.prompt_ids[c.skipped :],
            c.max_tokens,
            retrieve=retrieve,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p if c.top_p is not None and c.top_p < 1 else None,
            generator=generator,
            tag=c,
            logprobs=c.logprobs,
        )
        if neighbours is not None:  # retrieved for the scoring already: not searched again
            kept = neighbours[c.skipped // m :]
            sequence.neighbours = [torch.as_tensor(nb).to(self.decoder.device) for nb in kept]
            sequence.retrieved = infos[c.skipped // m :]
        self.decoder.add(sequence)
        c.sequence = sequence

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:
                self._admit()
                if self._stop:
                    break
                self._turn()
            except Exception:  # a bug in the loop itself: end what runs, keep serving
                log.exception("the decoding loop failed")
                for seq in list(self.decoder.running):
                    self._finish(seq, error="generation failed (see the server log)")
        shut = "the server shut down before this request finished"
        for seq in list(self.decoder.running):
            self._finish(seq, error=shut, error_type="shutdown")
        while self._pending:
            self._fail(self._pending.popleft(), "the server shut down", "shutdown")

    def _turn(self) -> None:
        """Drop the cancelled sequences, then one step of the others and their tokens."""
        if self._abort is not None:
            for seq in list(self.decoder.running):
                self._finish(seq, error=self._abort, error_type="shutdown")
        for seq in [s for s in self.decoder.running if s.tag.cancelled]:
            self.decoder.remove(seq)
            self.cancelled += 1
        if not self.decoder.running:
            return
        for seq, token in self._step():
            try:
                self._on_token(seq, token)
            except Exception as exc:  # this request only (decoding its text, attribution)
                log.exception("a request failed after a step")
                self._finish(seq, error=f"generation failed: {exc}")

    def _step(self) -> list[tuple[Sequence, int]]:
        """`decoder.step()`; when it raises, each sequence is stepped alone (its window encoded
        again, since the failed step may have half-written its row) and only those that
        still fail are ended with an error."""
        try:
            return self.decoder.step()
        except Exception as exc:
            running = list(self.decoder.running)
            log.exception("a decoding step of %d sequences failed", len(running))
            if len(running) == 1:
                self._finish(running[0], error=f"generation failed: {exc}")
                return []
        results: list[tuple[Sequence, int]] = []
        for seq in running:
            if seq not in self.decoder.running:
                continue
            seq.start = -1
            try:
                results += self.decoder.step(only=[seq])
            except Exception as exc:
                log.exception("a decoding step of one sequence failed")
                self._finish(seq, error=f"generation failed: {exc}")
        return results

    def _send_chunks(self, c: Completion, seq: Sequence) -> None:
        m = self.decoder.cfg.chunk_size
        while c.chunks_sent < len(seq.retrieved):
            u = c.chunks_sent  # in the decoded sequence; c.skipped // m + u in the request's
            nb_ids, dists = seq.retrieved[u]
            chunk = np.asarray(seq.tokens[u * m : (u + 1) * m])
            entry: RetrievedChunk = attribute(
                c.db, c.skipped // m + u, m, len(c.prompt_ids), chunk, nb_ids, dists
            )
            c.emit({"type": "chunk", "chunk": entry})
            c.chunks_sent += 1

    def _on_token(self, seq: Sequence, token: int) -> None:
        c: Completion = seq.tag
        self._timed(c)
        self._send_chunks(c, seq)
        if c.cancelled:
            self.decoder.remove(seq)
            self.cancelled += 1
            return
        eos = token == self.eos_id
        if not eos:
            c.generated.append(token)
        final = seq.finished or eos  # no token follows: flush what was held back
        text = self.tokenizer.decode_after(c.prompt_ids, c.generated)
        c.full = text
        c.lengths.append(len(text))
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for the rest
        hits = [i for i in (text.find(s) for s in c.stop) if i >= 0]
        if hits:
            self._emit_text(c, seq, text[: min(hits)], final=True, cut=True)
            self._finish(seq, reason="stop")
            return
        if final:
            self._emit_text(c, seq, text, final=True)
            self._finish(seq, reason="stop" if eos else "length")
        else:
            self._emit_text(c, seq, text[: len(text) - _held_back(text, c.stop)])

    def _timed(self, c: Completion) -> None:
        """Tell the metrics the time to this token (from arrival, or from the last token)."""
        now = time.monotonic()
        if self.metrics is not None:
            if c.last_token is None:
                self.metrics.first_token(now - c.started)
            else:
                self.metrics.next_token(now - c.last_token)
        c.last_token = now

    def _emit_text(
        self, c: Completion, seq: Sequence, text: str, final: bool = False, cut: bool = False
    ) -> None:
        """Send the text past what was sent and, with `logprobs`, the tokens that begin in it (at
        the end every token left, but those past a stop string's `cut`)."""
        grew = len(text) > len(c.text) and text.startswith(c.text)
        tokens: list[dict[str, Any]] = []
        if seq.logprobs is not None:
            end = c.lp_sent
            if final and not cut:
                end = len(seq.token_logprobs)
            else:
                while end < len(seq.token_logprobs) and self._start_of(c, end) < len(text):
                    end += 1
            tokens = [self._token_json(c, seq, i) for i in range(c.lp_sent, end)]
            c.lp_sent = end
        if grew or tokens:
            piece = text[len(c.text) :] if grew else ""
            c.emit({"type": "text", "text": piece, "tokens": tokens})
            if grew:
                c.text = text

    def _prompt_json(self, c: Completion, scored: TokenLogprobs) -> list[dict[str, Any]]:
        """The prompt's tokens as `_token_json` gives generated ones (offsets from its start)."""
        out, offset = [], 0
        pieces = token_pieces(self.tokenizer, c.prompt_ids)
        for piece, chosen, top in zip(pieces, scored.logprobs, scored.top):
            top_ = top_json(self.tokenizer, piece, chosen, top)
            out.append({"token": piece, "logprob": chosen, "top": top_, "offset": offset})
            offset += len(piece)
        return out

    @staticmethod
    def _start_of(c: Completion, i: int) -> int:
        """Where generated token i's text begins in the completion's text."""
        return c.lengths[i - 1] if i > 0 else 0

    def _token_json(self, c: Completion, seq: Sequence, i: int) -> dict[str, Any]:
        """Generated token i: its text, log-probability, top ids (by their text) and offset."""
        chosen, top = seq.token_logprobs[i]
        start = self._start_of(c, i)
        token = c.full[start : c.lengths[i]] if i < len(c.lengths) else ""
        top_ = top_json(self.tokenizer, token, chosen, top)
        return {"token": token, "logprob": chosen, "top": top_, "offset": start}

    def _fail(self, c: Completion, message: str, error_type: str = "server_error") -> None:
        """End a request that holds no row with an error event."""
        self.failed += 1
        c.emit({"type": "error", "message": message, "error_type": error_type})

    def _finish(
        self, seq: Sequence, reason: str = "", error: str = "", error_type: str = "server_error"
    ) -> None:
        c: Completion = seq.tag
        self.decoder.remove(seq)
        if error:
            self._fail(c, error, error_type)
            return
        self._done(c, reason, seq.generated)

    def _done(self, c: Completion, reason: str, generated: int) -> None:
        self.completed += 1
        if self.metrics is not None:
            self.metrics.generated(generated)
        c.emit(
            {
                "type": "done",
                "finish_reason": reason,
                "prompt_tokens": len(c.prompt_ids),
                "completion_tokens": generated,
            }
        )
