"""`retrolm quickstart`: the whole pipeline on a built-in corpus, sized to a time budget.

Builds a database (tokenizer, chunks, a BM25 index or MiniLM embeddings and a faiss index,
neighbours), trains a small baseline and RETRO-fits it (its decoder frozen) into RETRO,
evaluates both on held-out documents (RETRO[ON], RETRO[OFF], baseline, leakage-filtered
buckets), generates a continuation of a held-out file with its retrieved chunks, and writes
`report.md`, `report.json` and `loss.png`.

There is no special code path: each step calls the same stage function as its CLI command. The
time budget is met by sizing the corpus subset and the step count up front, from a short
measurement of this machine's embedding and training speed; the sizes are written to
`plan.json`, so a rerun with the same `--out` reuses the plan and resumes every finished stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import statistics
import sysconfig
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrolm.comparators import COMPARATORS
from retrolm.config import CHUNK_SIZE, RetroConfig, preset_fields
from retrolm.errors import ConfigError, InputError, MismatchError
from retrolm.io import atomic_open, read_json, write_json

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
# the version of how `make_plan` sizes a quickstart; `load_or_make_plan` refuses a stored
# plan.json of another version (MismatchError), so a resumed quickstart never mixes two plans
PLAN_VERSION = 6
# the report's sample: greedy decoding of a model this small repeats one line over and over
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.7, 40
BYTES_PER_TOKEN = 3.6  # of Python source under an 8k byte-level BPE, padding included (measured)
PASSES = 1.5  # at most this many passes over the training subset
# Measured choices (benchmarks/retrieval_gain.py; docs/results.md, the sections on which
# retrieval pays and on the quickstart's planner):
TRAIN_SHARE = 0.6  # of the budget for training both runs, with BM25 (the rest: database,
# evaluation with the comparators, generation, report, and a margin)
RETRIEVAL_ONLY_MAX_BYTES = 64 * 2**20  # the corpus beyond the subset, indexed for retrieval
DB_SHARE = 0.15  # of the budget for the BM25 database, which caps the retrieval-only part
# the whole stage against the small measurement: index build, re-searches past a chunk's own
# document (measured: 217 s for 21.6k x 121.5k chunks, against 53 ns a pair measured up front)
BM25_OVERHEAD = 1.6
STEP_SAMPLES = 3  # timed training steps per measurement (one step's time varies by 10-30%)
MARGIN = 0.1  # of the budget for generation, the report, model saves and start-up
# the evaluation, in forward passes of batch x seq_len tokens (measured: `measure_forward`):
KEYS_COST = 0.4  # a kNN-LM datastore batch (hidden states only) against a baseline forward
# RETRO is the trained baseline, frozen, with encoder + CCA trained RETROFIT_RATIO of its
# steps (RETRO[OFF] equals the baseline by construction)
# a retrofit's gain is made in its first steps: on an 800-step baseline, 150 and 400 retrofit
# steps give -9.8% and -10.2% (stdlib, copy head); the rest goes to the baseline's steps
RETROFIT_RATIO = 0.25
# neighbours read at evaluation (training reads `num_neighbours`=2): the copy head copies from
# every one it reads; a k=2-trained retrofit gives -6.2%, -7.1%, -7.9%, -8.1% at k=2, 4, 8, 10
EVAL_K = 8


TRAIN_FILE_RULES = ("uniform", "folders")  # QuickstartConfig.train_files


@dataclass
class QuickstartConfig:
    """Settings of `retrolm quickstart`; the sizes derived from them are in `QuickstartPlan`."""

    corpus: list[str] = field(default_factory=list)  # paths; empty: the Python standard library
    out: str = "retrolm-quickstart"  # folder of the database, the runs and the report
    minutes: float = 15.0  # wall-time budget of the whole pipeline on this machine
    seed: int = 0  # corpus subset, initialisation, sample order
    # "bm25": retrieve with BM25 from the training subset plus the rest of the corpus (as
    # retrieval-only documents); "dense": all-MiniLM-L6-v2 + faiss over the subset alone
    retriever: str = "bm25"
    show_progress: bool = True  # progress bars on stderr
    # a pretrained base to RETRO-fit (a Hugging Face folder, a .gguf file or `smollm2`):
    # `retrolm.quickstart_base` runs instead of training a small model from scratch
    base: str | None = None
    # with `base`: how the training files and the retrieval-only documents are drawn from the
    # files not held out: "uniform", file by file as the held-out files are; "folders", whole
    # folders, the most redundant first (as the from-scratch quickstart always draws them)
    train_files: str = "uniform"

    def __post_init__(self) -> None:
        if not 3 <= self.minutes <= 24 * 60:
            raise ConfigError(f"minutes must lie between 3 and 1440, got {self.minutes}")
        if self.retriever not in ("bm25", "dense"):
            raise ConfigError(f"retriever must be bm25 or dense, got {self.retriever!r}")
        if self.base is not None and self.retriever != "bm25":
            raise ConfigError(
                f"--retriever {self.retriever}: a quickstart with --base retrieves with BM25 over "
                "the base's own tokens; leave --retriever out"
            )
        if self.train_files not in TRAIN_FILE_RULES:
            raise ConfigError(
                f"train_files must be one of {', '.join(TRAIN_FILE_RULES)}, got {self.train_files!r}"
            )
        if self.base is None and self.train_files != "uniform":
            raise ConfigError(
                "--train-files chooses how a RETRO-fit of --base draws its training files; the "
                "quickstart without --base always takes whole folders: give --base, or leave "
                "--train-files out"
            )
        self.corpus = [str(p) for p in self.corpus]


@dataclass
class QuickstartPlan:
    """Sizes chosen up front for the time budget; stored in `plan.json` and reused on rerun."""

    version: int
    settings: dict[str, Any]  # the QuickstartConfig fields that decide the plan
    files: list[str]  # corpus files used
    valid_files: list[str]  # of which held out (the `valid` split)
    corpus_bytes: int
    retrieval_only: list[str]  # more corpus files, indexed for retrieval only (never trained on)
    retrieval_only_bytes: int
    database: dict[str, Any]  # DatabaseConfig fields
    model: dict[str, Any]  # RetroConfig overrides shared by RETRO and the baseline
    train: dict[str, Any]  # TrainConfig fields shared by both runs
    eval: dict[str, Any]  # EvalConfig fields
    compare: list[str]  # comparators scored beside RETRO (evaluate_run's `compare`)
    retrofit_steps: int  # RETRO is the trained baseline RETRO-fitted for this many steps
    max_new_tokens: int
    measured: dict[str, float]  # the calibration figures the sizes were derived from
    estimate_seconds: dict[str, float]  # expected wall time per stage

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# corpus


def stdlib_files() -> list[Path]:
    """The Python sources of the running interpreter's standard library (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(p for p in files if p.is_file() and p.stat().st_size > 0)


def corpus_files(paths: list[str], glob: str = "**/*") -> list[Path]:
    """Files of the given corpus paths (folders are expanded with `glob`), sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [f for f in p.glob(glob) if f.is_file()]
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"--corpus {p}: no such file or folder")
    if not files:
        raise InputError(f"--corpus {' '.join(paths)}: no files found")
    return sorted(set(files))


SHINGLE = 8  # word n-gram length of the redundancy measure
REDUNDANCY_READ_BYTES = 128 * 2**20  # read at most about this much to rank the folders
_WORD = re.compile(r"\w+|[^\w\s]")


def folder_redundancy(files: list[Path], max_bytes: int | None = None) -> dict[Path, float]:
    """Per folder: the share of its files' word 8-grams that also occur in another of its files.

    The first `max_bytes` of each file are read (default: 64 kB, less for a corpus of more than
    2,048 files so that about 128 MB in all are read, but at least 2 kB). A held-out file of a
    redundant folder has text in common with the rest of the folder, which retrieval can use.
    """
    if max_bytes is None:
        max_bytes = min(65536, max(2048, REDUNDANCY_READ_BYTES // max(1, len(files))))
    folders: dict[Path, list[Path]] = {}
    for p in files:
        folders.setdefault(p.parent, []).append(p)
    result = {}
    for folder, members in folders.items():
        shingles = []
        for p in members:
            words = _WORD.findall(_read_text(p)[:max_bytes])
            shingles.append(
                {hash(tuple(words[i : i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}
            )
        counts = Counter(x for s in shingles for x in s)
        total = sum(len(s) for s in shingles)
        shared = sum(1 for s in shingles for x in s if counts[x] > 1)
        result[folder] = shared / total if total else 0.0
    return result


def select_files(
    files: list[Path], byte_budget: int, seed: int, *, by_folder: bool = True, salt: str = ""
) -> list[Path]:
    """A deterministic subset of `files` of about `byte_budget` bytes, kept in whole folders.

    Folders are taken whole, most redundant first (`folder_redundancy`, ties broken by a seeded
    hash of the path), until the budget is reached (the last one partly). A held-out file then
    has relatives in the database, as in a real corpus with near-duplicates, which is where
    retrieval helps; a thin sample of everything leaves little to retrieve (10% of held-out
    tokens copyable from the stored neighbours, against 66% in this order: docs/results.md,
    the section on a redundant corpus).

    With `by_folder=False` the subset is a uniform sample instead: files in the order of the
    seeded hash of their paths (`salt` tells two samples of one seed apart), each taken while it
    fits.
    """

    root = Path(os.path.commonpath(files)) if files else Path()

    def key(p: Path) -> str:  # relative, so the subset does not depend on where the corpus is
        return hashlib.sha256(f"{salt}{seed}:{p.relative_to(root)}".encode()).hexdigest()

    groups: dict[Path, list[Path]] = {}
    for p in files:
        groups.setdefault(p.parent if by_folder else p, []).append(p)
    redundancy = (
        folder_redundancy(files)
        if by_folder and sum(p.stat().st_size for p in files) > byte_budget
        else {}
    )
    chosen, total = [], 0
    for group in sorted(groups, key=lambda g: (-round(redundancy.get(g, 0.0), 6), key(g))):
        for p in sorted(groups[group], key=key):
            size = p.stat().st_size
            if total + size > byte_budget and chosen:
                continue  # a file that does not fit; smaller ones may
            chosen.append(p)
            total += size
        if total >= 0.98 * byte_budget:
            break
    return sorted(chosen)


def choose_valid(files: list[Path], fraction: float, seed: int, min_files: int = 3) -> list[Path]:
    """Held-out files: a seeded-hash sample of `fraction` of the files (at least `min_files`).

    Files too short to hold a few chunks (< 1 kB) are not held out: they would add prompts of a
    single chunk and next to nothing to evaluate.
    """
    candidates = [p for p in files if p.stat().st_size >= 1024] or list(files)
    count = min(len(files) - 1, max(min_files, round(fraction * len(files))))
    if count < 1:
        raise InputError(
            f"the corpus has {len(files)} file(s); at least 2 are needed (train and held out)"
        )

    root = Path(os.path.commonpath(files))

    def key(p: Path) -> str:
        return hashlib.sha256(f"valid:{seed}:{p.relative_to(root)}".encode()).hexdigest()

    return sorted(sorted(candidates, key=key)[:count])


# ---------------------------------------------------------------------------------------------
# calibration and planning


def sample_chunks(files: list[Path]) -> list[str]:
    """Chunk-sized texts from up to 64 of `files`, spread over the list: what the plan times
    the retriever on."""
    sample_text = "".join(_read_text(p)[:65536] for p in files[:: max(1, len(files) // 64)][:64])
    chunk_chars = int(CHUNK_SIZE * BYTES_PER_TOKEN)
    texts = [sample_text[i : i + chunk_chars] for i in range(0, len(sample_text), chunk_chars)]
    return [t for t in texts if t.strip()] or ["def f(x):\n    return x\n" * 8]


def measure_embedding(embedder: Any, texts: list[str]) -> float:
    """Chunks per second of `embedder` on `texts` (after a warm-up batch)."""
    embedder.embed(texts[:8])
    start = time.perf_counter()
    embedder.embed(texts)
    return len(texts) / (time.perf_counter() - start)


def measure_bm25(texts: list[str], queries: int = 256) -> float:
    """Seconds per (query chunk x indexed chunk) of a BM25 neighbour search, on `texts`.

    The neighbour stage queries every train and held-out chunk against every indexed one, so
    its time grows with their product; the retrieval-only part of the database is capped by it.
    """
    import numpy as np

    from retrolm.database.bm25 import BM25Index

    index = BM25Index.build(texts, np.arange(len(texts)))
    start = time.perf_counter()
    index.search(texts[:queries], 12)
    return (time.perf_counter() - start) / (min(queries, len(texts)) * len(texts))


def measure_train_step(
    model_cfg: Any, batch: int, seq_len: int, k: int, bf16: bool, retrofit: bool = False
) -> float:
    """Seconds of one training step (forward, backward, AdamW) of a model, on random data of
    the shape training feeds it: the median of STEP_SAMPLES steps after a first one.

    With `retrofit`, only the encoder and CCA are trained (the decoder frozen)."""
    import torch

    from retrolm.model import RETRO

    g = torch.Generator().manual_seed(0)
    model = RETRO(model_cfg)
    if retrofit:
        model.requires_grad_(False)
        for _, p in model.retrieval_parameters():
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # a training sample is seq_len inputs and their seq_len targets: seq_len + 1 tokens (with one
    # token fewer the last chunk is incomplete, and a RETRO step times ~25% cheaper than training's)
    tokens = torch.randint(1, model_cfg.vocab_size, (batch, seq_len + 1), generator=g)
    chunks = seq_len // model_cfg.chunk_size
    shape = (batch, chunks, k, model_cfg.neighbour_len)
    neighbours = torch.randint(1, model_cfg.vocab_size, shape, generator=g)
    neighbours = neighbours if model_cfg.cca_layers else None

    def step() -> None:  # the loss training computes (fused with the output layer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:], neighbours)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(STEP_SAMPLES):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)  # training pays the typical step, not the fastest


def measure_forward(model_cfg: Any, batch: int, seq_len: int, k: int, bf16: bool) -> float:
    """Seconds of one evaluation forward pass (logits of batch x seq_len tokens, no gradient),
    with k neighbours per chunk when the model has retrieval."""
    import torch

    from retrolm.model import RETRO

    g = torch.Generator().manual_seed(0)
    model = RETRO(model_cfg).eval()
    tokens = torch.randint(1, model_cfg.vocab_size, (batch, seq_len), generator=g)
    shape = (batch, seq_len // model_cfg.chunk_size, k, model_cfg.neighbour_len)
    neighbours = torch.randint(1, model_cfg.vocab_size, shape, generator=g)
    neighbours = neighbours if model_cfg.cca_layers else None
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for _ in range(3):
            start = time.perf_counter()
            torch.log_softmax(model(tokens, neighbours).float(), dim=-1)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def measure_faiss(dim: int, seed: int = 0) -> tuple[float, float]:
    """Seconds per floating-point operation of building a kNN-LM datastore (k-means and
    assignment: matrix products) and of searching it (scans of the visited cells, k=64): a
    small IVF `Datastore` of random keys (`comparators.datastore_flops` counts the operations)."""
    import numpy as np

    from retrolm.comparators import Datastore, KnnLMConfig, datastore_flops

    rng = np.random.default_rng(seed)
    n, queries = 20000, 2048
    cfg = KnnLMConfig(exact_below=0, seed=seed)
    keys = rng.standard_normal((n, dim), dtype=np.float32)
    start = time.perf_counter()
    store = Datastore(keys, np.zeros(n, dtype=np.int64), cfg)
    build = time.perf_counter() - start
    start = time.perf_counter()
    store.search(keys[:queries] + 0.01, cfg.k)
    search = time.perf_counter() - start
    flops = datastore_flops(n, queries, dim, cfg)
    return build / flops["build"], search / flops["search"]


def estimate_evaluation(
    train_tokens: float, eval_tokens: float, t_retro: float, t_base: float, batch: int,
    seq_len: int, chunk_size: int, dim: int, faiss_rates: tuple[float, float],
) -> float:  # fmt: skip
    """Seconds `evaluate_run` takes with the comparators, from forward times (`measure_forward`)
    and faiss's rates (`measure_faiss`).

    RETRO[ON] and RETRO[OFF] and the baseline score the held-out tokens in windows of seq_len
    moving by seq_len / 2; In-Context RALM runs one baseline row per held-out chunk; kNN-LM's
    datastore reads the training tokens (hidden states only) into an IVF index, tunes on up
    to 32k of them and searches once per tuning and scored token.
    """
    from retrolm.comparators import KnnLMConfig, datastore_flops

    knn = KnnLMConfig()
    per_window = batch * seq_len / 2  # new tokens scored per forward pass of `batch` windows
    tune = min(knn.tune_fraction * train_tokens, knn.tune_tokens)
    store = min(train_tokens - tune, knn.max_datastore)
    flops = datastore_flops(int(store), int(tune + eval_tokens), dim, knn)
    return (
        eval_tokens / per_window * (t_retro + 2 * t_base)  # RETRO[ON], [OFF], baseline
        + eval_tokens / chunk_size / batch * t_base  # RALM
        + store / per_window * t_base * KEYS_COST  # the datastore's keys
        + tune / per_window * t_base  # the tuning text, with bits
        + flops["build"] * faiss_rates[0]
        + flops["search"] * faiss_rates[1]
    )


@dataclass(frozen=True)
class PlanModel:
    """The model a quickstart trains (RETRO and its baseline) and the shape of its batches."""

    fields: dict[str, Any]  # the preset's: the runs' TrainConfig.model (and the plan's record)
    retro: RetroConfig
    baseline: RetroConfig  # RETRO without its CCA layers
    vocab: int
    batch: int
    seq_len: int
    k: int  # neighbours per chunk in training

    @property
    def step_tokens(self) -> int:
        """Tokens of one training batch."""
        return self.batch * self.seq_len


@dataclass(frozen=True)
class Measurements:
    """This machine's speed, measured before anything is sized: the plan is derived from it."""

    embed_rate: float | None  # chunks per second of the dense embedder (None with BM25)
    bm25_cost: float | None  # seconds per query x indexed chunk of BM25 (None with dense)
    t_fp32: float  # a RETRO training step in float32
    t_bf16: float  # a RETRO training step in bfloat16
    bf16: bool  # whether training runs in bfloat16
    t_base: float  # a baseline training step, in training's precision
    t_retro: float  # a retrofit step times RETROFIT_RATIO: RETRO's training per baseline step
    f_retro: float  # an evaluation forward pass of RETRO (float32, EVAL_K neighbours)
    f_base: float  # an evaluation forward pass of the baseline (float32)
    faiss_rates: tuple[float, float]  # seconds per operation of a datastore build, of a search

    @property
    def step_seconds(self) -> float:
        """Training seconds per baseline step: the step and its share of the retrofit."""
        return self.t_retro + self.t_base

    def record(self) -> dict[str, float | None]:
        """The figures stored in the plan (`QuickstartPlan.measured`)."""
        return dict(
            embed_chunks_per_s=None if self.embed_rate is None else round(self.embed_rate, 2),
            bm25_ns_per_pair=None if self.bm25_cost is None else round(self.bm25_cost * 1e9, 3),
            retro_step_s_fp32=round(self.t_fp32, 4),
            retro_step_s_bf16=round(self.t_bf16, 4),
            baseline_step_s=round(self.t_base, 4),
            retro_forward_s=round(self.f_retro, 4),
            baseline_forward_s=round(self.f_base, 4),
            faiss_build_gflops=round(1e-9 / self.faiss_rates[0], 2),
            faiss_search_gflops=round(1e-9 / self.faiss_rates[1], 2),
        )


def plan_files(cfg: QuickstartConfig) -> list[Path]:
    """The files of `cfg.corpus`, or of the standard library when it is empty.

    Raises:
        InputError: a corpus path that does not exist, or no files.
    """
    files = corpus_files(cfg.corpus) if cfg.corpus else stdlib_files()
    if not files:
        raise InputError("the standard library of this Python has no .py files; pass --corpus")
    return files


def quickstart_model() -> PlanModel:
    """The `quickstart` preset with an 8k vocabulary, trained on batches of 8 x 256 tokens with
    2 neighbours per chunk."""
    vocab = 8192
    return PlanModel(
        fields=preset_fields("quickstart"),
        retro=RetroConfig.preset("quickstart", vocab_size=vocab),
        baseline=RetroConfig.preset("quickstart", vocab_size=vocab, cca_layers=()),
        vocab=vocab,
        batch=8,
        seq_len=256,
        k=2,
    )


def measure_retriever(
    retriever: str, embedder: Any, files: list[Path]
) -> tuple[float | None, float | None]:
    """The retriever's speed on chunks of `files`: (chunks per second of `embedder`, None) for
    "dense", (None, seconds per query x indexed chunk of a BM25 search) for "bm25"."""
    texts = sample_chunks(files)
    if retriever == "dense":
        return measure_embedding(embedder, texts[:96]), None
    return None, measure_bm25(texts[:4096])


def measure_machine(
    retriever: str, embedder: Any, files: list[Path], model: PlanModel
) -> Measurements:
    """Time the retriever, a training step of each run, an evaluation forward pass of each
    model and a kNN-LM datastore, in this order, on this machine."""
    embed_rate, bm25_cost = measure_retriever(retriever, embedder, files)
    retro, base = model.retro, model.baseline
    batch, seq_len, k = model.batch, model.seq_len, model.k
    t_fp32 = measure_train_step(retro, batch, seq_len, k, bf16=False)
    t_bf16 = measure_train_step(retro, batch, seq_len, k, bf16=True)
    bf16 = t_bf16 < 0.8 * t_fp32  # only where the CPU (or GPU) has fast bfloat16 matmuls
    t_base = measure_train_step(base, batch, seq_len, k, bf16=bf16)
    # RETRO is RETRO-fitted onto the trained baseline, for RETROFIT_RATIO of its steps
    t_retro = RETROFIT_RATIO * measure_train_step(
        retro, batch, seq_len, k, bf16=bf16, retrofit=True
    )
    # the evaluation runs in float32 (plan.eval has no bf16), whatever training runs in
    f_retro = measure_forward(retro, batch, seq_len, EVAL_K, bf16=False)
    f_base = measure_forward(base, batch, seq_len, k, bf16=False)
    faiss_rates = measure_faiss(retro.dec_dim)
    return Measurements(
        embed_rate=embed_rate,
        bm25_cost=bm25_cost,
        t_fp32=t_fp32,
        t_bf16=t_bf16,
        bf16=bf16,
        t_base=t_base,
        t_retro=t_retro,
        f_retro=f_retro,
        f_base=f_base,
        faiss_rates=faiss_rates,
    )


def evaluation_seconds(
    speed: Measurements, model: PlanModel, corpus: float, held_out: float | None = None
) -> float:
    """Seconds of the evaluation, for a training subset of `corpus` bytes and `held_out` scored
    tokens (default: 5% of the subset's tokens, at most 131072)."""
    tokens = corpus / BYTES_PER_TOKEN
    held_out = min(131072.0, 0.05 * tokens) if held_out is None else held_out
    return estimate_evaluation(
        tokens,
        held_out,
        speed.f_retro,
        speed.f_base,
        model.batch,
        model.seq_len,
        CHUNK_SIZE,
        model.retro.dec_dim,
        speed.faiss_rates,
    )


def size_corpus(budget: float, speed: Measurements, model: PlanModel) -> tuple[int, float]:
    """The training subset's size in bytes, and the share of the `budget` (seconds) for training
    both runs."""
    if speed.embed_rate is not None:
        # Dense: embedding 25% of the budget sizes the corpus, training both runs 45%.
        corpus_bytes = int(0.25 * budget * speed.embed_rate * CHUNK_SIZE * BYTES_PER_TOKEN)
        return corpus_bytes, 0.45
    # BM25 costs seconds: training takes at most TRAIN_SHARE, and gives the evaluation
    # (which grows with the corpus, so with the steps) what it needs out of the budget
    # that the database (DB_SHARE) and the margin leave; the corpus is sized to the steps.
    left = (1.0 - DB_SHARE - MARGIN) * budget
    steps = int(TRAIN_SHARE * budget / speed.step_seconds)
    for _ in range(4):  # the evaluation is about linear in the steps: a few rounds converge
        corpus = steps * model.step_tokens * BYTES_PER_TOKEN / PASSES
        need = steps * speed.step_seconds + evaluation_seconds(speed, model, corpus)
        steps = int(steps * min(1.0, left / need))
    train_share = steps * speed.step_seconds / budget
    corpus_bytes = int(steps * model.step_tokens * BYTES_PER_TOKEN / PASSES)
    return corpus_bytes, train_share


def training_steps(
    chosen_bytes: int, train_share: float, budget: float, speed: Measurements, model: PlanModel
) -> int:
    """Baseline training steps on a subset of `chosen_bytes`: what `train_share` of the
    `budget` (seconds) pays for, at least 20."""
    # At most PASSES passes over the corpus: more would measure memorisation.
    max_steps_data = int(PASSES * chosen_bytes / BYTES_PER_TOKEN / model.step_tokens)
    return max(20, min(max_steps_data, int(train_share * budget / speed.step_seconds)))


def evaluation_tokens(valid: list[Path]) -> int:
    """Held-out tokens the evaluation scores, of the held-out files `valid`."""
    valid_bytes = sum(p.stat().st_size for p in valid)
    # every held-out file, up to ~130k tokens (about 1 min for the three models on 2 cores):
    # the first 32k tokens alone would be a few files of one or two folders
    return max(4096, min(131072, int(valid_bytes / BYTES_PER_TOKEN)))


def retrieval_only_within_budget(
    files: list[Path], chosen: list[Path], chosen_bytes: int, budget: float, bm25_cost: float | None
) -> list[Path]:
    """Files of the corpus beyond the subset `chosen` (of `chosen_bytes`), indexed for retrieval
    only: as many as BM25's neighbour stage searches in DB_SHARE of the `budget` (seconds), at
    most RETRIEVAL_ONLY_MAX_BYTES; none with dense retrieval (`bm25_cost` None)."""
    if bm25_cost is None:
        return []
    # the neighbour stage: (train + held-out chunks) x indexed chunks, within DB_SHARE
    query_chunks = chosen_bytes / (CHUNK_SIZE * BYTES_PER_TOKEN)
    pair_seconds = BM25_OVERHEAD * bm25_cost
    indexed_max = DB_SHARE * budget / (pair_seconds * max(query_chunks, 1.0))
    extra_bytes = int(max(0.0, indexed_max - query_chunks) * CHUNK_SIZE * BYTES_PER_TOKEN)
    return retrieval_only_files(files, chosen, min(extra_bytes, RETRIEVAL_ONLY_MAX_BYTES))


def train_settings(model: PlanModel, steps: int, bf16: bool, seed: int) -> dict[str, Any]:
    """TrainConfig fields shared by both runs (`QuickstartPlan.train`)."""
    return dict(
        max_steps=steps,
        batch_size=model.batch,
        seq_len=model.seq_len,
        num_neighbours=model.k,
        lr=3e-3,
        warmup_steps=max(5, min(30, steps // 10)),
        bf16=bf16,
        eval_every=max(10, steps // 8),
        eval_batches=4,
        checkpoint_every=max(10, steps // 4),
        seed=seed,
    )


def estimate_stages(
    speed: Measurements, model: PlanModel, steps: int, chosen_bytes: int, eval_tokens: int
) -> dict[str, float]:
    """Expected wall seconds of training each run, of the evaluation and (dense) of embedding
    the subset (`QuickstartPlan.estimate_seconds`)."""
    estimate = dict(
        train_retro=round(steps * speed.t_retro, 1),
        train_baseline=round(steps * speed.t_base, 1),
        evaluate=round(evaluation_seconds(speed, model, chosen_bytes, eval_tokens), 1),
    )
    if speed.embed_rate is not None:
        chunks = chosen_bytes / (CHUNK_SIZE * BYTES_PER_TOKEN)
        estimate["embed"] = round(chunks / speed.embed_rate, 1)
    return estimate


def make_plan(cfg: QuickstartConfig, embedder: Any) -> QuickstartPlan:
    """Measure this machine, then size corpus, model and steps to fit `cfg.minutes`.

    Args:
        embedder: the dense embedder, measured for its speed (None with `retriever="bm25"`).
    """
    budget = cfg.minutes * 60.0
    files = plan_files(cfg)
    model = quickstart_model()
    speed = measure_machine(cfg.retriever, embedder, files, model)
    corpus_bytes, train_share = size_corpus(budget, speed, model)
    chosen = select_files(files, corpus_bytes, cfg.seed)
    chosen_bytes = sum(p.stat().st_size for p in chosen)
    steps = training_steps(chosen_bytes, train_share, budget, speed, model)
    valid = choose_valid(chosen, fraction=0.05, seed=cfg.seed)
    eval_tokens = evaluation_tokens(valid)
    extra = retrieval_only_within_budget(files, chosen, chosen_bytes, budget, speed.bm25_cost)
    return QuickstartPlan(
        version=PLAN_VERSION,
        settings=_plan_settings(cfg),
        files=[str(p) for p in chosen],
        valid_files=[str(p) for p in valid],
        corpus_bytes=chosen_bytes,
        retrieval_only=[str(p) for p in extra],
        retrieval_only_bytes=sum(p.stat().st_size for p in extra),
        database=dict(
            vocab_size=model.vocab, chunk_size=CHUNK_SIZE, seed=cfg.seed, retriever=cfg.retriever
        ),
        model=model.fields,
        train=train_settings(model, steps, speed.bf16, cfg.seed),
        eval=dict(max_tokens=eval_tokens, batch_size=8, num_neighbours=EVAL_K),
        retrofit_steps=max(10, int(RETROFIT_RATIO * steps)),
        compare=list(COMPARATORS),
        max_new_tokens=128,
        measured=speed.record(),
        estimate_seconds=estimate_stages(speed, model, steps, chosen_bytes, eval_tokens),
    )


def retrieval_only_files(
    files: list[Path], chosen: list[Path], max_bytes: int | None = None
) -> list[Path]:
    """The corpus beyond the training subset, for retrieval only: every other file, up to
    `max_bytes` (default RETRIEVAL_ONLY_MAX_BYTES; the most redundant folders first, as
    `select_files` orders them)."""
    max_bytes = RETRIEVAL_ONLY_MAX_BYTES if max_bytes is None else max_bytes
    taken = set(chosen)
    rest = [p for p in files if p not in taken]
    if sum(p.stat().st_size for p in rest) <= max_bytes:
        return rest
    return select_files(rest, max_bytes, seed=0) if max_bytes > 0 else []


def _plan_settings(cfg: QuickstartConfig) -> dict[str, Any]:
    return {
        "corpus": cfg.corpus,
        "minutes": cfg.minutes,
        "seed": cfg.seed,
        "retriever": cfg.retriever,
    }


def load_or_make_plan(cfg: QuickstartConfig, out: Path, embedder: Any) -> QuickstartPlan:
    """Reuse `out/plan.json` when it was made with the same settings, else make a new plan.

    Raises:
        MismatchError: `out` holds a quickstart made with other settings or another plan version.
    """
    path = out / PLAN_FILE
    if path.is_file():
        stored = read_json(path)
        if stored.get("version") != PLAN_VERSION:
            raise MismatchError(
                f"{out} holds a quickstart planned by another retrolm version (plan version "
                f"{stored.get('version')}, this one makes {PLAN_VERSION}); use another --out, or "
                "delete that folder to start over"
            )
        if stored.get("settings") != _plan_settings(cfg):
            raise MismatchError(
                f"{out} holds a quickstart made with other settings ({stored.get('settings')}); "
                "use another --out, or delete that folder to start over"
            )
        log.info("reusing the plan in %s (delete the folder to start over)", path)
        return QuickstartPlan(**stored)
    log.info("measuring this machine to size the run for %.0f minutes", cfg.minutes)
    plan = make_plan(cfg, embedder)
    write_json(path, plan.to_dict())
    return plan


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


# ---------------------------------------------------------------------------------------------
# the pipeline


class Clock:
    """Wall time per stage, and an estimate of the time left from the plan."""

    def __init__(self, plan_seconds: float) -> None:
        self.start = time.perf_counter()
        self.plan_seconds = plan_seconds
        self.stages: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        log.info("== %s", name)
        t0 = time.perf_counter()
        result = fn()
        self.stages[name] = round(time.perf_counter() - t0, 1)
        elapsed = time.perf_counter() - self.start
        left = max(0.0, self.plan_seconds - elapsed)
        log.info(
            "%s done in %.0f s; %.0f s elapsed, about %.0f s left",
            name,
            self.stages[name],
            elapsed,
            left,
        )
        return result

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


MIN_TEXT_FILES = 2  # one to train on, one held out


def check_quickstart_inputs(cfg: QuickstartConfig) -> None:
    """Refuse a `--corpus` with fewer than two text files and an `--out` holding anything but
    a quickstart, before any work.

    Raises:
        InputError: naming what was found and what to do.
    """
    from retrolm.corpus import decode_text
    from retrolm.io import check_writable

    out = Path(cfg.out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} is a file; give a folder for the quickstart")
        entries = [p for p in out.iterdir() if not p.name.startswith(".")]
        if entries and not (out / PLAN_FILE).is_file():
            holds = "other files"
            if (out / "manifest.json").is_file():
                holds = "a retrolm database"
            elif (out / "train_config.json").is_file():
                holds = "a training run"
            raise InputError(
                f"--out {out} holds {holds}, not a quickstart; give a new or empty folder (the "
                "quickstart writes a database, two runs and a report into it)"
            )
    check_writable(out, "--out")
    if not cfg.corpus:
        return
    files = corpus_files(cfg.corpus)
    reasons: Counter[str] = Counter()
    text_files = 0
    for p in files:
        try:
            with open(p, "rb") as f:
                data = f.read(65536)
            _, reason = decode_text(data)
            for cut in (1, 2, 3):  # the read may have ended inside a UTF-8 character
                if reason == "undecodable" and len(data) == 65536:
                    _, reason = decode_text(data[:-cut])
        except OSError:
            reason = "unreadable"
        if reason is None:
            text_files += 1
            if text_files >= MIN_TEXT_FILES:
                return
        else:
            reasons[reason] += 1
    detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    raise InputError(
        f"--corpus {' '.join(cfg.corpus)}: {len(files)} file(s), of which {text_files} of text"
        + (f" ({detail})" if detail else "")
        + f"; the quickstart needs at least {MIN_TEXT_FILES} text files (one is held out for "
        "evaluation)"
    )


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the whole pipeline and write the report. Returns the `report.json` content.

    Raises:
        InputError: a bad `--corpus`; MismatchError: `--out` holds a quickstart with other settings.
    """
    from retrolm.database import Database, DatabaseConfig, build_database
    from retrolm.database.embed import load_embedder
    from retrolm.evaluate import EvalConfig, evaluate_run
    from retrolm.generate import generate_text
    from retrolm.plot import plot_runs
    from retrolm.train import TrainConfig, train

    if cfg.base is not None:
        raise ValueError(
            "quickstart() trains a small model from scratch; a pretrained base runs through "
            "retrolm.quickstart_base.quickstart_base(cfg)"
        )
    clock = Clock(cfg.minutes * 60.0)
    check_quickstart_inputs(cfg)  # a bad --corpus or --out fails now, not minutes later
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resumed = (out / PLAN_FILE).is_file()
    embedder = load_embedder("default") if cfg.retriever == "dense" else None
    plan = clock.run("plan", lambda: load_or_make_plan(cfg, out, embedder))
    if resumed:
        log.info("resuming the quickstart in %s: finished stages are reused", out)
    log.info(
        "plan: %d files (%.1f MB) to train on, %d more (%.1f MB) to retrieve from, %d steps of "
        "batch %d x %d tokens per run",
        len(plan.files),
        plan.corpus_bytes / 1e6,
        len(plan.retrieval_only),
        plan.retrieval_only_bytes / 1e6,
        plan.train["max_steps"],
        plan.train["batch_size"],
        plan.train["seq_len"],
    )

    db_path = out / "database"
    valid_list = out / "valid_files.txt"
    if not valid_list.is_file():
        with atomic_open(valid_list, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in plan.valid_files))
    db_cfg = DatabaseConfig(**plan.database, valid_list=str(valid_list))
    clock.run(
        "database",
        lambda: build_database(
            plan.files,
            db_path,
            db_cfg,
            embedder=embedder,
            retrieval_only=plan.retrieval_only,
            show_progress=cfg.show_progress,
        ),
    )
    db = Database.open(db_path)

    runs = {"baseline": out / "baseline", "retro": out / "retro"}  # a retrofit needs the baseline
    for name, run in runs.items():
        tcfg = TrainConfig(model=dict(plan.model), no_retrieval=name == "baseline", **plan.train)
        if name == "retro":
            tcfg = retrofit_config(tcfg, runs["baseline"], plan.retrofit_steps)
        clock.run(
            f"train {name}",
            lambda tcfg=tcfg, run=run: train(
                tcfg,
                db,
                run,
                resume=(run / "train_config.json").is_file(),
                show_progress=cfg.show_progress,
            ),
        )

    eval_cfg = EvalConfig(**plan.eval)
    report = clock.run(
        "evaluate",
        lambda: evaluate_run(
            runs["retro"],
            db,
            config=eval_cfg,
            baseline=runs["baseline"],
            compare=tuple(plan.compare),
            show_progress=cfg.show_progress,
        ),
    )
    prompt, source = held_out_prompt(db)
    sample = clock.run(
        "generate",
        lambda: generate_text(
            runs["retro"],
            db,
            prompt,
            max_new_tokens=plan.max_new_tokens,
            temperature=SAMPLE_TEMPERATURE,
            top_k=SAMPLE_TOP_K,
            seed=cfg.seed,
        ),
    )
    clock.run(
        "plot",
        lambda: plot_runs(
            [runs["retro"], runs["baseline"]],
            out / "loss.png",
            labels=["RETRO", "baseline"],
            title="quickstart: training and validation loss",
        ),
    )
    result = report_json(plan, db, report, sample, source, clock)
    write_json(out / "report.json", result)
    with atomic_open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(report_markdown(plan, result, report, sample, source))
    log.info("report written to %s", out / "report.md")
    return result


def retrofit_config(base: Any, baseline_run: Path, steps: int) -> Any:
    """The baseline's training settings for RETRO-fitting it: `steps` steps of encoder + CCA."""
    fields = base.to_dict() | dict(
        retrofit=str(baseline_run),
        no_retrieval=False,
        max_steps=steps,
        warmup_steps=max(5, min(30, steps // 10)),
        eval_every=max(10, steps // 8),
        checkpoint_every=max(10, steps // 4),
    )
    return type(base)(**fields)


def held_out_prompt(db: Any, max_lines: int = 12, min_tokens: int = 100) -> tuple[str, str]:
    """The first lines of a held-out document, long enough to complete a chunk or two."""
    import numpy as np

    valid = [d for d in db.documents if d.split == "valid" and d.num_chunks >= 3]
    if not valid:
        valid = [d for d in db.documents if d.split == "valid"] or list(db.documents)
    doc = valid[0]
    ids = np.arange(doc.first_chunk, doc.first_chunk + min(doc.num_chunks, 4))
    text = db.tokenizer.decode(db.chunk_tokens(ids).reshape(-1).tolist())
    lines = text.splitlines(keepends=True)
    prompt = ""
    for line in lines:
        prompt += line
        if len(db.tokenizer.encode(prompt)) >= min_tokens or prompt.count("\n") >= max_lines:
            break
    return prompt, doc.name


def report_figures(report: Any, db: Any) -> dict[str, Any]:
    """What every quickstart's report.json holds of its evaluation and database: bits per byte,
    comparators, leakage buckets, the evaluated tokens, seconds, and the database's size."""
    from retrolm.evaluate import EvalReport

    figures = report.to_dict()
    return {
        **{name: figures.get(name) for name in EvalReport.NAMES.values()},
        "comparators": figures.get("comparators", {}),
        "filtered": figures.get("filtered", {}),
        "database_neighbours": int(db.stored_neighbours),  # stored per chunk
        "database_chunks": int(db.num_chunks),
        "database_documents": len(db.documents),
        "retrieval_only_chunks": int(db.manifest.counts.retrieval_chunks),
        "database_index": {
            k: db.manifest.index.to_json().get(k) for k in ("factory", "metric", "ntotal")
        },
        "eval": {
            **{k: figures[k] for k in ("tokens", "bytes", "chunks", "documents", "window")},
            **{k: figures[k] for k in ("stride", "k")},
            "leakage_neighbours": figures["config"]["leakage_neighbours"],  # r(C) reads these
        },
        "evaluate_seconds": figures.get("seconds", {}),  # per model / comparator
    }


def report_json(
    plan: QuickstartPlan, db: Any, report: Any, sample: Any, source: str, clock: Clock
) -> dict[str, Any]:
    return {
        **report_figures(report, db),
        "train_tokens": plan.train["max_steps"] * plan.train["batch_size"] * plan.train["seq_len"],
        "retrofit_steps": plan.retrofit_steps,
        "wall_seconds": clock.total,
        "stage_seconds": clock.stages,
        "plan": {k: v for k, v in plan.to_dict().items() if k != "files"},
        "sample": {"source": source, "prompt": sample.prompt, "text": sample.text},
    }


FENCE_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".rst": "rst", ".md": "markdown", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".js": "javascript", ".ts": "typescript",
    ".sh": "bash", ".pl": "perl", ".pm": "perl", ".pod": "perl", ".rb": "ruby", ".go": "go",
    ".rs": "rust", ".java": "java", ".json": "json", ".yaml": "yaml", ".yml": "yaml",
    ".toml": "toml", ".html": "html", ".xml": "xml", ".tex": "latex", ".sql": "sql",
}  # fmt: skip


def fence_language(name: str) -> str:
    """The Markdown code-fence language of a document, from its file suffix ('' if unknown)."""
    return FENCE_LANGUAGES.get(Path(name.split(":")[0]).suffix.lower(), "")


def comparator_rows(result: dict[str, Any], fmt: Callable[[float | None], str]) -> list[str]:
    """The comparators' rows of the bits-per-byte table."""
    rows = []
    if result.get("ralm_bpb") is not None:
        rows.append(
            f"| In-Context RALM (the baseline reading the previous chunk's neighbour in its "
            f"context) | {fmt(result['ralm_bpb'])} |"
        )
    if result.get("knnlm_bpb") is not None:
        knn = result.get("comparators", {}).get("knnlm", {})
        rows.append(
            f"| kNN-LM (the baseline interpolated with a datastore of {knn.get('datastore', 0):,} "
            f"training positions, lambda {knn.get('lambda', 0):.2f}) | {fmt(result['knnlm_bpb'])} |"
        )
    return rows


def comparator_verdict(result: dict[str, Any]) -> list[str]:
    """One sentence on which use of the database wins, and by how much."""
    entries = {"RETRO[ON]": result.get("retro_bpb")}
    entries.update({COMPARATORS[c]: result.get(f"{c}_bpb") for c in COMPARATORS})
    entries = {k: v for k, v in entries.items() if v is not None and math.isfinite(v)}
    if len(entries) < 2:
        return []
    best = min(entries, key=entries.get)
    others = ", ".join(
        f"{name} ({100 * (v / entries[best] - 1):.1f}% higher)"
        for name, v in sorted(entries.items(), key=lambda kv: kv[1])
        if name != best
    )
    return ["", f"Best use of the database: {best}; bits per byte of the others: {others}."]


def report_markdown(
    plan: QuickstartPlan, result: dict[str, Any], report: Any, sample: Any, source: str
) -> str:
    """The human-readable report: what was done, the figures, the sample and its sources."""
    lines = [
        "# retrolm quickstart report",
        "",
        *_report_setup(plan, result),
        *_report_figures(plan, result),
        "## Training curves",
        "",
        "![loss](loss.png)",
        "",
        *_report_sample(plan, result, sample, source),
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in result["stage_seconds"].items()],
        f"| total | {result['wall_seconds']} |",
        "",
    ]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _report_setup(plan: QuickstartPlan, result: dict[str, Any]) -> list[str]:
    """The report's paragraphs on the database and the models."""
    index = result["database_index"]
    database = (
        f"Database: {result['database_documents']} documents, {result['database_chunks']} chunks of "
        f"{plan.database['chunk_size']} tokens ({plan.corpus_bytes / 1e6:.1f} MB of text, "
        f"{len(plan.files)} files in {len({Path(f).parent for f in plan.files})} folders; "
        "beyond the budget, whole folders are taken, most redundant first)"
        + (
            f", plus {len(plan.retrieval_only)} more files ({plan.retrieval_only_bytes / 1e6:.1f} "
            f"MB, {result['retrieval_only_chunks']} chunks) of the corpus that are retrieved "
            "from but never trained on or evaluated"
            if plan.retrieval_only
            else ""
        )
        + f"; byte-level BPE of {plan.database['vocab_size']} tokens; "
        + (
            f"a BM25 index over {index['ntotal']} chunks"
            if index["metric"] == "bm25"
            else f"all-MiniLM-L6-v2 embeddings, faiss index `{index['factory']}` "
            f"({index['metric']}) over {index['ntotal']} train and retrieval-only chunks"
        )
        + f"; {result['database_neighbours']} neighbours stored per chunk (never from the "
        "chunk's own document)."
    )
    models = (
        f"Models: decoder {plan.model['dec_dim']}x{plan.model['dec_depth']}, sequence "
        f"{plan.train['seq_len']}; RETRO adds chunked cross-attention at layers "
        f"{', '.join(map(str, plan.model['cca_layers']))} and a {plan.model['enc_dim']}x"
        f"{plan.model['enc_depth']} neighbour encoder (k={plan.train['num_neighbours']} "
        f"neighbours in training, {plan.eval.get('num_neighbours') or plan.train['num_neighbours']} "
        "at evaluation)"
        + (
            f", with `cca_match={plan.model['cca_match']}` (a learned bonus for neighbour tokens "
            "that follow the query's last tokens, a retrolm extension that lets this small model "
            "learn to read its neighbours in the budget)"
            if plan.model.get("cca_match")
            else ""
        )
        + f". The baseline trained {plan.train['max_steps']} steps of "
        f"{plan.train['batch_size']} sequences ({result['train_tokens']:,} tokens); RETRO is "
        f"that baseline RETRO-fitted (its decoder frozen, only the encoder and CCA trained) "
        f"for {plan.retrofit_steps} more steps of the same data, so RETRO[OFF] is the baseline"
        + f"{', bfloat16 autocast' if plan.train.get('bf16') else ''}."
    )
    return [database, "", models, ""]


def _report_figures(plan: QuickstartPlan, result: dict[str, Any]) -> list[str]:
    """The report's bits per byte: the models and comparators, then the leakage buckets."""
    r, off, base = result["retro_bpb"], result["retro_off_bpb"], result["baseline_bpb"]
    gain = (1 - r / base) * 100 if r and base else float("nan")
    lines = [
        "## Held-out bits per byte (lower is better)",
        "",
        f"Evaluated on {result['eval']['documents']} held-out documents, {result['eval']['tokens']:,} "
        f"tokens ({result['eval']['bytes']:,} bytes), windows of {result['eval']['window']} tokens "
        f"with stride {result['eval']['stride']}.",
        "",
        "| model | bits per byte |",
        "|---|---|",
        f"| RETRO[ON] (retrieval) | {_fmt(r)} |",
        f"| RETRO[OFF] (same model, no retrieval) | {_fmt(off)} |",
        f"| baseline (no retrieval, same size and data) | {_fmt(base)} |",
        *comparator_rows(result, _fmt),
        "",
        f"RETRO[ON] vs baseline: {-gain:+.1f}% bits per byte "
        f"({'lower: better' if gain > 0 else 'not lower: no better'} with retrieval).",
        *comparator_verdict(result),
        "",
        "## Leakage-filtered (paper, section 2.6)",
        "",
        "r(C) is the longest run of tokens a held-out chunk shares with its "
        f"{result['eval']['leakage_neighbours']} nearest database chunks (train and "
        "retrieval-only), over the chunk size. Rows keep the chunks with r(C) <= alpha; small "
        "alpha means little overlap, so gains there come from generalisation, not copying.",
        "",
        "| alpha | chunks | RETRO[ON] | baseline |"
        + "".join(f" {COMPARATORS[c]} |" for c in plan.compare),
        "|---|---|---|---|" + "---|" * len(plan.compare),
    ]
    for alpha, f in result["filtered"].items():
        lines.append(
            f"| {alpha} | {f['chunks']} | {_fmt(f.get('retro_bpb'))} | "
            f"{_fmt(f.get('baseline_bpb'))} |"
            + "".join(f" {_fmt(f.get(c + '_bpb'))} |" for c in plan.compare)
        )
    return [*lines, ""]


def _report_sample(
    plan: QuickstartPlan, result: dict[str, Any], sample: Any, source: str
) -> list[str]:
    """The report's generated continuation of a held-out file, with what it retrieved."""
    from retrolm.database.db import nearer

    fence = fence_language(source)
    metric = result["database_index"]["metric"]
    what = "distance" if metric == "l2" else "score"
    return [
        f"## A continuation of a held-out file ({source})",
        "",
        "Prompt:",
        "",
        f"```{fence}",
        sample.prompt.rstrip("\n"),
        "```",
        "",
        f"Generated ({plan.max_new_tokens} tokens, sampled at temperature {SAMPLE_TEMPERATURE}"
        f" from the top {SAMPLE_TOP_K} tokens, seed {plan.settings['seed']}):",
        "",
        f"```{fence}",
        sample.text.rstrip("\n"),
        "```",
        "",
        f"Retrieved for each completed chunk ({metric} {what}: {nearer(metric)} is nearer):",
        "",
        "```",
        sample.attribution_text(snippet=100),
        "```",
        "",
    ]
