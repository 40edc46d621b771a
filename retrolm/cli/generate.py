"""`retrolm generate`: sample from a run with retrieval in the loop, show what was retrieved."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt, retrieving from the database at every chunk",
        description="Continue PROMPT with the run's model. Each time a chunk (of the prompt or "
        "of generated text) completes, its text is searched in the database and the neighbours "
        "feed the next chunk. The text streams as it is produced; then the retrieved chunks "
        "are listed (document, distance, snippet).",
    )
    p.add_argument("run", type=Path, help="training run folder")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--db", type=Path, required=True, help="database folder")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neighbours", type=int, help="k neighbours per chunk")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print text and attribution as JSON")
    p.set_defaults(handler=run, interrupt_hint="nothing was written; rerun the command")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from retrolm.generate import generate_text

    _check_args(args)
    stream = not args.json
    if stream:
        _write(args.prompt)
    result = generate_text(
        args.run,
        args.db,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_neighbours=args.neighbours,
        on_text=_write if stream else None,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n\n--- retrieved chunks ---")
        print(result.attribution_text())
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad sampling settings as a user's error, before the model is loaded."""
    from retrolm.errors import InputError

    if args.neighbours is not None and args.neighbours < 1:
        raise InputError(
            f"--neighbours must be at least 1, got {args.neighbours} (leave it out for the "
            "model's training k; a model trained with --no-retrieval generates without any)"
        )
    if not args.temperature >= 0:
        raise InputError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise InputError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must lie in (0, 1], got {args.top_p}")
