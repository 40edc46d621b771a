"""`retrolm quickstart --base smollm2|PATH`: RETRO-fit a real pretrained model on a corpus and
compare it with the base, In-Context RALM and kNN-LM, within a wall-time budget.

The pipeline: the base (a Hugging Face folder, a .gguf file or `smollm2`, converted once) ->
held-out documents chosen by seed before anything is scored -> a BM25 database in the base's
own tokens (the training subset, the held-out documents and retrieval-only documents) ->
RETRO-fit (the base frozen; encoder, CCA in its upper layers and the copy head trained) ->
base / RETRO[ON] / RETRO[OFF] (the base itself, scored once) / In-Context RALM / kNN-LM on
the same held-out tokens -> a generated sample with its sources -> report.md, report.json,
loss.png.

Sizes come from measurements on the machine at hand: the base's dtype (float32 or bfloat16,
whichever runs its forward faster here), the seconds of one RETRO-fit step and of one base
forward. The training steps are decided when training starts, from the time left after the
database, and stored in `plan.json` with the rest, so that a resumed quickstart makes the same
run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from retrolm.comparators import COMPARATORS
from retrolm.config import CHUNK_SIZE
from retrolm.errors import MismatchError
from retrolm.io import atomic_open, read_json, write_json
from retrolm.quickstart import (
    Clock,
    QuickstartConfig,
    check_quickstart_inputs,
    corpus_files,
    fence_language,
    held_out_prompt,
    report_figures,
    select_files,
    stdlib_files,
)

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
PLAN_KIND = "base"  # plan.json of a real-base quickstart (the tiny-model one has none)
PLAN_VERSION = 2  # a plan.json of another version is refused, not resumed
TRAIN_K = 2  # neighbours read in training
EVAL_K = 4  # neighbours read at evaluation (the copy head copies from every one it reads)
TRAIN_SEQ = 512  # tokens per training sequence
BATCH = 2  # sequences per step
EVAL_WINDOW = 1024  # tokens per scoring window: RALM's prepended text leaves room for context
EVAL_TOKENS = 12_000  # held-out tokens scored (spread over at least EVAL_DOCS documents)
EVAL_DOCS = 12
MAX_DOC_TOKENS = 2_400  # a held-out document longer than this is not chosen (one would dominate)
EVAL_SHARE = 0.3  # at most this share of the budget for evaluation (fewer scored tokens)
# evaluation in base-forward token equivalents per scored token: the base 3.5 and RETRO[ON]
# 7.9 (windows overlap by half, short documents pad), RALM 1.6 windows per chunk; kNN-LM
# costs 2 per datastore key and tuning token. Measured on SmolLM2-135M (docs/results.md, the
# section on a real base's speed): an upper bound, used only to size the scored tokens. The
# training's time is decided from what scoring took (`training_seconds`).
EVAL_COST = 3.5 + 7.9 + 1.6 * EVAL_WINDOW / CHUNK_SIZE
# the retrieval parts, sized for a CPU: enc_dim 384 x 1 layer with CCA after layers depth-4 and
# depth trains 2.6x as many tokens/s as the defaults (enc_dim 896 x 2, six CCA layers from the
# middle), measured on SmolLM2-135M (docs/results.md, the section on a real base's speed)
RETROFIT_MODEL = {"enc_dim": 384, "enc_heads": 6, "enc_depth": 1, "cca_match": 4, "copy_head": True}
LR = 1e-3
DB_BYTES_PER_MINUTE = 400_000  # corpus bytes the database takes per budget minute (BM25)
TRAIN_PASSES = 1.5  # the training subset holds this many times the tokens training reads
MARGIN = 0.04  # of the budget kept for model saves and misestimates
AFTER_SECONDS = 10.0  # kept for the generated sample, the plot and the report (measured 5-7 s)
# RETRO[ON]'s scoring of held-out windows, relative to the base's, took 1.35x and 1.51x the
# ratio of their one-window forwards in the plan (docs/results.md, the planner on a real base)
RETRO_ON_SLOWDOWN = 1.5
MIN_STEPS = 20  # the steps a run is expected to take, at least (warm-up, validation)
SAMPLE_TOKENS = 96
SCORES_FILE = "base_scores.npz"  # the base's and the comparators' bits, scored before training


def measure_dtype(folder: Path, tokens: int = EVAL_WINDOW) -> tuple[str, dict[str, float]]:
    """float32 or bfloat16: whichever runs the base's forward faster on this machine, timed on
    one window of `tokens` as evaluation scores them (the faster of 2 after a warm-up; one
    timing of 256 tokens made the evaluation's estimate a third too long, docs/results.md);
    bfloat16 is not tried where the CPU lacks it."""
    import torch

    from retrolm.database.embed import cpu_has_fast_bf16
    from retrolm.hf.base import load_base

    timings: dict[str, float] = {}
    candidates = ["float32"]
    if cpu_has_fast_bf16():
        candidates.append("bfloat16")  # AVX2-only CPUs emulate it: measured 2.7x slower
    for dtype in candidates:
        base = load_base(folder, dtype)
        x = torch.randint(3, base.config.vocab_size, (1, tokens))
        with torch.inference_mode():
            base(input_ids=x)
            seconds = []
            for _ in range(2):
                t = time.perf_counter()
                base(input_ids=x)
                seconds.append(time.perf_counter() - t)
            timings[dtype] = tokens / min(seconds)
        del base
    best = max(timings, key=lambda d: timings[d])
    return best, timings


def measure_retrofit(folder: Path, dtype: str, cca_layers: tuple[int, ...]) -> tuple[float, float]:
    """(seconds of one RETRO-fit step as the quickstart trains, RETRO[ON]'s forward tokens/s on
    one window as evaluation scores it), each the faster of 2 after a warm-up. Training times
    its own steps again (`TrainConfig.minutes`); the forward's speed relative to the base's
    (`measure_dtype`) scales the base's measured scoring time to RETRO[ON]'s."""
    import torch

    from retrolm.hf import retrofit_hf

    model = retrofit_hf(
        folder, dtype=dtype, cca_layers=cca_layers, num_neighbours=EVAL_K, **RETROFIT_MODEL
    ).train()
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def neighbours(n: int, k: int) -> torch.Tensor:
        return torch.randint(3, V, (n // CHUNK_SIZE, k, 2 * CHUNK_SIZE), generator=g)

    x = torch.randint(3, V, (BATCH, TRAIN_SEQ), generator=g)
    nb = torch.stack([neighbours(TRAIN_SEQ, TRAIN_K) for _ in range(BATCH)])
    opt = torch.optim.AdamW([p for _, p in model.retrieval_parameters()], lr=LR)
    steps = []
    for _ in range(3):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(x, x, nb).backward()
        opt.step()
        steps.append(time.perf_counter() - t)
    model.eval()
    w = torch.randint(3, V, (1, EVAL_WINDOW), generator=g)
    wnb = neighbours(EVAL_WINDOW, EVAL_K)[None]
    forward = []
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            model(w, neighbours=wnb)
            forward.append(time.perf_counter() - t)
    return min(steps[1:]), EVAL_WINDOW / min(forward[1:])  # the first of each warms up


def text_files(files: list[Path]) -> list[Path]:
    """The files the database would read as text (UTF-8, not binary, not empty): only these
    can be held out, trained on or retrieved from."""
    from retrolm.corpus import decode_text

    kept = []
    for p in files:
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if decode_text(data)[1] is None:
            kept.append(p)
    return kept


def bytes_per_token(folder: Path, files: list[Path]) -> float:
    """Bytes of text per token of the base's tokenizer, on a sample of the corpus."""
    from retrolm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(folder)
    sample = "".join(_read(p)[:20000] for p in files[:: max(1, len(files) // 32)][:32])
    if not sample:
        return 4.0
    return len(sample.encode("utf-8")) / max(1, len(tokenizer.encode(sample)))


def choose_held_out(
    files: list[Path],
    per_token: float,
    seed: int,
    tokens: float = EVAL_TOKENS,
    docs: int = EVAL_DOCS,
) -> list[Path]:
    """Held-out documents, by a seeded hash of their relative paths (fixed before any result):
    at least `docs` of them and `tokens` tokens, each short enough not to dominate."""
    root = Path(os.path.commonpath(files))

    def key(p: Path) -> str:
        return hashlib.sha256(f"held-out:{seed}:{p.relative_to(root)}".encode()).hexdigest()

    low, high = 4 * CHUNK_SIZE * per_token, MAX_DOC_TOKENS * per_token
    candidates = sorted((p for p in files if low <= p.stat().st_size <= high), key=key)
    chosen, total = [], 0.0
    for p in candidates:
        if len(chosen) >= docs and total >= tokens * per_token:
            break
        chosen.append(p)
        total += p.stat().st_size
    if len(chosen) < 2:
        chosen = sorted(files, key=key)[: max(1, min(EVAL_DOCS, len(files) // 4))]
    return sorted(chosen)


def sample(
    files: list[Path], byte_budget: int, seed: int, salt: str, rule: str = "uniform"
) -> list[Path]:
    """A seeded sample of `files` of about `byte_budget` bytes (none of no files): "uniform",
    file by file; "folders", whole folders, the most redundant first (`select_files`)."""
    if not files:
        return []
    return select_files(files, byte_budget, seed, by_folder=rule == "folders", salt=salt)


def make_plan(cfg: QuickstartConfig, minutes: float) -> dict[str, Any]:
    """Measure the machine and the corpus, and size every stage except training's steps."""
    from retrolm.hf.resolve import resolve_base

    assert cfg.base is not None
    folder = resolve_base(cfg.base)
    files = text_files(corpus_files(cfg.corpus)) if cfg.corpus else stdlib_files()
    dtype, forward = measure_dtype(folder)
    depth = int(read_json(folder / "config.json")["num_hidden_layers"])
    cca_layers = tuple(sorted({max(1, depth - 4), depth}))
    step_seconds, retro_forward = measure_retrofit(folder, dtype, cca_layers)
    per_token = bytes_per_token(folder, files)
    budget = minutes * 60.0
    fwd = forward[dtype]
    # scored tokens: EVAL_TOKENS, or fewer where evaluation would take over EVAL_SHARE of the
    # budget (a few minutes' quickstart); 12 documents at 30 minutes
    scored = min(EVAL_TOKENS, EVAL_SHARE * budget * fwd / EVAL_COST)
    held_out = choose_held_out(
        files, per_token, cfg.seed, scored, max(2, round(EVAL_DOCS * scored / EVAL_TOKENS))
    )
    rest = [p for p in files if p not in set(held_out)]
    train_tokens = budget * 0.45 / step_seconds * BATCH * TRAIN_SEQ  # an upper bound
    train_bytes = int(train_tokens * TRAIN_PASSES * per_token)
    # by default the training subset and the retrieval-only documents are drawn file by file
    # from the whole corpus, as the held-out documents are, so that what the retrieval part
    # learns of its neighbours holds for held-out text: the most redundant folders first
    # ("folders", the from-scratch quickstart's order) can train it on near-identical files
    # only (the standard library's generated codecs), whose neighbours are nearly the text
    # itself; it then copies into held-out files that have no such copy (docs/results.md)
    train_files = sample(rest, train_bytes, cfg.seed, "train:", cfg.train_files)
    chosen = set(train_files)
    db_bytes = int(DB_BYTES_PER_MINUTE * minutes)
    others = [p for p in rest if p not in chosen]
    retrieval_only = sample(others, db_bytes, cfg.seed, "retrieval:", cfg.train_files)
    extra = sum(p.stat().st_size for p in retrieval_only)
    eval_tokens = sum(p.stat().st_size for p in held_out) / per_token
    datastore = int(min(400_000, 0.02 * budget * fwd))  # kNN-LM keys: ~2% of the budget
    forward_tokens = EVAL_COST * eval_tokens + 2 * datastore + 2 * min(32768, datastore // 10)
    return {
        "kind": PLAN_KIND,
        "version": PLAN_VERSION,
        "settings": _settings(cfg, minutes),
        "base": str(folder),
        "dtype": dtype,
        "cca_layers": list(cca_layers),
        "files": [str(p) for p in sorted(set(train_files) | set(held_out))],
        "held_out": [str(p) for p in held_out],
        "retrieval_only": [str(p) for p in retrieval_only],
        "train_bytes": sum(p.stat().st_size for p in train_files),
        "held_out_bytes": sum(p.stat().st_size for p in held_out),
        "retrieval_only_bytes": extra,
        "datastore": datastore,
        "measured": {
            "forward_tokens_per_s": {k: round(v, 1) for k, v in forward.items()},
            "step_seconds": round(step_seconds, 3),
            "retro_forward_tokens_per_s": round(retro_forward, 1),
            "bytes_per_token": round(per_token, 3),
            "cpu_capability": _capability(),
        },
        "estimate_seconds": {"scoring": round(forward_tokens / fwd, 1)},  # sizing only
        "train_seconds": None,  # decided when training starts (`training_seconds`)
    }


def retro_on_seconds(plan: dict[str, Any], base_seconds: float) -> float:
    """What scoring RETRO[ON] will take: the base's measured scoring time over the same windows,
    times how much slower RETRO[ON]'s forward ran than the base's in the plan's timings (and
    `RETRO_ON_SLOWDOWN`)."""
    measured = plan["measured"]
    ratio = measured["forward_tokens_per_s"][plan["dtype"]] / measured["retro_forward_tokens_per_s"]
    return base_seconds * ratio * RETRO_ON_SLOWDOWN


def training_seconds(plan: dict[str, Any], budget: float, elapsed: float) -> float:
    """The training's budget: the time left after the database and the base's and the
    comparators' scoring, less RETRO[ON]'s scoring estimate, `AFTER_SECONDS` and the margin (a
    share of the budget). Training decides its steps from it after timing its first steps
    (`TrainConfig.minutes`); it takes those `CALIBRATION_STEPS` in any case, so the budget is
    never less than their time."""
    from retrolm.train import CALIBRATION_STEPS

    left = budget * (1 - MARGIN) - elapsed - plan["estimate_seconds"]["retro_on"] - AFTER_SECONDS
    return max(CALIBRATION_STEPS * plan["measured"]["step_seconds"], left)


def load_or_score_base(
    path: Path, base: str, db: Any, config: Any, knnlm: Any, dtype: str, show_progress: bool
) -> Any:
    """The base's and the comparators' `Scores`, read from `path` or scored and written there
    (a resumed quickstart takes them, and so decides the same training time)."""
    from retrolm.evaluate import Scores, score_baseline

    if path.is_file():
        log.info("reusing the base's and the comparators' scores in %s", path)
        return Scores.load(path)
    scores = score_baseline(
        base,
        db,
        config=config,
        compare=tuple(COMPARATORS),
        knnlm=knnlm,
        dtype=dtype,
        show_progress=show_progress,
    )
    scores.save(path)
    return scores


def _capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def _settings(cfg: QuickstartConfig, minutes: float) -> dict[str, Any]:
    return {
        "base": cfg.base,
        "corpus": cfg.corpus,
        "minutes": minutes,
        "seed": cfg.seed,
        "train_files": cfg.train_files,
    }


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def load_or_make_plan(cfg: QuickstartConfig, out: Path, minutes: float) -> dict[str, Any]:
    """Reuse `out/plan.json` when it was made with the same settings, else make and store one.

    Raises:
        MismatchError: `out` holds a quickstart made with other settings.
    """
    path = out / PLAN_FILE
    if path.is_file():
        stored = read_json(path)
        if stored.get("kind") != PLAN_KIND or stored.get("settings") != _settings(cfg, minutes):
            raise MismatchError(
                f"{out} holds a quickstart made with other settings ({stored.get('settings')}); "
                "use another --out, or delete that folder to start over"
            )
        if stored.get("version") != PLAN_VERSION:
            raise MismatchError(
                f"{out} holds a quickstart planned by another version of retrolm (plan version "
                f"{stored.get('version')}, this one {PLAN_VERSION}); use another --out, or "
                "delete that folder to start over"
            )
        log.info("reusing the plan in %s (delete the folder to start over)", path)
        return stored
    log.info("measuring this machine and the base to size the run for %.0f minutes", minutes)
    plan = make_plan(cfg, minutes)
    write_json(path, plan)
    return plan


def quickstart_base(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the real-base pipeline and write the report. Returns the `report.json` content."""
    from retrolm.comparators import KnnLMConfig
    from retrolm.database import Database, DatabaseConfig, build_database
    from retrolm.evaluate import EvalConfig, evaluate_run
    from retrolm.generate import generate_text
    from retrolm.plot import plot_runs
    from retrolm.train import TrainConfig, train

    minutes = cfg.minutes
    budget = minutes * 60.0
    clock = Clock(budget)
    check_quickstart_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = clock.run("plan", lambda: load_or_make_plan(cfg, out, minutes))
    base = plan["base"]
    log.info(
        "plan: base %s in %s; %d files (%.1f MB) to train on, %d held out (%.0f kB), %d "
        "retrieval-only (%.1f MB)",
        cfg.base,
        plan["dtype"],
        len(plan["files"]) - len(plan["held_out"]),
        plan["train_bytes"] / 1e6,
        len(plan["held_out"]),
        plan["held_out_bytes"] / 1e3,
        len(plan["retrieval_only"]),
        plan["retrieval_only_bytes"] / 1e6,
    )
    valid_list = out / "valid_files.txt"
    if not valid_list.is_file():
        with atomic_open(valid_list, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in plan["held_out"]))
    db_cfg = DatabaseConfig(
        tokenizer=base,
        chunk_size=CHUNK_SIZE,
        retriever="bm25",
        seed=cfg.seed,
        valid_list=str(valid_list),
    )
    db_path = out / "database"
    clock.run(
        "database",
        lambda: build_database(
            plan["files"],
            db_path,
            db_cfg,
            retrieval_only=plan["retrieval_only"],
            show_progress=cfg.show_progress,
        ),
    )
    db = Database.open(db_path)
    # the base and the comparators do not depend on the RETRO-fit: scored first, so that the
    # training gets the time they leave, not an estimate's
    eval_cfg = EvalConfig(window=EVAL_WINDOW, stride=EVAL_WINDOW // 2, num_neighbours=EVAL_K)
    knnlm = KnnLMConfig(max_datastore=plan["datastore"], seed=cfg.seed)
    scores = clock.run(
        "base and comparators",
        lambda: load_or_score_base(
            out / SCORES_FILE, base, db, eval_cfg, knnlm, plan["dtype"], cfg.show_progress
        ),
    )
    if plan["train_seconds"] is None:
        estimate = retro_on_seconds(plan, float(scores.seconds["baseline"]))
        plan["estimate_seconds"]["retro_on"] = round(estimate, 1)
        plan["train_seconds"] = training_seconds(plan, budget, time.perf_counter() - clock.start)
        write_json(out / PLAN_FILE, plan)  # a resumed quickstart trains as long
    seconds = float(plan["train_seconds"])
    steps = max(MIN_STEPS, int(seconds / plan["measured"]["step_seconds"]))  # expected
    run = out / "retro"
    model = dict(RETROFIT_MODEL, dtype=plan["dtype"], cca_layers=plan["cca_layers"])
    tcfg = TrainConfig(
        retrofit=base,
        model=model,
        max_steps=2 * steps,  # the upper bound; `minutes` decides
        minutes=seconds / 60.0,
        seq_len=TRAIN_SEQ,
        batch_size=BATCH,
        num_neighbours=TRAIN_K,
        lr=LR,
        warmup_steps=max(10, min(30, steps // 10)),  # past the steps `minutes` times
        weight_decay=0.0,
        seed=cfg.seed,
        eval_every=max(10, steps // 6),
        eval_batches=2,
        checkpoint_every=max(10, steps // 4),
        keep_checkpoints=1,
    )
    clock.run(
        "RETRO-fit",
        lambda: train(
            tcfg,
            db,
            run,
            resume=(run / "train_config.json").is_file(),
            show_progress=cfg.show_progress,
        ),
    )
    report = clock.run(
        "evaluate",
        lambda: evaluate_run(
            run,
            db,
            config=eval_cfg,
            baseline=base,
            compare=tuple(COMPARATORS),
            knnlm=knnlm,
            scores=scores,
            show_progress=cfg.show_progress,
        ),
    )
    prompt, source = held_out_prompt(db)
    sample = clock.run(
        "generate",
        lambda: generate_text(run, db, prompt, max_new_tokens=SAMPLE_TOKENS, seed=cfg.seed),
    )
    clock.run(
        "plot",
        lambda: plot_runs([run], out / "loss.png", labels=["RETRO-fit"], title="RETRO-fit loss"),
    )
    trained = int(read_json(run / "run.json").get("decided_steps") or tcfg.max_steps)
    result = report_json(plan, db, report, sample, source, clock, tcfg, trained)
    write_json(out / "report.json", result)
    with atomic_open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(report_markdown(cfg, plan, result, sample, source))
    log.info("report written to %s", out / "report.md")
    return result


def report_json(
    plan: dict[str, Any],
    db: Any,
    report: Any,
    sample: Any,
    source: str,
    clock: Clock,
    tcfg: Any,
    steps: int,
) -> dict[str, Any]:
    return {
        **report_figures(report, db),
        "train_steps": steps,
        "train_tokens": steps * tcfg.batch_size * tcfg.seq_len,
        "wall_seconds": clock.total,
        "budget_seconds": clock.plan_seconds,
        "stage_seconds": clock.stages,
        "plan": {k: v for k, v in plan.items() if k not in ("files", "retrieval_only")},
        "sample": {"source": source, "prompt": sample.prompt, "text": sample.text},
    }


def report_markdown(
    cfg: QuickstartConfig, plan: dict[str, Any], result: dict[str, Any], sample: Any, source: str
) -> str:
    """The human-readable report: what was done, the figures, the sample and its sources."""

    def fmt(x: float | None) -> str:
        return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"

    def rel(x: float | None) -> str:
        base = result["baseline_bpb"]
        if x is None or not base or not math.isfinite(x):
            return "-"
        return f"{100 * (x / base - 1):+.1f}%"

    knn = result["comparators"].get("knnlm", {})
    ev = result["eval"]
    rows = [
        ("base model (no retrieval)", result["baseline_bpb"]),
        ("RETRO[ON]: the RETRO-fitted base reading its neighbours", result["retro_bpb"]),
        ("RETRO[OFF]: the same without neighbours (the base, by construction)",
         result["retro_off_bpb"]),
        ("In-Context RALM: the base with the previous chunk's nearest neighbour prepended",
         result["ralm_bpb"]),
        (f"kNN-LM: the base interpolated with {knn.get('datastore', 0):,} training positions "
         f"(lambda {knn.get('lambda', 0):.2f})", result["knnlm_bpb"]),
    ]  # fmt: skip
    entries = {n: v for n, v in rows[1:2] + rows[3:] if v is not None and math.isfinite(v)}
    best = min(entries, key=lambda n: entries[n]) if entries else None
    lines = [
        "# retrolm quickstart report: RETRO-fitting a pretrained model",
        "",
        f"Base: `{cfg.base}` ({plan['base']}), frozen, run in {plan['dtype']} (the faster "
        f"on this machine: {plan['measured']['forward_tokens_per_s']} forward tokens/s). "
        f"Trained: a {RETROFIT_MODEL['enc_dim']}x{RETROFIT_MODEL['enc_depth']} neighbour "
        f"encoder, chunked cross-attention after layers {plan['cca_layers']} and the copy head, "
        f"{result['train_steps']} steps of {BATCH} x {TRAIN_SEQ} tokens "
        f"({result['train_tokens']:,} tokens), k={TRAIN_K} neighbours.",
        "",
        f"Database: {result['database_documents']} documents, {result['database_chunks']:,} "
        f"chunks of {CHUNK_SIZE} tokens in the base's own tokens, BM25, of which "
        f"{result['retrieval_only_chunks']:,} chunks retrieval-only (never trained on or "
        "evaluated).",
        "",
        "## Held-out bits per byte (lower is better)",
        "",
        f"{ev['documents']} held-out documents chosen by seed {cfg.seed} before scoring, "
        f"{ev['tokens']:,} tokens ({ev['bytes']:,} bytes), windows of {ev['window']} tokens with "
        f"stride {ev['stride']}, k={ev['k']} neighbours at evaluation.",
        "",
        "| model | bits per byte | vs base |",
        "|---|---|---|",
        *(f"| {name} | {fmt(v)} | {rel(v)} |" for name, v in rows),
        "",
        f"Best use of the database here: {best}." if best else "",
        "",
        "By leakage (r(C): the share of a held-out chunk's tokens found in a run shared with its "
        "nearest database chunks, train and retrieval-only):",
        "",
        "| r(C) <= | chunks | base | RETRO[ON] | RALM | kNN-LM |",
        "|---|---|---|---|---|---|",
    ]
    for alpha, row in result["filtered"].items():
        lines.append(
            f"| {alpha} | {row['chunks']} | {fmt(row.get('baseline_bpb'))} | "
            f"{fmt(row.get('retro_bpb'))} | {fmt(row.get('ralm_bpb'))} | "
            f"{fmt(row.get('knnlm_bpb'))} |"
        )
    fence = fence_language(source)
    lines += [
        "",
        f"## A generated sample (greedy, {SAMPLE_TOKENS} tokens, retrieving at every chunk)",
        "",
        f"Prompt: the start of the held-out `{Path(source).name}`:",
        "",
        f"```{fence}",
        sample.prompt,
        "```",
        "",
        "Continuation:",
        "",
        f"```{fence}",
        sample.text,
        "```",
        "",
        "Retrieved for each completed chunk (BM25 score: higher is nearer):",
        "",
        "```",
        sample.attribution_text(snippet=100),
        "```",
        "",
        "![loss](loss.png)",
        "",
        f"Wall time: {result['wall_seconds']:.0f} s of a {result['budget_seconds']:.0f} s budget "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['stage_seconds'].items())}).",
        "",
    ]
    return "\n".join(lines)
