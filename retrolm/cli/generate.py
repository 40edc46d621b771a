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
        "are listed (document, score, snippet).",
    )
    p.add_argument("run", type=Path, help="training run folder")
    p.add_argument("prompt", nargs="?", help="text to continue (or give --prompt-file)")
    p.add_argument(
        "--prompt-file",
        type=Path,
        help="read the prompt from this UTF-8 text file ('-': standard input)",
    )
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
    _late_prompt(p)


def _late_prompt(p: argparse.ArgumentParser) -> None:
    """Let the optional PROMPT come after the options (`generate RUN --db DB PROMPT`).

    argparse gives an optional positional nothing when an option follows the one before it,
    and leaves the later text unrecognised; that text is the prompt.
    """
    parse = p.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = parse(args, namespace)
        if namespace.prompt is None and extras and not extras[0].startswith("-"):
            namespace.prompt = extras.pop(0)
        return namespace, extras

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from retrolm.generate import generate_text

    args.prompt = _prompt(args)
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


def _prompt(args: argparse.Namespace) -> str:
    """The prompt: the argument, or the text of --prompt-file.

    Raises:
        InputError: neither or both given; a file that is missing, unreadable or not UTF-8 text.
    """
    from retrolm.errors import InputError

    if (args.prompt is None) == (args.prompt_file is None):
        raise InputError("give the prompt either as an argument or with --prompt-file, one of them")
    if args.prompt_file is None:
        return args.prompt
    path = args.prompt_file
    if str(path) == "-":
        data, where = sys.stdin.buffer.read(), "standard input"
    else:
        if path.is_dir():
            raise InputError(f"--prompt-file {path} is a folder; give a text file")
        if not path.is_file():
            raise InputError(f"--prompt-file {path} does not exist; give a text file")
        data, where = path.read_bytes(), f"--prompt-file {path}"
    if b"\x00" in data:
        raise InputError(f"{where} is binary (it holds NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); give "
            "a UTF-8 text file"
        ) from e


def _check_args(args: argparse.Namespace) -> None:
    """Refuse a bad prompt, sampling setting or device as a user's error, before the model is
    loaded and anything is printed."""
    from retrolm.errors import InputError
    from retrolm.generate import check_prompt_text, check_settings
    from retrolm.runs import resolve_device

    if not args.prompt:
        raise InputError("the prompt is empty; give some text to continue")
    check_prompt_text(args.prompt)
    check_settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_neighbours=args.neighbours,
    )
    resolve_device(args.device)
