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
    p.set_defaults(handler=run)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from retrolm.generate import generate_text

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
