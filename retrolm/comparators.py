"""Two other ways a trained no-retrieval model can use the same database, scored like RETRO.

Both give, for the same stream of held-out tokens that `retrolm.evaluate` scores, the bits of
every token, so their bits per byte and leakage buckets stand beside RETRO[ON] / [OFF] /
baseline on the same bytes.

- **In-Context RALM** (Ram et al. 2023): the baseline reads the retrieved text prepended in
  its context window; no training. The tokens of chunk c are scored with the nearest stored
  neighbour of chunk c-1 (chunk + continuation, retrieved with the previous complete chunk:
  RETRO's causality, re-retrieving every chunk) in front of as much preceding text as still
  fits in the window. Chunk 0 has nothing retrieved and is scored from its plain context.
- **kNN-LM** (Khandelwal et al. 2020): a faiss datastore maps the baseline's final hidden state
  at every training position to the token that followed; at a scored position, the k nearest
  keys vote for their tokens, weighted by softmax(-distance / T), and the vote is interpolated
  with the model's distribution, p = (1 - lambda) p_LM + lambda p_kNN. lambda and T are tuned
  on training documents held out of the datastore (not on the scored text).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from retrolm.errors import ConfigError, InputError
from retrolm.log import progress

log = logging.getLogger(__name__)

# the comparators, as `--compare` names them -> their names in tables and reports
COMPARATORS = {"ralm": "In-Context RALM", "knnlm": "kNN-LM"}


def check_comparators(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The comparator names, validated (InputError naming the bad one)."""
    bad = [n for n in names if n not in COMPARATORS]
    if bad:
        raise InputError(
            f"--compare: unknown comparator(s) {', '.join(bad)}; choose from {', '.join(COMPARATORS)}"
        )
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# In-Context RALM


def ralm_rows(
    stream: np.ndarray, retrieved: np.ndarray, *, chunk_size: int, window: int, pad_id: int
) -> list[tuple[np.ndarray, int]]:
    """The model inputs that score each chunk of the stream, and the first target of each.

    Args:
        stream: (T,) tokens, T a multiple of the chunk size m.
        retrieved: (T // m, r) the tokens retrieved with each chunk (pad where none).
        window: the most tokens one input may hold.

    Returns:
        Per chunk c, (input, t0): the input's last outputs predict the stream's tokens
        t0 .. c*m+m-1 (t0 = 1 for chunk 0, else c*m). For c >= 1 the input is the retrieved
        text of chunk c-1 (padding dropped, at most window // 2 tokens) followed by as much of
        the stream before token c*m-1 as fits in `window`, then tokens c*m-1 .. c*m+m-2.
    """
    m = chunk_size
    rows = [(stream[: m - 1], 1)]
    for c in range(1, len(stream) // m):
        text = retrieved[c - 1]
        text = text[text != pad_id][: window // 2]
        context = min(c * m - 1, window - len(text) - m)  # tokens before c*m-1 still fitting
        rows.append((np.concatenate([text, stream[c * m - 1 - context : c * m + m - 1]]), c * m))
    return rows


@torch.no_grad()
def ralm_bits(
    model: nn.Module,
    stream: np.ndarray,
    retrieved: np.ndarray,
    *,
    chunk_size: int,
    window: int,
    pad_id: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    show_progress: bool = False,
) -> np.ndarray:
    """Bits of every token of `stream` under In-Context RALM (NaN for token 0 and pad targets).

    Rows of a batch are left-padded with `pad_id` to one length: the model masks padding keys
    and its positions are relative (rotary), so a padded row scores as it would alone.
    """
    m = chunk_size
    bits = np.full(len(stream), np.nan)
    rows = ralm_rows(stream, retrieved, chunk_size=m, window=window, pad_id=pad_id)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    model.eval()
    for batch in progress(batches, desc="ralm", unit="batch", show=show_progress):
        n = max(len(rows[i][0]) for i in batch)
        x = np.full((len(batch), n), pad_id, dtype=np.int64)
        for j, i in enumerate(batch):
            x[j, n - len(rows[i][0]) :] = rows[i][0]
        inputs = torch.from_numpy(x).to(device)
        ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
        with ctx:
            logits = model(inputs)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, i in enumerate(batch):
            t0 = rows[i][1]
            t1 = min(len(stream), (i + 1) * m)
            targets = torch.from_numpy(np.asarray(stream[t0:t1], dtype=np.int64))
            out = logp[j, n - (t1 - t0) :]  # the last outputs predict t0 .. t1-1
            nll = -out.gather(-1, targets[:, None])[:, 0].double().numpy() / math.log(2)
            nll[targets.numpy() == pad_id] = np.nan
            bits[t0:t1] = nll
    return bits


# ---------------------------------------------------------------------------------------------
# kNN-LM


@dataclass
class KnnLMConfig:
    """Settings of the kNN-LM comparator."""

    k: int = 64  # nearest keys per query
    lambdas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    # softmax temperatures, as multiples of the median distance to the nearest key
    temperatures: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    tune_fraction: float = 0.05  # share of the train documents held out of the datastore
    tune_tokens: int = 32768  # at most this many tuning tokens
    max_datastore: int = 4_000_000  # at most this many keys (the first training positions)
    exact_below: int = 200_000  # exact (flat) search for datastores up to this size, else IVF
    # IVF layout: cells_per_sqrt x sqrt(N) cells, trained on train_per_cell keys per cell,
    # nprobe cells visited per query. Cells of sqrt(N) keys keep the k-means (per_cell x N x
    # cells_per_sqrt^2 distances) cheap: 4 sqrt(N) cells with 64 keys each would cost 16x as
    # much to train (about 18 TFLOP at 2.7M keys, counted, not timed) and 4x as much to fill,
    # for the same share of the datastore visited per query.
    cells_per_sqrt: float = 1.0
    train_per_cell: int = 40  # faiss asks for at least 39
    nprobe: int = 8  # IVF cells visited per query: 8 / sqrt(N) of the datastore
    kmeans_iterations: int = 20
    seed: int = 0  # tuning documents and IVF training sample

    def __post_init__(self) -> None:
        self.lambdas = tuple(float(x) for x in self.lambdas)
        self.temperatures = tuple(float(x) for x in self.temperatures)
        rules = {
            "k": self.k >= 1,
            "lambdas": bool(self.lambdas) and all(0.0 <= x <= 1.0 for x in self.lambdas),
            "temperatures": bool(self.temperatures) and all(x > 0 for x in self.temperatures),
            "tune_fraction": 0.0 <= self.tune_fraction < 1.0,
            "tune_tokens": self.tune_tokens >= 1,
            "max_datastore": self.max_datastore >= 1,
            "exact_below": self.exact_below >= 0,
            "cells_per_sqrt": self.cells_per_sqrt > 0,
            "train_per_cell": self.train_per_cell >= 39,  # faiss's least
            "nprobe": self.nprobe >= 1,
            "kmeans_iterations": self.kmeans_iterations >= 1,
        }
        what = {
            "lambdas": "a non-empty list of weights in [0, 1]",
            "temperatures": "a non-empty list of positive numbers",
            "tune_fraction": "in [0, 1)",
            "train_per_cell": ">= 39",
            "exact_below": ">= 0",
            "cells_per_sqrt": "> 0",
        }
        for name, ok in rules.items():
            if not ok:
                raise ConfigError(
                    f"KnnLMConfig.{name} must be {what.get(name, '>= 1')}, got {getattr(self, name)!r}"
                )


@dataclass
class KnnLMResult:
    bits: np.ndarray  # (T,) bits of the scored stream under the tuned interpolation
    info: dict[str, Any] = field(default_factory=dict)  # lambda, temperature, sizes


def knn_log_probs(
    dists: np.ndarray, ids: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float
) -> np.ndarray:
    """log p_kNN(target) per query: softmax(-dist / T) mass of the neighbours whose next token is
    the target (-inf where none is).

    Args:
        dists: (Q, k) squared L2 distances of the neighbours (inf where missing).
        ids: (Q, k) datastore rows (-1 where missing).
        values: (N,) the next token of each datastore row.
        targets: (Q,) the tokens to score.
    """
    scores = np.where(ids >= 0, -dists / temperature, -np.inf)
    tokens = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)
    top = scores.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(scores - top)
    total = weights.sum(axis=1)
    hit = (weights * (tokens == targets[:, None])).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hit > 0, np.log(hit) - np.log(total), -np.inf)


def interpolate(lm_bits: np.ndarray, knn_logp: np.ndarray, lam: float) -> np.ndarray:
    """Bits of p = (1 - lambda) p_LM + lambda p_kNN, given the LM's bits and log p_kNN."""
    lm_log = -lm_bits * math.log(2)
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log1p(-lam) + lm_log, np.log(lam) + knn_logp)
    return -mixed / math.log(2)


def tuning_documents(doc_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The train documents held out of the datastore for tuning: a seeded hash sample."""
    docs = np.unique(doc_ids)
    keys = [hashlib.sha256(f"knnlm:{seed}:{int(d)}".encode()).digest()[:8] for d in docs]
    position = np.array([int.from_bytes(b, "big") / 2**64 for b in keys])
    chosen = docs[position < fraction]
    return chosen if len(chosen) else docs[np.argsort(position)[:1]]


def ivf_layout(n: int, cfg: KnnLMConfig) -> tuple[int, int]:
    """(cells, k-means training keys) of the IVF index over a datastore of n keys."""
    nlist = max(1, int(cfg.cells_per_sqrt * math.sqrt(n)))
    return nlist, min(n, cfg.train_per_cell * nlist)


def datastore_flops(n: int, queries: int, dim: int, cfg: KnnLMConfig) -> dict[str, float]:
    """Floating-point operations of building a datastore of n keys and searching it `queries`
    times (2 x dim per distance): {"build": k-means + assigning the keys, "search": ...}.

    The build runs as matrix products and the search as scans of the visited cells, so they
    run at different rates (`retrolm.quickstart.measure_faiss` measures both)."""
    if n <= cfg.exact_below:
        return {"build": 0.0, "search": 2.0 * dim * queries * n}
    nlist, n_train = ivf_layout(n, cfg)
    build = cfg.kmeans_iterations * n_train * nlist + n * nlist
    search = queries * (nlist + min(cfg.nprobe, nlist) * n / nlist)
    return {"build": 2.0 * dim * build, "search": 2.0 * dim * search}


class Datastore:
    """(hidden state -> next token) pairs in a faiss index."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, cfg: KnnLMConfig) -> None:
        import faiss

        self.values = np.asarray(values, dtype=np.int64)
        n, dim = keys.shape
        if n <= cfg.exact_below:
            self.index = faiss.IndexFlatL2(dim)
            self.kind = "Flat"
        else:
            nlist, n_train = ivf_layout(n, cfg)
            self.index = faiss.index_factory(dim, f"IVF{nlist},Flat")
            self.index.cp.niter = cfg.kmeans_iterations
            rng = np.random.default_rng(cfg.seed)
            sample = keys[np.sort(rng.choice(n, n_train, replace=False))]
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))
            self.index.nprobe = min(cfg.nprobe, nlist)
            self.kind = f"IVF{nlist},Flat nprobe {self.index.nprobe}"
        self.index.add(np.ascontiguousarray(keys, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dists, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.where(ids >= 0, dists, np.inf), ids


def positions(bits: np.ndarray) -> np.ndarray:
    """Indices of the scored tokens (bits not NaN)."""
    return np.flatnonzero(~np.isnan(bits))


def knnlm_bits(
    train_stream: np.ndarray,
    train_docs: np.ndarray,
    scored_bits: np.ndarray,
    scored_hidden: np.ndarray,
    scored_stream: np.ndarray,
    *,
    score: Any,
    keys: Any = None,
    cfg: KnnLMConfig | None = None,
) -> KnnLMResult:
    """kNN-LM bits of a scored stream, with lambda and T tuned on held-out train documents.

    Args:
        train_stream: (N,) the training tokens (whole documents, laid end to end).
        train_docs: (N,) the document of each training token.
        scored_bits / scored_hidden: the model's bits and hidden states on the scored stream
            (from `score(tokens) -> (bits, hidden)`, the same windows as every other figure).
        scored_stream: (T,) the scored tokens.
        score: `score(tokens) -> (bits (n,), hidden (n, d))`: the no-retrieval model's bits and
            final hidden states (keys and queries), with the evaluation's windows.
        keys: `keys(tokens) -> (scored (n,) bool, hidden (n, d))`, the same hidden states
            without the bits (`evaluate.hidden_stream`), for the datastore; default: `score`'s.
    """
    cfg = cfg or KnnLMConfig()
    tune_docs = tuning_documents(train_docs, cfg.tune_fraction, cfg.seed)
    is_tune = np.isin(train_docs, tune_docs)
    store_tokens = train_stream[~is_tune][: cfg.max_datastore + 1]
    tune_tokens = train_stream[is_tune][: cfg.tune_tokens]
    if keys is None:
        store_bits, store_hidden = score(store_tokens)
        store_scored = ~np.isnan(store_bits)
    else:
        store_scored, store_hidden = keys(store_tokens)
    rows = np.flatnonzero(store_scored)  # the position that predicted token j holds j's key
    datastore = Datastore(store_hidden[rows], store_tokens[rows], cfg)
    log.info("kNN-LM datastore: %d keys (%s)", len(rows), datastore.kind)
    del store_hidden

    tune_bits, tune_hidden = score(tune_tokens)
    t_rows = positions(tune_bits)
    t_dists, t_ids = datastore.search(tune_hidden[t_rows], cfg.k)
    scale = float(np.median(t_dists[:, 0][np.isfinite(t_dists[:, 0])])) or 1.0
    best = (math.inf, 0.0, 1.0)
    for mult in cfg.temperatures:
        logp = knn_log_probs(t_dists, t_ids, datastore.values, tune_tokens[t_rows], scale * mult)
        for lam in cfg.lambdas:
            total = float(interpolate(tune_bits[t_rows], logp, lam).sum())
            if total < best[0]:
                best = (total, lam, scale * mult)
    _, lam, temperature = best
    log.info(
        "kNN-LM tuned on %d tokens: lambda %.2f, temperature %.3g", len(t_rows), lam, temperature
    )

    s_rows = positions(scored_bits)
    dists, ids = datastore.search(scored_hidden[s_rows], cfg.k)
    logp = knn_log_probs(dists, ids, datastore.values, scored_stream[s_rows], temperature)
    bits = np.full(len(scored_bits), np.nan)
    bits[s_rows] = interpolate(scored_bits[s_rows], logp, lam)
    return KnnLMResult(
        bits=bits,
        info={
            "lambda": lam,
            "temperature": temperature,
            "k": cfg.k,
            "datastore": int(len(rows)),
            "index": datastore.kind,
            "tuning_tokens": int(len(t_rows)),
            "tuning_documents": int(len(tune_docs)),
        },
    )
