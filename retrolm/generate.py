"""Generation with retrieval in the loop, and attribution of every retrieved chunk.

`RETRO.generate` (KV-cached) calls `retrieve(chunk_tokens)` each time a chunk of the sequence
completes, the prompt's chunks included; here that searches the database with the chunk's text
(`db.search_chunks`: decode -> embed -> index, or BM25) and returns the neighbours with their
continuations (`db.neighbour_tokens`). Every call is recorded, so the result says which database
chunks fed which part of the text. The text is streamed token by token as it is sampled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrolm.decoding import window_start
from retrolm.errors import InputError
from retrolm.runs import (
    check_database,
    load_run_model,
    neighbours_read,
    open_database,
    read_run_meta,
    resolve_device,
)

log = logging.getLogger(__name__)

# the seeds torch.Generator.manual_seed takes (a negative one is read modulo 2**64)
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_settings(
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    num_neighbours: int | None,
) -> None:
    """Refuse generation settings that cannot be honoured, naming the flag.

    Raises:
        InputError: a count that is not positive, a temperature that is negative or not
            finite, top_p outside (0, 1], or a seed the sampling generator cannot take.
    """
    for flag, value, least in (
        ("--max-new-tokens", max_new_tokens, 1),
        ("--top-k", top_k, 1),
        ("--neighbours", num_neighbours, 1),
    ):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < least
        ):
            hint = ""
            if flag == "--neighbours":
                hint = (
                    " (leave it out for the model's training k; a model trained with "
                    "--no-retrieval generates without any)"
                )
            raise InputError(f"{flag} must be a positive integer, got {value!r}{hint}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise InputError(
            f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}"
        )
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"--top-p must lie in (0, 1], got {top_p}")
    lo, hi = SEED_RANGE
    if not isinstance(seed, int) or isinstance(seed, bool) or not lo <= seed <= hi:
        raise InputError(
            f"--seed must be an integer from -2**63 to 2**64 - 1 (what torch's generator takes), "
            f"got {seed}"
        )


@dataclass
class RetrievedNeighbour:
    chunk_id: int  # database chunk id
    document: str  # name of the document it comes from
    score: float  # as the index ranks: l2 a squared distance, ip / BM25 a similarity
    text: str  # the chunk's text


@dataclass
class RetrievedChunk:
    chunk_index: int  # which chunk of the sequence (0-based, prompt chunks first)
    start_token: int  # its first token position in the sequence
    text: str  # the chunk's text (the query)
    in_prompt: bool  # the chunk lies entirely within the prompt
    neighbours: list[RetrievedNeighbour] = field(default_factory=list)


@dataclass
class GenerationResult:
    prompt: str
    text: str  # the generated continuation (without the prompt)
    tokens: list[int]  # prompt and generated token ids
    prompt_tokens: int
    attribution: list[RetrievedChunk]
    seconds: float  # wall time of generation, retrieval included
    retrieval_seconds: float  # of which in database search (embed + index)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def attribution_text(self, snippet: int = 80) -> str:
        """A human-readable listing of the retrieved chunks."""
        lines = []
        for c in self.attribution:
            where = "prompt" if c.in_prompt else "generated"
            if not c.in_prompt and c.start_token < self.prompt_tokens:
                where = "prompt + generated"
            lines.append(
                f"chunk {c.chunk_index} ({where}, tokens {c.start_token}..): {_snip(c.text, snippet)}"
            )
            for n in c.neighbours:
                lines.append(
                    f"    [{n.score:9.4f}] {n.document} #{n.chunk_id}: {_snip(n.text, snippet)}"
                )
        return "\n".join(lines) if lines else "(no chunk completed: nothing was retrieved)"


def _snip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


class TextStreamer:
    """Turns a growing token sequence into text deltas (holding back half a character)."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None]):
        self.decode, self.on_text, self.emitted = decode, on_text, ""

    def update(self, tokens: list[int], final: bool = False) -> None:
        text = self.decode(tokens)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its rest
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.on_text(text[len(self.emitted) :])
            self.emitted = text


def generate_text(
    run: str | Path,
    db: str | Path | Any,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_neighbours: int | None = None,
    on_text: Callable[[str], None] | None = None,
    device: str = "cpu",
    model: Any = None,
) -> GenerationResult:
    """Continue `prompt` with the run's model, retrieving from `db` at every chunk.

    Args:
        run: training run folder.
        db: database folder (or an opened Database) with the run's tokenizer and chunk size.
        prompt: text to continue (any length >= 1 character; no retrieval until a chunk is full).
            One longer than the model's window is read as the window would hold it: its oldest
            whole chunks are dropped (`retrolm.decoding.window_start`), as generation drops them.
        max_new_tokens: tokens to generate.
        temperature: 0 is greedy; top_k / top_p restrict sampling.
        seed: seeds the sampling generator.
        num_neighbours: k retrieved per chunk (default: the model's training k).
        on_text: called with each new piece of generated text, as it is produced.
        device: "cpu", "cuda" or "auto".
        model: an already loaded model of `run` (skips loading).

    Returns:
        The generated text and, per completed chunk, the retrieved database chunks.

    Raises:
        InputError: empty or non-text prompt, bad settings (`check_settings`), missing run;
            MismatchError: a database with another tokenizer or chunk size.
    """
    if not prompt:
        raise InputError("the prompt is empty; give some text to continue")
    check_prompt_text(prompt)
    check_settings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_neighbours=num_neighbours,
    )
    if model is None:
        model, meta = load_run_model(run)
    else:
        meta = read_run_meta(run)
    source = open_database(db)
    check_database(meta["database"], source, str(run))
    cfg = model.cfg
    ids = source.tokenizer.encode(prompt)
    first_chunk = window_start(len(ids), cfg.max_seq_len, source.chunk_size) // source.chunk_size
    dev = resolve_device(device)
    model.to(dev).eval()
    k = neighbours_read(num_neighbours, cfg)
    m = source.chunk_size
    attribution: list[RetrievedChunk] = []
    retrieval_time = [0.0]
    history: list[list[int]] = []  # tokens of each completed chunk (batch row 0)
    decode = partial(source.tokenizer.decode_after, ids)  # the text after the prompt
    streamer = TextStreamer(decode, on_text) if on_text else None

    def retrieve(chunk_tokens: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        tokens = chunk_tokens.detach().cpu().numpy().astype(np.int64)  # (B, m)
        nb_ids, dists = source.search_chunks(tokens, k)
        neighbours = torch.from_numpy(np.asarray(source.neighbour_tokens(nb_ids), dtype=np.int64))
        retrieval_time[0] += time.perf_counter() - t0
        u = first_chunk + len(history)  # the chunks a long prompt drops are not retrieved for
        history.append(tokens[0].tolist())
        attribution.append(attribute(source, u, m, len(ids), tokens[0], nb_ids[0], dists[0]))
        return neighbours.to(dev)

    generated: list[int] = []  # batch row 0

    def on_token(token: torch.Tensor) -> None:
        generated.append(int(token[0]))
        if streamer is not None:
            streamer.update(generated)

    generator = torch.Generator(device=dev).manual_seed(seed)
    t_start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids], dtype=torch.long, device=dev),
            max_new_tokens,
            retrieve=retrieve if cfg.cca_layers else None,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            on_token=on_token,
        )
    seconds = time.perf_counter() - t_start
    tokens = out[0].tolist()
    if streamer is not None:
        streamer.update(tokens[len(ids) :], final=True)
    return GenerationResult(
        prompt=prompt,
        text=decode(tokens[len(ids) :]),
        tokens=tokens,
        prompt_tokens=len(ids),
        attribution=attribution,
        seconds=seconds,
        retrieval_seconds=retrieval_time[0],
    )


def check_prompt_text(prompt: str) -> None:
    """Refuse a prompt that is not text: invalid UTF-8 (which Python keeps as lone surrogates
    when it reads the command line).

    Raises:
        InputError: naming the position of the first bad character.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"the prompt is not valid UTF-8 text (character {e.start} cannot be encoded); give "
            "UTF-8 text"
        ) from e


def attribute(
    source: Any,
    u: int,
    m: int,
    prompt_len: int,
    chunk: np.ndarray,
    nb_ids: np.ndarray,
    dists: np.ndarray,
) -> RetrievedChunk:
    entry = RetrievedChunk(
        chunk_index=u,
        start_token=u * m,
        text=source.tokenizer.decode(chunk.tolist()),
        in_prompt=(u + 1) * m <= prompt_len,
    )
    for nid, dist in zip(nb_ids.tolist(), dists.tolist()):
        if nid < 0:
            continue
        doc = source.documents[int(source.chunk_doc[nid])]
        entry.neighbours.append(
            RetrievedNeighbour(int(nid), str(doc.name), float(dist), source.chunk_text(int(nid)))
        )
    return entry
