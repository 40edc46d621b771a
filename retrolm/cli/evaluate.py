"""`retrolm eval`: bits per byte of a run, RETRO[ON] / RETRO[OFF] / baseline, leakage buckets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="bits per byte on held-out documents, with and without retrieval",
        description="Evaluate a run on a database's held-out documents: bits per byte with "
        "retrieval (RETRO[ON]), without (RETRO[OFF]), the --baseline run's, and the same over "
        "chunks whose leakage r(C) <= alpha. --db may be another database with the same "
        "tokenizer and chunk size.",
    )
    p.add_argument("run", type=Path, help="training run folder")
    p.add_argument("--db", type=Path, required=True, help="database folder")
    p.add_argument("--split", default="valid", choices=("valid", "train"))
    p.add_argument(
        "--checkpoint",
        type=int,
        metavar="STEP",
        help="score the model of this step's checkpoint (default: the final model)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="a no-retrieval run, or the Hugging Face model folder a run was RETRO-fitted on, to "
        "compare with",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="NAME",
        help="also score the --baseline model with the same database: ralm (In-Context RALM, "
        "the retrieved text prepended in its context), knnlm (kNN-LM over its hidden states)",
    )
    p.add_argument(
        "--window", type=int, help="tokens per window (default: the training sequence length)"
    )
    p.add_argument("--stride", type=int, help="tokens a window moves (default window/2)")
    p.add_argument("--neighbours", type=int, help="k neighbours per chunk (default training k)")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON report to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run, interrupt_hint="nothing was written; rerun the command")


def run(args: argparse.Namespace) -> int:
    from retrolm.evaluate import EvalConfig, evaluate_run
    from retrolm.io import check_writable, write_json

    if args.out:  # before the evaluation, whose result would otherwise be lost
        check_writable(args.out)
    config = EvalConfig(
        split=args.split,
        window=args.window,
        stride=args.stride,
        num_neighbours=args.neighbours,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        bf16=args.bf16,
        device=args.device,
    )
    report = evaluate_run(
        args.run,
        args.db,
        config=config,
        baseline=args.baseline,
        compare=tuple(args.compare),
        checkpoint=args.checkpoint,
        show_progress=not args.no_progress,
    )
    if args.out:
        write_json(args.out, report.to_dict())
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0
