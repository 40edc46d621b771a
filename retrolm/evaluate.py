"""Evaluation: bits per byte on held-out documents, with and without retrieval, and filtered by
leakage as in the paper (Borgeaud et al. 2021, section 2.6).

The documents of a split are laid end to end as the database stores them (each ends with
`<eos>` and a padded tail) and scored with sliding windows of `window` tokens moved by `stride`
(both multiples of the chunk size, so chunk u of a window is a database chunk): the first window
scores all its tokens, each later one only its last `stride`, so every token but the very first
is scored exactly once, with at least `window - stride` tokens of context. Chunk u of a window
gets the stored neighbours of that database chunk (train and retrieval-only chunks, never of
its own document).

bpb = total negative log-likelihood in bits / UTF-8 bytes of the scored tokens. The leakage
figure of a chunk C is r(C) = longest common run of tokens between C and any of its 10 stored
nearest neighbours (each with its continuation) / chunk size; the filtered bpb for alpha counts
only the chunks with r(C) <= alpha. The neighbours are searched over everything the index holds,
the train and the retrieval-only chunks alike, so a near-copy of a held-out document among the
retrieval-only inputs gives its chunks a high r(C) (an exact copy is not indexed at all: the
build skips it as a duplicate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from retrolm.comparators import (
    COMPARATORS,
    KnnLMConfig,
    check_comparators,
    knnlm_bits,
    ralm_bits,
)
from retrolm.data import ChunkSource
from retrolm.errors import ConfigError, CorruptArtifactError, InputError, MismatchError
from retrolm.io import atomic_open
from retrolm.log import progress
from retrolm.runs import (
    check_database,
    load_run_model,
    neighbours_read,
    open_database,
    resolve_device,
)

log = logging.getLogger(__name__)

ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)


@dataclass
class EvalConfig:
    """Settings of an evaluation; written into the report."""

    split: str = "valid"  # documents evaluated
    window: int | None = None  # tokens per window; default the run's training seq_len
    stride: int | None = None  # tokens a window moves; default window // 2 (paper: 2048 / 1024)
    num_neighbours: int | None = None  # k at evaluation; default the model's training k
    max_tokens: int | None = None  # evaluate only the first chunks of the split (None: all)
    batch_size: int = 4  # windows per forward pass
    leakage_neighbours: int = 10  # nearest indexed chunks (train, retrieval-only) for r(C)
    alphas: tuple[float, ...] = ALPHAS  # leakage thresholds of the filtered figures
    bf16: bool = False  # bfloat16 autocast
    device: str = "auto"  # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        if self.split not in ("train", "valid"):
            raise ConfigError(f"EvalConfig.split must be train or valid, got {self.split!r}")
        for name in ("window", "stride", "num_neighbours", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"EvalConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size <= 0 or self.leakage_neighbours <= 0:
            raise ConfigError("EvalConfig.batch_size and leakage_neighbours must be positive")
        self.alphas = tuple(float(a) for a in self.alphas)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["alphas"] = list(self.alphas)
        return d


@dataclass
class EvalReport:
    """Figures of one evaluation. `bpb` keys: retro_on, retro_off, baseline (those evaluated)."""

    run: str
    database: str | None
    config: dict[str, Any]
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored tokens
    chunks: int  # chunks evaluated
    documents: int
    window: int
    stride: int
    k: int
    bpb: dict[str, float]
    filtered: list[dict[str, Any]] = field(default_factory=list)  # per alpha
    runs: dict[str, str] = field(default_factory=dict)  # bpb key -> the run folder it is of

    comparators: dict[str, Any] = field(default_factory=dict)  # settings found, e.g. kNN-LM's
    seconds: dict[str, float] = field(default_factory=dict)  # bpb key -> seconds scoring it
    checkpoint: int | None = None  # the step of the checkpoint scored (None: the final model)

    NAMES = {
        "retro_on": "retro_bpb",
        "retro_off": "retro_off_bpb",
        "baseline": "baseline_bpb",
        **{name: f"{name}_bpb" for name in COMPARATORS},
    }
    HEADS = {
        "retro_on": "RETRO[ON]",
        "retro_off": "RETRO[OFF]",
        "baseline": "baseline",
        **COMPARATORS,
    }

    def to_dict(self) -> dict[str, Any]:
        """JSON form: retro_bpb / retro_off_bpb / baseline_bpb, filtered[alpha] and counts."""
        d: dict[str, Any] = {self.NAMES[k]: v for k, v in self.bpb.items()}
        d["filtered"] = {
            str(f["alpha"]): {"chunks": f["chunks"]}
            | {self.NAMES[k]: v for k, v in f.items() if k in self.NAMES}
            for f in self.filtered
        }
        d.update(
            run=self.run,
            database=self.database,
            tokens=self.tokens,
            bytes=self.bytes,
            chunks=self.chunks,
            documents=self.documents,
            window=self.window,
            stride=self.stride,
            k=self.k,
            config=self.config,
        )
        if self.comparators:
            d["comparators"] = self.comparators
        if self.runs:
            d["runs"] = {self.NAMES[k]: v for k, v in self.runs.items()}
        if self.seconds:
            d["seconds"] = dict(self.seconds)  # retro_on, retro_off, baseline, ralm, knnlm
        if self.checkpoint is not None:
            d["checkpoint"] = self.checkpoint
        return d

    def to_text(self) -> str:
        """A plain table for the terminal."""
        cols = [k for k in self.NAMES if k in self.bpb]
        head = self.HEADS
        width = {c: max(12, len(head[c]) + 2) for c in cols}
        name = self.run if self.checkpoint is None else f"{self.run} at step {self.checkpoint}"
        lines = [
            f"{name}: {self.documents} documents, {self.chunks} chunks, {self.tokens} tokens,"
            f" {self.bytes} bytes (window {self.window}, stride {self.stride}, k {self.k})",
            "",
            *(
                [f"{head[c]:>12}: {self.runs[c]}" for c in cols if c in self.runs] + [""]
                if self.runs
                else []
            ),
            f"{'':>16}" + "".join(f"{head[c]:>{width[c]}}" for c in cols),
            f"{'bits per byte':>16}" + "".join(_fmt(self.bpb[c], width[c]) for c in cols),
        ]
        if self.filtered:
            lines += ["", "leakage-filtered (chunks with r(C) <= alpha):"]
            lines.append(
                f"{'alpha':>8}{'chunks':>8}" + "".join(f"{head[c]:>{width[c]}}" for c in cols)
            )
            for f in self.filtered:
                vals = "".join(_fmt(f.get(c), width[c]) for c in cols)
                lines.append(f"{f['alpha']:>8}{f['chunks']:>8}" + vals)
        return "\n".join(lines)


def _fmt(x: float | None, width: int = 12) -> str:
    return f"{'-':>{width}}" if x is None or not math.isfinite(x) else f"{x:>{width}.4f}"


# ---------------------------------------------------------------------------------------------
# pieces (each testable alone)


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for `<pad>` / `<eos>` and other specials).

    Byte-level BPE: every character of a token's string stands for one byte.
    """
    hf = tokenizer.hf
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    special = {int(tokenizer.pad_id), int(tokenizer.eos_id)}
    special |= {
        int(i) for i in hf.get_added_tokens_decoder() if hf.get_added_tokens_decoder()[i].special
    }
    out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    byte_level = decoder.get("type") == "ByteLevel"
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        if byte_level:
            out[i] = len(hf.id_to_token(i) or "")
        else:  # approximate for a token that is part of a character
            out[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return out


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, input length, first scored offset) of each window over a stream of `length`.

    Window `start` reads tokens start .. start+n-1 and predicts tokens start+1 .. start+n; it
    scores the predictions at offsets >= `first scored` so that every token 1..length-1 is scored
    exactly once.
    """
    out, scored_to, start = [], 0, 0  # tokens 1..scored_to are done
    while scored_to < length - 1:
        n = min(window, length - 1 - start)
        first = scored_to - start  # offset j predicts token start + j + 1
        out.append((start, n, first))
        scored_to = start + n
        start += stride
    return out


def window_batches(
    length: int, window: int, stride: int, chunk_size: int, batch_size: int
) -> list[list[tuple[int, int, int]]]:
    """The sliding windows of a stream (see `sliding_windows`), grouped into batches of windows
    of one length."""
    if window % chunk_size or stride % chunk_size or not 0 < stride <= window:
        raise ConfigError(
            f"EvalConfig.window ({window}) and stride ({stride}) must be multiples of the chunk "
            f"size {chunk_size}, with 0 < stride <= window"
        )
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in sliding_windows(length, window, stride):
        groups.setdefault(w[1], []).append(w)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _window_inputs(
    tokens: np.ndarray,
    neighbours: np.ndarray | None,
    chunk_size: int,
    window: int,
    stride: int,
    batch_size: int,
    device: torch.device | str,
    desc: str,
    show_progress: bool,
) -> Iterator[tuple[list[tuple[int, int, int]], Tensor, Tensor, Tensor | None]]:
    """(windows, inputs (B, n), targets (B, n), neighbours (B, ceil(n/m), k, r) | None) for
    every batch of the stream's sliding windows: what `score_stream` and `hidden_stream` feed."""
    batches = window_batches(len(tokens), window, stride, chunk_size, batch_size)
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    for batch in progress(batches, desc=desc, unit="batch", show=show_progress):
        n = batch[0][1]
        x = torch.stack([stream[s : s + n] for s, _, _ in batch]).to(device)
        y = torch.stack([stream[s + 1 : s + n + 1] for s, _, _ in batch]).to(device)
        nb = None
        if neighbours is not None:
            c = math.ceil(n / chunk_size)
            nb = torch.from_numpy(
                np.stack([neighbours[s // chunk_size : s // chunk_size + c] for s, _, _ in batch])
            ).to(device)
        yield batch, x, y, nb


Step = Callable[[Tensor, Tensor | None], dict[str, tuple[Tensor | None, Tensor | None]]]


@torch.no_grad()
def _score_windows(
    step: Step,
    tokens: np.ndarray,
    neighbours: np.ndarray | None,
    *,
    chunk_size: int,
    window: int,
    stride: int,
    pad_id: int,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    desc: str = "eval",
    show_progress: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Bits (and hidden states, where `step` gives them) of every token of a stream for each
    output `step(inputs (B, n), neighbours) -> {name: (logits (B, n, V) | None, hidden (B, n, d)
    | None)}` gives: {name: ((T,) bits, NaN where not scored; (T, d) float32 states | None)}.
    An output without logits scores 0 bits at every scored position (its states are the point).
    """
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    windows = _window_inputs(
        tokens, neighbours, chunk_size, window, stride, batch_size, device, desc, show_progress
    )
    for batch, x, y, nb in windows:
        n = x.shape[1]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            outputs = step(x, nb)
        for name, (logits, h) in outputs.items():
            if logits is None:  # hidden states only: 0 bits where scored
                nll = torch.zeros(y.shape, dtype=torch.float64, device=y.device)
            else:
                logp = torch.log_softmax(logits.float(), dim=-1)
                nll = -logp.gather(-1, y[..., None])[..., 0] / math.log(2)  # (B, n) bits
            nll = nll.masked_fill(y == pad_id, float("nan")).double().cpu().numpy()
            if name not in out:
                states = None if h is None else np.zeros((len(tokens), h.shape[-1]), np.float32)
                out[name] = (np.full(len(tokens), np.nan), states)
            bits, states = out[name]
            for row, (s, _, first) in enumerate(batch):
                bits[s + 1 + first : s + 1 + n] = nll[row, first:]
                if states is not None and h is not None:
                    states[s + 1 + first : s + 1 + n] = h[row, first:].float().cpu().numpy()
    return out


def score_stream(
    model: nn.Module,
    tokens: np.ndarray,
    neighbours: np.ndarray | None,
    *,
    chunk_size: int,
    window: int,
    stride: int,
    pad_id: int,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    desc: str = "eval",
    show_progress: bool = False,
    hidden: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood in bits of every token of a stream (NaN where not scored).

    Args:
        model: called as `model(tokens (B, n), neighbours=(B, ceil(n/m), k, r) | None)`.
        tokens: (T,) the stream, T a multiple of `chunk_size`.
        neighbours: (T // m, k, r) neighbour tokens of each chunk of the stream, or None.
        hidden: also return the model's final hidden state that predicted each token (the
            query of kNN-LM); the model needs `hidden_states` and `lm_head`.

    Returns:
        (T,) float64 bits; NaN for token 0 and for padding targets. With `hidden`, also
        (T, d) float32 hidden states (zeros where not scored).
    """
    model.eval()

    def step(x: Tensor, nb: Tensor | None) -> dict[str, tuple[Tensor, Tensor | None]]:
        if hidden:
            h = model.hidden_states(x, nb)  # (B, n, d)
            return {"": (model.lm_head(h), h)}
        return {"": (model(x, neighbours=nb), None)}

    bits, states = _score_windows(
        step, tokens, neighbours, chunk_size=chunk_size, window=window, stride=stride,
        pad_id=pad_id, batch_size=batch_size, device=device, bf16=bf16, desc=desc,
        show_progress=show_progress,
    ).get("", (np.full(len(tokens), np.nan), None))  # fmt: skip
    if hidden:
        return bits, states if states is not None else np.zeros((len(tokens), 0), np.float32)
    return bits


def score_base_and_retro(
    model: nn.Module,
    tokens: np.ndarray,
    neighbours: np.ndarray,
    *,
    hidden: bool = False,
    desc: str = "base + retro_on",
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`score_stream` of a RETRO-fitted model's RETRO[ON] and of its base at once, the layers
    below the first CCA layer run once for both (`RetroFitted.base_and_retro`).

    Returns:
        (RETRO[ON] bits (T,), the base's bits (T,), the base's hidden states (T, d) if `hidden`)
    """
    model.eval()

    def step(x: Tensor, nb: Tensor | None) -> dict[str, tuple[Tensor, Tensor | None]]:
        base_h, on = model.base_and_retro(x, nb)
        return {
            "retro_on": (on, None),
            "baseline": (model.lm_head(base_h), base_h if hidden else None),
        }

    out = _score_windows(step, tokens, neighbours, desc=desc, **kwargs)
    none = (np.full(len(tokens), np.nan), None)
    (on_bits, _), (base_bits, states) = out.get("retro_on", none), out.get("baseline", none)
    if hidden and states is None:
        states = np.zeros((len(tokens), 0), np.float32)
    return on_bits, base_bits, states


def hidden_stream(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    desc: str = "hidden",
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The final hidden states `score_stream(..., hidden=True)` returns, and which positions it
    scores, without the vocabulary projection (a kNN-LM datastore needs keys, not bits; the
    projection and its softmax cost more than the decoder at this model size). Takes
    `score_stream`'s window settings.

    Returns:
        (scored (T,) bool: the positions `score_stream` gives bits, (T, d) float32 states).
    """
    model.eval()

    def step(x: Tensor, nb: Tensor | None) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        return {"": (None, model.hidden_states(x))}

    out = _score_windows(step, tokens, None, desc=desc, **kwargs)
    zeros, states = out.get("", (np.full(len(tokens), np.nan), None))
    return ~np.isnan(zeros), states if states is not None else np.zeros(
        (len(tokens), 0), np.float32
    )


def longest_common_run(chunks: np.ndarray, neighbours: np.ndarray, pad_id: int) -> np.ndarray:
    """Longest run of equal consecutive tokens shared by each chunk and any of its neighbours.

    Args:
        chunks: (N, m) tokens.
        neighbours: (N, K, r) tokens (neighbour + continuation); padding never matches.

    Returns:
        (N,) int64 lengths in tokens (0..m).
    """
    a = np.where(chunks == pad_id, -1, chunks)[:, None, :, None]  # (N, 1, m, 1)
    b = np.where(neighbours == pad_id, -2, neighbours)[:, :, None, :]  # (N, K, 1, r)
    eq = a == b  # (N, K, m, r)
    run = np.zeros(eq.shape[:2] + (eq.shape[3],), dtype=np.int32)  # (N, K, r)
    best = np.zeros(eq.shape[0], dtype=np.int64)
    for i in range(eq.shape[2]):
        prev = np.zeros_like(run)
        prev[..., 1:] = run[..., :-1]  # the run along the diagonal ending at (i-1, j-1)
        run = np.where(eq[:, :, i, :], prev + 1, 0)
        best = np.maximum(best, run.reshape(len(best), -1).max(axis=1, initial=0))
    return best


def split_stream(source: ChunkSource, split: str, max_tokens: int | None) -> np.ndarray:
    """Chunk ids of the split (all, or the first whole chunks up to `max_tokens`)."""
    ids = np.asarray(source.split_chunk_ids(split), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[: max(1, max_tokens // source.chunk_size)]
    if len(ids) == 0:
        raise InputError(f"the database has no {split} chunks to evaluate on")
    return ids


def stream_neighbours(
    source: ChunkSource, chunk_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids (C, k), tokens (C, k, 2m)) of the stored neighbours of each chunk."""
    stored, _ = source.neighbours(chunk_ids)
    ids = np.asarray(stored, dtype=np.int64)[:, :k]
    if ids.shape[1] < k:
        ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
    return ids, np.asarray(source.neighbour_tokens(ids), dtype=np.int64)


def bucket_bpb(
    bits: np.ndarray, nbytes: np.ndarray, chunk_of: np.ndarray, mask: np.ndarray
) -> float:
    """bpb over the tokens whose chunk is in `mask` (NaN bits are unscored tokens)."""
    sel = mask[chunk_of] & ~np.isnan(bits)
    total = nbytes[sel].sum()
    return float(np.nansum(bits[sel]) / total) if total else float("nan")


# ---------------------------------------------------------------------------------------------
# stage function


def evaluate_run(
    run: str | Path,
    db: str | Path | ChunkSource,
    *,
    config: EvalConfig | None = None,
    baseline: str | Path | None = None,
    compare: tuple[str, ...] = (),
    knnlm: KnnLMConfig | None = None,
    scores: Scores | None = None,
    checkpoint: int | None = None,
    show_progress: bool = True,
) -> EvalReport:
    """Bits per byte of a run on a database's held-out documents, with leakage buckets.

    Args:
        run: a training run folder (its final model, or its latest checkpoint if unfinished).
        db: the database whose `split` is evaluated and whose neighbours are used; may differ
            from the training database if tokenizer and chunk size match.
        config: evaluation settings.
        baseline: a no-retrieval run to evaluate side by side, or a Hugging Face model folder
            (the untouched base of a RETRO-fitted run).
        compare: comparators scored with the baseline model on the same database and tokens:
            "ralm" (In-Context RALM), "knnlm" (kNN-LM); see `retrolm.comparators`.
        knnlm: kNN-LM settings (default `KnnLMConfig()`).
        scores: the baseline's and comparators' bits scored earlier on the same tokens
            (`score_baseline`): taken instead of scoring them again.
        checkpoint: score the model of this step's checkpoint instead of the final one.
        show_progress: progress bars on stderr.

    Returns:
        The report: RETRO[ON] and RETRO[OFF] for a retrieval model (plus the baseline), or the
        single figure of a no-retrieval model (as "baseline").

    Raises:
        InputError: missing run, empty split; MismatchError: database with another tokenizer or
            chunk size than the run, or `scores` of other tokens, settings or baseline.
    """
    from retrolm.hf.resolve import resolve_reference

    cfg = config or EvalConfig()
    baseline = resolve_reference(None if baseline is None else str(baseline))
    compare = check_comparators(compare)
    model, meta = load_run_model(run, checkpoint=checkpoint)
    source = open_database(db)
    check_database(meta["database"], source, str(run))
    models = _models_to_score(run, model, baseline, source)
    if compare and "baseline" not in models:
        raise InputError(
            f"--compare {' '.join(compare)} scores a no-retrieval model reading the database: "
            "give it with --baseline BASE_RUN"
        )
    if scores is not None and "baseline" not in models:
        raise InputError("scores of a baseline were given, but no baseline: give it too")
    mcfg = model.cfg
    window = cfg.window or int(meta.get("seq_len") or mcfg.max_seq_len)  # as trained
    settings, stride = _scoring(cfg, source.chunk_size, window, mcfg.pad_id, show_progress)
    k = neighbours_read(cfg.num_neighbours, mcfg)
    held = HeldOut.read(source, cfg, max(k, cfg.leakage_neighbours))
    path = Path(baseline) if baseline else None
    bits, seconds, comparators = _score_all(
        models, path, source, held, k, compare, knnlm, settings, stride, scores
    )
    names = {name: str(baseline if name == "baseline" and baseline else run) for name in models}
    report = _report(str(run), source, cfg, held, settings, stride, k, bits, seconds,
                     comparators, names)  # fmt: skip
    report.checkpoint = checkpoint
    return report


def score_baseline(
    baseline: str | Path,
    db: str | Path | ChunkSource,
    *,
    config: EvalConfig,
    compare: tuple[str, ...] = (),
    knnlm: KnnLMConfig | None = None,
    dtype: str = "float32",
    show_progress: bool = True,
) -> Scores:
    """The bits a baseline and the comparators reading it score on a database's held-out
    tokens, before any run exists: a quickstart scores them before it trains, so that the
    training's time is decided knowing what they took, and `evaluate_run(scores=...)` takes them.

    Args:
        baseline: a Hugging Face model folder, GGUF file or packaged name (run in `dtype`, as a
            RETRO-fit of it in `dtype` runs its base), or a no-retrieval run folder.
        config: evaluation settings; `window` is required (there is no run to take it from).

    Raises:
        ConfigError: no window; InputError: a baseline that reads neighbours, an empty split;
            MismatchError: a database in other tokens than the baseline's.
    """
    from retrolm.hf.resolve import resolve_reference

    if config.window is None:
        raise ConfigError("score_baseline needs EvalConfig.window: there is no run to take it from")
    path = Path(str(resolve_reference(str(baseline))))
    compare = check_comparators(compare)
    source = open_database(db)
    model = _baseline_model(path, source, dtype)
    settings, stride = _scoring(
        config, source.chunk_size, config.window, model.cfg.pad_id, show_progress
    )
    held = HeldOut.read(source, config, config.leakage_neighbours)
    models = {"baseline": model}
    bits, seconds, comparators = _score_all(
        models, path, source, held, 0, compare, knnlm, settings, stride, None
    )
    key = _scores_key(model, path, held, dict(settings, stride=stride), knnlm)
    return Scores(bits, seconds, comparators, key)


def _baseline_model(path: Path, source: ChunkSource, dtype: str) -> nn.Module:
    """The model `score_baseline` scores: an untouched Hugging Face base, or a run's model."""
    from retrolm.hf import hf_baseline, is_hf_model_folder, retrofit_config

    if is_hf_model_folder(path):
        like = retrofit_config(path, chunk_size=source.chunk_size, pad_id=int(source.pad_id),
                               dtype=dtype)  # fmt: skip
        return hf_baseline(path, source, like)
    model, meta = load_run_model(path)
    check_database(meta["database"], source, str(path))
    if model.cfg.cca_layers:
        raise InputError(
            f"{path} reads neighbours; a baseline is a model without retrieval (a Hugging Face "
            "folder or a run trained without retrieval)"
        )
    return model


def _scoring(
    cfg: EvalConfig, chunk_size: int, window: int, pad_id: int, show_progress: bool
) -> tuple[dict[str, Any], int]:
    """(what every scorer takes, the sliding windows' stride)."""
    settings = dict(
        chunk_size=chunk_size,
        window=window,
        pad_id=pad_id,
        batch_size=cfg.batch_size,
        device=resolve_device(cfg.device),
        bf16=cfg.bf16,
        show_progress=show_progress,
    )
    stride = cfg.stride or max(chunk_size, (window // 2) // chunk_size * chunk_size)
    return settings, stride


def _score_all(
    models: dict[str, nn.Module],
    baseline: Path | None,
    source: ChunkSource,
    held: HeldOut,
    k: int,
    compare: tuple[str, ...],
    knnlm: KnnLMConfig | None,
    settings: dict[str, Any],
    stride: int,
    scores: Scores | None,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, Any]]:
    """(bits, seconds, comparators' settings found) of the models and the comparators, taking
    from `scores` what it holds of them (the baseline is scored again where kNN-LM, not held,
    needs its hidden states)."""
    have: dict[str, np.ndarray] = {}
    comparators: dict[str, Any] = {}
    if scores is not None:
        key = _scores_key(models["baseline"], baseline, held, dict(settings, stride=stride), knnlm)
        wanted = {"baseline", *compare}
        if "knnlm" in compare and "knnlm" not in scores.bits:
            wanted.discard("baseline")
        have = {name: b for name, b in scores.take(key).items() if name in wanted}
        comparators = {n: scores.comparators[n] for n in have if n in scores.comparators}
    need_hidden = "knnlm" in compare and "knnlm" not in have
    bits, seconds, hidden = _score_models(models, held, k, need_hidden, settings, stride, have)
    if scores is not None:
        seconds.update({name: float(scores.seconds.get(name, 0.0)) for name in have})
    if "ralm" in compare and "ralm" not in have:
        start = time.perf_counter()
        bits["ralm"] = ralm_bits(models["baseline"], held.stream, held.nbr_tokens[:, 0], **settings)
        comparators["ralm"] = {"retrieved": "nearest neighbour + continuation of chunk c-1"}
        seconds["ralm"] = _took("ralm", start)
    if "knnlm" in compare and "knnlm" not in have:
        start = time.perf_counter()
        result = _knnlm(models["baseline"], source, held, bits["baseline"], hidden, knnlm,
                        dict(settings, stride=stride))  # fmt: skip
        bits["knnlm"], comparators["knnlm"] = result.bits, result.info
        seconds["knnlm"] = _took("knnlm", start)
    return bits, seconds, comparators


def _report(
    run: str,
    source: ChunkSource,
    cfg: EvalConfig,
    held: HeldOut,
    settings: dict[str, Any],
    stride: int,
    k: int,
    bits: dict[str, np.ndarray],
    seconds: dict[str, float],
    comparators: dict[str, Any],
    names: dict[str, str],
) -> EvalReport:
    """The report of scored bits: bits per byte overall and in each leakage bucket."""
    scored = ~np.isnan(next(iter(bits.values())))
    every = np.ones(len(held.chunk_ids), dtype=bool)
    report = EvalReport(
        run=run,
        database=str(getattr(source, "path", "")) or None,
        config=cfg.to_dict(),
        tokens=int(scored.sum()),
        bytes=int(held.nbytes[scored].sum()),
        chunks=len(held.chunk_ids),
        documents=len(np.unique(np.asarray(source.chunk_doc)[held.chunk_ids])),
        window=settings["window"],
        stride=stride,
        k=k,
        bpb={name: held.bpb(b, every) for name, b in bits.items()},
        comparators=comparators,
        runs=names,
        seconds=seconds,
    )
    leakage = held.nbr_tokens[:, : cfg.leakage_neighbours]
    r = leakage_ratio(held.chunk_tokens, leakage, source.chunk_size, settings["pad_id"])
    for alpha in cfg.alphas:
        mask = r <= alpha + 1e-9
        row: dict[str, Any] = {"alpha": alpha, "chunks": int(mask.sum())}
        row.update({name: held.bpb(b, mask) for name, b in bits.items()})
        report.filtered.append(row)
    return report


SCORES_VERSION = 1


@dataclass
class Scores:
    """Per-token bits of a baseline and of the comparators reading it on one held-out stream
    (`score_baseline`), kept so that an evaluation of the same stream later takes them instead
    of scoring them again. `key` is everything the bits depend on; `take` refuses another."""

    bits: dict[str, np.ndarray]  # name -> (T,) bits, NaN where not scored
    seconds: dict[str, float]  # name -> seconds scoring it took
    comparators: dict[str, Any]  # the comparators' settings found (kNN-LM's lambda, ...)
    key: dict[str, Any]

    def save(self, path: str | Path) -> None:
        """Write to `path` (.npz) atomically: a killed write leaves no file to be taken."""
        meta = {"version": SCORES_VERSION, "seconds": self.seconds,
                "comparators": self.comparators, "key": self.key}  # fmt: skip
        with atomic_open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)),
                     **{f"bits_{name}": b for name, b in self.bits.items()})  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Raises: CorruptArtifactError: not a scores file of this version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                bits = {n[5:]: np.asarray(z[n]) for n in z.files if n.startswith("bits_")}
            if meta.get("version") != SCORES_VERSION:
                raise ValueError(f"version {meta.get('version')}, expected {SCORES_VERSION}")
            return cls(bits, meta["seconds"], meta["comparators"], meta["key"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise CorruptArtifactError(
                f"{path} is not a readable scores file ({e}); delete it to score again"
            ) from e

    def take(self, key: dict[str, Any]) -> dict[str, np.ndarray]:
        """The bits, if they were scored as `key` says.

        Raises:
            MismatchError: naming the first setting that differs.
        """
        for name in sorted(set(self.key) | set(key)):
            if self.key.get(name) != key.get(name):
                raise MismatchError(
                    f"the stored scores were made with {name}={self.key.get(name)!r}, this "
                    f"evaluation has {key.get(name)!r}; delete them to score again"
                )
        return self.bits


def _scores_key(
    baseline: nn.Module,
    path: Path | None,
    held: HeldOut,
    settings: dict[str, Any],
    knnlm: KnnLMConfig | None,
) -> dict[str, Any]:
    """What a baseline's and its comparators' bits depend on: the tokens and neighbours scored,
    the windows, the baseline's weights and dtype, and the kNN-LM settings."""
    digest = hashlib.sha256(held.stream.tobytes())
    digest.update(np.ascontiguousarray(held.nbr_tokens[:, :1]).tobytes())  # RALM's text
    param = next(baseline.parameters())
    base_cfg = baseline.cfg
    key = {
        "tokens": digest.hexdigest(),
        "window": int(settings["window"]),
        "stride": int(settings["stride"]),
        "pad_id": int(settings["pad_id"]),
        "bf16": bool(settings["bf16"]),
        "baseline": getattr(base_cfg, "base_sha256", None) or str(path),
        "dtype": str(param.dtype),
        "knnlm": dataclasses.asdict(knnlm or KnnLMConfig()),
    }
    return json.loads(json.dumps(key))  # as `Scores.load` reads it back (tuples as lists)


@dataclass
class HeldOut:
    """The evaluated tokens: a split's chunks as one stream, their bytes and stored neighbours."""

    chunk_ids: np.ndarray  # (C,) database chunk ids, in order
    chunk_tokens: np.ndarray  # (C, m)
    stream: np.ndarray  # (C * m,) the chunks' tokens, concatenated
    nbytes: np.ndarray  # (C * m,) UTF-8 bytes of each token (token 0: 0, context only)
    nbr_tokens: np.ndarray  # (C, k, 2m) the stored neighbours, nearest first

    @classmethod
    def read(cls, source: ChunkSource, cfg: EvalConfig, k: int) -> HeldOut:
        chunk_ids = split_stream(source, cfg.split, cfg.max_tokens)
        chunk_tokens = np.asarray(source.chunk_tokens(chunk_ids), dtype=np.int64)
        stream = chunk_tokens.reshape(-1)
        nbytes = byte_lengths_of(source, stream, chunk_ids)
        nbytes[0] = 0  # token 0 is context only
        _, nbr_tokens = stream_neighbours(source, chunk_ids, k)
        return cls(chunk_ids, chunk_tokens, stream, nbytes, nbr_tokens)

    def bpb(self, bits: np.ndarray, chunks: np.ndarray) -> float:
        """Bits per byte of `bits` over the tokens of the chunks selected by `chunks` (C,)."""
        m = self.chunk_tokens.shape[1]
        return bucket_bpb(bits, self.nbytes, np.arange(len(self.stream)) // m, chunks)


def _models_to_score(
    run: str | Path, model: nn.Module, baseline: Path | None, source: ChunkSource
) -> dict[str, nn.Module]:
    """{"retro_on" / "retro_off" / "baseline": model}: the run's retrieval model is RETRO[ON]
    and RETRO[OFF]; a no-retrieval model, or `baseline` (a run or the untouched Hugging Face
    base of a RETRO-fitted run), the baseline."""
    from retrolm.hf import hf_baseline, is_hf_model_folder

    models: dict[str, nn.Module] = {}
    if model.cfg.cca_layers:
        models["retro_on"] = models["retro_off"] = model
    else:
        models["baseline"] = model
    if baseline is not None and is_hf_model_folder(baseline):  # the untouched base model
        models["baseline"] = hf_baseline(baseline, source, model.cfg)
        check_baseline(run, model, baseline, models["baseline"])
    elif baseline is not None:
        base_model, base_meta = load_run_model(baseline)
        check_baseline(run, model, baseline, base_model)
        check_database(base_meta["database"], source, str(baseline))
        models["baseline"] = base_model
    return models


def _score_models(
    models: dict[str, nn.Module],
    held: HeldOut,
    k: int,
    with_hidden: bool,
    settings: dict[str, Any],
    stride: int,
    have: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray | None]:
    """(bits of each model, seconds of each, the baseline's hidden states if `with_hidden`);
    the models in `have` (name -> bits scored earlier) are not scored again.

    RETRO[OFF] of a RETRO-fitted base is that base: scored once. RETRO[ON] of a RETRO-fitted
    base and the base share the layers below the first CCA layer: scored in one pass."""
    windows = dict(settings, stride=stride)
    bits: dict[str, np.ndarray] = dict(have or {})
    seconds: dict[str, float] = {}
    hidden = None
    reuse_off = "retro_off" in models and same_base(models["retro_off"], models.get("baseline"))
    together = (
        reuse_off
        and "baseline" in models
        and "baseline" not in bits
        and hasattr(models["retro_on"], "base_and_retro")
    )
    for name, mdl in models.items():
        if name in bits or name == "retro_off" and reuse_off or name == "baseline" and together:
            continue
        start = time.perf_counter()
        mdl.to(windows["device"])
        use = held.nbr_tokens[:, :k] if name == "retro_on" else None  # (C, k, r): the k nearest
        if name == "retro_on" and together:
            bits[name], bits["baseline"], hidden = score_base_and_retro(
                mdl, held.stream, use, hidden=with_hidden, **windows
            )
            seconds["baseline"] = 0.0  # counted in retro_on's seconds
        elif name == "baseline" and with_hidden:
            bits[name], hidden = score_stream(
                mdl, held.stream, None, desc=name, hidden=True, **windows
            )
        else:
            bits[name] = score_stream(mdl, held.stream, use, desc=name, **windows)
        seconds[name] = _took(name, start)
    if reuse_off:
        bits["retro_off"], seconds["retro_off"] = bits["baseline"], 0.0
    return bits, seconds, hidden


def _knnlm(
    baseline: nn.Module,
    source: ChunkSource,
    held: HeldOut,
    base_bits: np.ndarray,
    hidden: np.ndarray | None,
    cfg: KnnLMConfig | None,
    windows: dict[str, Any],
) -> Any:
    """kNN-LM over the baseline's hidden states of the database's train split."""
    m = held.chunk_tokens.shape[1]
    train_ids = np.asarray(source.split_chunk_ids("train"), dtype=np.int64)
    train_stream = np.asarray(source.chunk_tokens(train_ids), dtype=np.int64).reshape(-1)
    train_docs = np.repeat(np.asarray(source.chunk_doc)[train_ids], m)
    return knnlm_bits(
        train_stream,
        train_docs,
        base_bits,
        hidden,
        held.stream,
        score=lambda tokens: score_stream(
            baseline, tokens, None, desc="knnlm", hidden=True, **windows
        ),
        keys=lambda tokens: hidden_stream(baseline, tokens, desc="knnlm datastore", **windows),
        cfg=cfg,
    )


def _took(name: str, start: float) -> float:
    """Log and return the seconds since `start` that scoring `name` took."""
    seconds = round(time.perf_counter() - start, 4)  # tiny models score in milliseconds
    log.info("%s scored in %.1f s", EvalReport.HEADS[name], seconds)
    return seconds


def same_base(model: nn.Module, baseline: nn.Module | None) -> bool:
    """True when `model` without neighbours computes exactly `baseline`: a RETRO-fitted model
    and its own untouched base (same weights hash, same dtype)."""
    cfg, base_cfg = getattr(model, "cfg", None), getattr(baseline, "cfg", None)
    sha = getattr(cfg, "base_sha256", None)
    return (
        sha is not None
        and sha == getattr(base_cfg, "base_sha256", None)
        and getattr(cfg, "dtype", None) == getattr(base_cfg, "dtype", None)
    )


def check_baseline(run: Any, model: nn.Module, baseline: Any, base_model: nn.Module) -> None:
    """Refuse a comparison whose figures would be mislabelled.

    Raises:
        InputError: the baseline reads neighbours (it is a RETRO run), or the evaluated run is
            itself a no-retrieval run (its figure is the "baseline" one).
    """
    if base_model.cfg.cca_layers:
        raise InputError(
            f"--baseline {baseline} is a RETRO run (its model reads neighbours); a baseline is a "
            "run trained with --no-retrieval: give one, or evaluate this run on its own"
        )
    if not model.cfg.cca_layers:
        raise InputError(
            f"{run} is a no-retrieval run, so it is the baseline itself; evaluate the RETRO run "
            f"with --baseline {run}, or {run} on its own"
        )


def leakage_ratio(chunks: np.ndarray, neighbours: np.ndarray, m: int, pad_id: int) -> np.ndarray:
    """r(C) of each chunk: longest common token run with its neighbours (whatever their split:
    train or retrieval-only) / chunk size."""
    out = np.zeros(len(chunks))
    for s in range(0, len(chunks), 512):  # bounded memory: (512, K, m, r) booleans
        out[s : s + 512] = longest_common_run(chunks[s : s + 512], neighbours[s : s + 512], pad_id)
    return out / m


def byte_lengths_of(
    source: ChunkSource, stream: np.ndarray, chunk_ids: np.ndarray | None = None
) -> np.ndarray:
    """UTF-8 bytes of each token of the stream.

    Args:
        source: the database.
        stream: (C * m,) the tokens of the chunks `chunk_ids`, end to end.
        chunk_ids: (C,) the chunks of the stream. Where the database stores per-token byte
            counts (built with a foreign tokenizer: counted from the source text), those are
            used; otherwise bytes per token id (`token_byte_lengths`), exact for retrolm's
            byte-level tokenizer.
    """
    stored = getattr(source, "chunk_byte_lengths", None)
    counts = stored(chunk_ids) if stored is not None and chunk_ids is not None else None
    if counts is not None:
        return np.asarray(counts, dtype=np.int64).reshape(-1)
    tokenizer = getattr(source, "tokenizer", None)
    if tokenizer is None:
        raise InputError("this database has no tokenizer; bits per byte need one")
    if getattr(tokenizer, "kind", "retrolm") != "retrolm":
        log.warning(
            "the database stores no per-token byte counts (built before they were recorded): "
            "bytes per token id are used, which may be off for this tokenizer; rebuild the "
            "database for exact bits per byte"
        )
    table = token_byte_lengths(tokenizer)
    return table[stream]
