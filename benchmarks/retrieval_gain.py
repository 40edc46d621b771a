"""Which retrieval pays? RETRO against a same-size baseline on one corpus, one variant at a time.

Every variant uses the quickstart's model (RetroConfig preset "quickstart"), training settings and
held-out files, and changes one thing: the retriever (MiniLM or BM25), the database size (the
training subset, 4x it, or the whole corpus, the text beyond the subset added as retrieval-only
documents), or how RETRO is trained (from scratch, or RETRO-fitted onto the trained baseline).
Steps are fixed (not wall time), so the figures do not depend on the machine's load; the wall
times are recorded as measured.

    python benchmarks/retrieval_gain.py --corpus stdlib --out /tmp/gain/stdlib-s0 --seed 0
    python benchmarks/retrieval_gain.py --corpus /usr/share/perl/5.36.0/pod --out DIR \\
        --variants bm25 bm25-all --compare ralm knnlm --json

The held-out files are the quickstart's choice for the seed (a seeded hash of the file names,
among files of at least 1 kB of the training subset), fixed before any result is seen. Each
finished variant is cached in OUT/results/VARIANT.json, so a rerun only does what is missing.
The last line with --json is one JSON object: {variant: figures}.

Levers of the RETRO run (not the baseline's) are measured with `--tag LABEL` and repeatable
`--set FIELD=VALUE` (a TrainConfig field, or `model.FIELD` for a RetroConfig field), and k at
evaluation with `--eval-k K`; the result is cached as VARIANT+LABEL, beside the untagged run:

    python benchmarks/retrieval_gain.py --corpus stdlib --out DIR --steps 300 \
        --variants bm25-all --tag drop25 --set neighbour_dropout=0.25
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrolm.errors import UserError

log = logging.getLogger("retrieval_gain")


@dataclass(frozen=True)
class Variant:
    retriever: str  # "dense" (MiniLM) or "bm25"
    database: str  # "subset" (the training files), "x4" (4x their bytes), "all" (whole corpus)
    training: str  # "scratch" (RETRO trained like the baseline) or "retrofit" (onto it)


VARIANTS = {
    "minilm": Variant("dense", "subset", "scratch"),  # the quickstart before this benchmark
    "bm25": Variant("bm25", "subset", "scratch"),
    "bm25-x4": Variant("bm25", "x4", "scratch"),
    "bm25-all": Variant("bm25", "all", "scratch"),
    "minilm-retrofit": Variant("dense", "subset", "retrofit"),
    "bm25-retrofit": Variant("bm25", "subset", "retrofit"),
    "bm25-all-retrofit": Variant("bm25", "all", "retrofit"),
}


def corpus_plan(corpus: str, subset_bytes: int, seed: int) -> dict[str, list[Path]]:
    """Training subset, held-out files and the rest of the corpus, as the quickstart picks them."""
    from retrolm.quickstart import choose_valid, corpus_files, select_files, stdlib_files

    files = stdlib_files() if corpus == "stdlib" else corpus_files([corpus])
    subset = select_files(files, subset_bytes, seed)
    valid = choose_valid(subset, fraction=0.05, seed=seed)
    chosen = set(subset)
    rest = [p for p in files if p not in chosen]
    rest_bytes = sum(p.stat().st_size for p in rest)
    x4 = select_files(rest, 3 * subset_bytes, seed) if rest_bytes > 3 * subset_bytes else rest
    return {"subset": subset, "valid": valid, "x4": x4, "all": rest}


def build(out: Path, plan: dict[str, list[Path]], v: Variant, seed: int, embedder: Any) -> Path:
    """The variant's database (shared by the variants with the same retriever and size)."""
    from retrolm.database import DatabaseConfig, build_database

    folder = out / f"db-{v.retriever}-{v.database}"
    valid_list = out / "valid_files.txt"
    if not valid_list.is_file():
        valid_list.write_text("".join(f"{p}\n" for p in plan["valid"]), encoding="utf-8")
    cfg = DatabaseConfig(
        vocab_size=8192, chunk_size=64, seed=seed, valid_list=str(valid_list), retriever=v.retriever
    )
    extra = [] if v.database == "subset" else plan[v.database]
    t0 = time.perf_counter()
    build_database(
        [str(p) for p in plan["subset"]],
        folder,
        cfg,
        embedder=embedder if v.retriever == "dense" else None,
        retrieval_only=[str(p) for p in extra],
        show_progress=False,
    )
    log.info("database %s ready (%.0f s)", folder.name, time.perf_counter() - t0)
    return folder


def train_config(steps: int, seed: int, **kw: Any) -> Any:
    from retrolm.config import preset_fields
    from retrolm.train import TrainConfig

    settings: dict[str, Any] = dict(
        model=preset_fields("quickstart"),
        max_steps=steps,
        batch_size=8,
        seq_len=256,
        num_neighbours=2,
        lr=3e-3,
        warmup_steps=max(5, min(30, steps // 10)),
        eval_every=0,
        checkpoint_every=steps,
        seed=seed,
    )
    return TrainConfig(**(settings | kw))


def with_overrides(cfg: Any, settings: list[str]) -> Any:
    """`cfg` with FIELD=VALUE settings (`model.FIELD` for the model); values parsed as JSON
    where they parse (numbers, true/false, lists), else kept as strings."""
    import dataclasses

    train_kw: dict[str, Any] = {}
    model_kw: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE (e.g. lr=1e-3)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("model."):
            model_kw[key[len("model.") :]] = value
        else:
            train_kw[key] = value
    fields = {f.name for f in dataclasses.fields(cfg)}
    if unknown := sorted(set(train_kw) - fields):
        raise UserError(f"--set: unknown TrainConfig field(s) {unknown}")
    if model_kw:
        train_kw["model"] = {**(cfg.model or {}), **model_kw}
    return dataclasses.replace(cfg, **train_kw)


def timed_train(cfg: Any, db: Path, run: Path) -> float:
    """Train (or reuse a finished run); returns the training wall time as recorded."""
    from retrolm.train import train

    seconds_file = run / "wall_seconds.json"
    if seconds_file.is_file():
        return json.loads(seconds_file.read_text())["seconds"]
    t0 = time.perf_counter()
    train(cfg, db, run, overwrite=run.exists(), show_progress=False)
    seconds = time.perf_counter() - t0
    seconds_file.write_text(json.dumps({"seconds": seconds}))
    return seconds


def run_variant(
    name: str, out: Path, plan: dict[str, list[Path]], args: argparse.Namespace, embedder: Any
) -> dict[str, Any]:
    from retrolm.evaluate import EvalConfig, evaluate_run

    v = VARIANTS[name]
    db = build(out, plan, v, args.seed, embedder)
    base_run = out / "baseline"
    base_seconds = timed_train(train_config(args.steps, args.seed, no_retrieval=True), db, base_run)
    if v.training == "scratch":
        cfg, steps = train_config(args.steps, args.seed), args.steps
    else:
        steps = args.retrofit_steps
        cfg = train_config(steps, args.seed, retrofit=str(base_run), lr=args.retrofit_lr)
    if args.set:
        cfg = with_overrides(cfg, args.set)
    label = name + (f"+{args.tag}" if args.tag else "")
    run = out / f"retro-{label if args.set else name}"  # --eval-k alone: the untagged run
    retro_seconds = timed_train(cfg, db, run)
    t0 = time.perf_counter()
    eval_cfg = EvalConfig(max_tokens=args.eval_tokens, batch_size=8, num_neighbours=args.eval_k)
    figures = evaluate_run(
        run, db, config=eval_cfg, baseline=base_run, show_progress=False
    ).to_dict()
    eval_seconds = time.perf_counter() - t0
    if args.compare:  # they read the database with the baseline: once per database
        cached = out / "results" / f"compare-{db.name}.json"
        if not cached.is_file():
            other = evaluate_run(
                base_run, db, config=eval_cfg, compare=tuple(args.compare), show_progress=False
            ).to_dict()
            assert other["baseline_bpb"] == figures["baseline_bpb"]  # the same scored tokens
            cached.write_text(json.dumps(other, indent=1))
        other = json.loads(cached.read_text())
        for c in args.compare:
            figures[f"{c}_bpb"] = other[f"{c}_bpb"]
            for alpha, row in figures["filtered"].items():
                row[f"{c}_bpb"] = other["filtered"][alpha].get(f"{c}_bpb")
        figures["comparators"] = other.get("comparators", {})
    info = json.loads((db / "manifest.json").read_text())["counts"]
    return {
        "variant": label,
        **v.__dict__,
        "overrides": list(args.set),
        "eval_k": args.eval_k,
        "seed": args.seed,
        "steps": steps,
        "baseline_steps": args.steps,
        "retro_bpb": figures.get("retro_bpb"),
        "retro_off_bpb": figures.get("retro_off_bpb"),
        "baseline_bpb": figures.get("baseline_bpb"),
        **{f"{c}_bpb": figures.get(f"{c}_bpb") for c in args.compare},
        "gain": 1 - figures["retro_bpb"] / figures["baseline_bpb"],
        "filtered": figures["filtered"],
        "eval_tokens": figures["tokens"],
        "eval_documents": figures["documents"],
        "database_chunks": info["chunks"],
        "indexed_chunks": info["train_chunks"] + info.get("retrieval_chunks", 0),
        "train_seconds": {"baseline": round(base_seconds, 1), "retro": round(retro_seconds, 1)},
        "eval_seconds": round(eval_seconds, 1),
        "comparators": figures.get("comparators", {}),
    }


def equal_compute(out: Path, plan: dict[str, list[Path]], args: argparse.Namespace) -> dict:
    """The baseline trained for as long as RETRO (from scratch) trains: its steps scaled by the
    ratio of a RETRO step to a baseline step, measured side by side now (wall times of runs made
    at different moments of a shared machine's load are not comparable)."""
    from retrolm.config import RetroConfig
    from retrolm.evaluate import EvalConfig, evaluate_run
    from retrolm.quickstart import measure_train_step

    scratch = [n for n in args.variants if VARIANTS[n].training == "scratch"]
    retro_cfg = RetroConfig.preset("quickstart", vocab_size=8192)
    base_cfg = RetroConfig.preset("quickstart", vocab_size=8192, cca_layers=())
    t_retro = min(measure_train_step(retro_cfg, 8, 256, 2, bf16=False) for _ in range(2))
    t_base = min(measure_train_step(base_cfg, 8, 256, 2, bf16=False) for _ in range(2))
    ratio = t_retro / t_base
    steps = int(round(args.steps * ratio))
    db = out / f"db-{VARIANTS[scratch[0]].retriever}-{VARIANTS[scratch[0]].database}"
    run = out / "baseline-equal-compute"
    seconds = timed_train(train_config(steps, args.seed, no_retrieval=True), db, run)
    report = evaluate_run(
        run, db, config=EvalConfig(max_tokens=args.eval_tokens, batch_size=8), show_progress=False
    )
    return {
        "variant": "baseline-equal-compute",
        "steps": steps,
        "step_ratio": round(ratio, 3),
        "step_seconds": {"retro": round(t_retro, 4), "baseline": round(t_base, 4)},
        "baseline_bpb": report.to_dict()["baseline_bpb"],
        "filtered": report.to_dict()["filtered"],
        "train_seconds": {"baseline": round(seconds, 1)},
    }


def size_curve(out: Path, plan: dict[str, list[Path]], args: argparse.Namespace) -> dict:
    """One trained RETRO (the first scratch variant) evaluated with retrieval from databases of
    growing size, as in the paper's Figure 1: the training subset, 4x it, the whole corpus.
    The databases share the tokenizer and chunks of the subset, so only the retrieval differs."""
    from retrolm.evaluate import EvalConfig, evaluate_run

    name = args.size_curve_of or next(n for n in args.variants if VARIANTS[n].training == "scratch")
    trained = VARIANTS[name]
    run, points = out / f"retro-{name}", []
    for size in ("subset", "x4", "all"):
        v = Variant(trained.retriever, size, "scratch")
        db = build(out, plan, v, args.seed, None)
        report = evaluate_run(
            run,
            db,
            config=EvalConfig(max_tokens=args.eval_tokens, batch_size=8),
            baseline=out / "baseline",
            show_progress=False,
        ).to_dict()
        counts = json.loads((db / "manifest.json").read_text())["counts"]
        points.append(
            {
                "database": size,
                "indexed_chunks": counts["train_chunks"] + counts.get("retrieval_chunks", 0),
                "retro_bpb": report["retro_bpb"],
                "baseline_bpb": report["baseline_bpb"],
                "gain": 1 - report["retro_bpb"] / report["baseline_bpb"],
            }
        )
    return {"variant": "size-curve", "model": name, "points": points}


def plot_size_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Gain of RETRO[ON] over the baseline against the number of indexed chunks, per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in results:
        xs = [p["indexed_chunks"] for p in curve["points"]]
        ax.plot(xs, [100 * p["gain"] for p in curve["points"]], marker="o", label=label)
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("chunks in the retrieval database")
    ax.set_ylabel("bpb gain of RETRO[ON] over the baseline (%)")
    ax.set_title("Gain against retrieval database size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="stdlib", help="'stdlib' or a folder of text files")
    parser.add_argument("--out", type=Path, help="work folder (reused on rerun)")
    parser.add_argument("--seed", type=int, default=0, help="held-out files, init, data order")
    parser.add_argument("--subset-mb", type=float, default=3.5, help="training subset, MB")
    parser.add_argument("--steps", type=int, default=500, help="steps of baseline and RETRO")
    parser.add_argument("--retrofit-steps", type=int, default=250, help="steps of a retrofit")
    parser.add_argument("--retrofit-lr", type=float, default=3e-3)
    parser.add_argument("--eval-tokens", type=int, default=131072)
    parser.add_argument(
        "--variants", nargs="+", default=["minilm", "bm25", "bm25-all"], choices=list(VARIANTS)
    )
    parser.add_argument("--compare", nargs="*", default=[], choices=["ralm", "knnlm"])
    parser.add_argument("--equal-compute", action="store_true", help="add the equal-compute row")
    parser.add_argument(
        "--size-curve",
        action="store_true",
        help="evaluate the first scratch RETRO with retrieval "
        "from the subset, 4x and the whole corpus (the paper's Figure 1)",
    )
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar="LABEL=DIR",
        help="only draw the size curves of finished --size-curve runs (their "
        "results/size-curve*.json files) into --out/gain_vs_database.png",
    )
    parser.add_argument(
        "--size-curve-of",
        choices=list(VARIANTS),
        help="the trained variant of --size-curve (default: the first scratch variant)",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="LABEL=DIR",
        help="only print a Markdown table of the finished variants of these work folders",
    )
    parser.add_argument("--tag", help="label of the RETRO run's --set / --eval-k (VARIANT+TAG)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override of the RETRO run's TrainConfig (model.FIELD: its RetroConfig); with --tag",
    )
    parser.add_argument("--eval-k", type=int, help="neighbours read at evaluation (default: k)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.ERROR)  # one line per empty query otherwise
    if args.out is None and not args.table:
        print("retrieval_gain.py: --out DIR is required", file=sys.stderr)
        return 2
    if args.steps <= 0 or args.retrofit_steps <= 0 or args.subset_mb <= 0:
        print("retrieval_gain.py: --steps, --retrofit-steps and --subset-mb must be > 0",
              file=sys.stderr)  # fmt: skip
        return 2
    if (args.set or args.eval_k) and not args.tag:
        print("retrieval_gain.py: --set and --eval-k need --tag LABEL (the results' name)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.eval_k is not None and args.eval_k <= 0:
        print("retrieval_gain.py: --eval-k must be > 0", file=sys.stderr)
        return 2
    if args.table:
        print(markdown_table([(spec.split("=", 1)[0], Path(spec.split("=", 1)[1]))
                              for spec in args.table]))  # fmt: skip
        return 0
    if args.plot:
        curves = [(spec.split("=", 1)[0], json.loads(Path(spec.split("=", 1)[1]).read_text()))
                  for spec in args.plot]  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        plot_size_curves(curves, args.out / "gain_vs_database.png")
        print(args.out / "gain_vs_database.png")
        return 0
    try:
        if args.set:  # bad overrides are refused before anything is built or trained
            from retrolm.config import RetroConfig

            RetroConfig.preset("quickstart", **with_overrides(train_config(1, 0), args.set).model)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results").mkdir(exist_ok=True)
        plan = corpus_plan(args.corpus, int(args.subset_mb * 1e6), args.seed)
        embedder = None
        if any(VARIANTS[n].retriever == "dense" for n in args.variants):
            from retrolm.database.embed import load_embedder

            embedder = load_embedder("default")
        results: dict[str, Any] = {}
        names = list(args.variants) + (["baseline-equal-compute"] if args.equal_compute else [])
        if args.size_curve:
            names.append("size-curve" + (f"-{args.size_curve_of}" if args.size_curve_of else ""))
        for name in names:
            tagged = args.tag and name in VARIANTS
            path = args.out / "results" / (f"{name}+{args.tag}.json" if tagged else f"{name}.json")
            if not path.is_file():
                log.info("== %s", name)
                if name == "baseline-equal-compute":
                    result = equal_compute(args.out, plan, args)
                elif name.startswith("size-curve"):
                    result = size_curve(args.out, plan, args)
                else:
                    result = run_variant(name, args.out, plan, args, embedder)
                path.write_text(json.dumps(result, indent=1))
            results[path.stem] = json.loads(path.read_text())
    except UserError as e:
        print(f"retrieval_gain.py: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json:
        print(json.dumps(results))
    return 0


def markdown_table(folders: list[tuple[str, Path]]) -> str:
    """One row per (corpus, seed, variant): the five bpb figures, the gain, the r<=0.125 bucket."""
    head = (
        "| corpus | seed | variant | indexed chunks | baseline | RETRO[OFF] | RETRO[ON] | RALM | "
        "kNN-LM | ON vs base | r<=0.125: chunks, base / ON / kNN-LM |"
    )
    lines = [head, "|" + "---|" * 11]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for label, folder in folders:
        for path in sorted((folder / "results").glob("*.json")):
            r = json.loads(path.read_text())
            if r.get("variant") in (None, "size-curve"):
                continue
            b = r["filtered"].get("0.125", {})
            gain = f"{-100 * r['gain']:+.1f}%" if "gain" in r else "-"
            lines.append(
                f"| {label} | {r.get('seed', '-')} | {r['variant']} | {r.get('indexed_chunks', '-')} "
                f"| {f(r.get('baseline_bpb'))} | {f(r.get('retro_off_bpb'))} | {f(r.get('retro_bpb'))} "
                f"| {f(r.get('ralm_bpb'))} | {f(r.get('knnlm_bpb'))} | {gain} | {b.get('chunks', '-')}: "
                f"{f(b.get('baseline_bpb'))} / {f(b.get('retro_bpb'))} / {f(b.get('knnlm_bpb'))} |"
            )
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    cols = ["retro_bpb", "retro_off_bpb", "baseline_bpb", "ralm_bpb", "knnlm_bpb"]
    print(
        f"{'variant':>24}" + "".join(f"{c[:-4]:>11}" for c in cols) + f"{'gain':>8}{'r<=.125':>16}"
    )
    for name, r in results.items():
        if name.startswith("size-curve"):
            for p in r["points"]:
                print(f"{'size ' + p['database']:>24} {p['indexed_chunks']:>9} chunks: RETRO[ON] "
                      f"{p['retro_bpb']:.4f}, gain {100 * p['gain']:.1f}%")  # fmt: skip
            continue
        vals = "".join(f"{r[c]:>11.4f}" if r.get(c) else f"{'-':>11}" for c in cols)
        f = r["filtered"].get("0.125", {})
        bucket = f"{f.get('retro_bpb') or 0:.4f}/{f.get('baseline_bpb') or 0:.4f}"
        gain = f"{100 * r['gain']:>7.1f}%" if "gain" in r else f"{'':>8}"
        print(f"{name:>24}{vals}{gain}{bucket:>16}")


if __name__ == "__main__":
    sys.exit(main())
