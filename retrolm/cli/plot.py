"""`retrolm plot`: loss curves of several runs on one figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plot",
        help="plot train and validation loss of runs",
        description="Train (solid) and validation (dashed) loss of one or more runs on one figure.",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.add_argument("--out", type=Path, required=True, help="image file (.png, .svg, .pdf)")
    p.add_argument("--labels", nargs="+", help="legend names, one per run")
    p.add_argument("--x", default="tokens", choices=("tokens", "step"))
    p.add_argument(
        "--smooth",
        type=int,
        help="moving-average window of the train loss (default: 1/40 of the run; 1: raw only)",
    )
    p.add_argument("--title")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from retrolm.io import check_writable
    from retrolm.plot import plot_runs

    _check_format(args.out)
    check_writable(args.out)
    out = plot_runs(
        args.runs, args.out, labels=args.labels, x=args.x, smooth=args.smooth, title=args.title
    )
    print(out)
    return 0


def _check_format(out: Path) -> None:
    from matplotlib.figure import Figure

    from retrolm.errors import InputError

    formats = Figure().canvas.get_supported_filetypes()
    suffix = out.suffix.lstrip(".").lower() or "png"
    if suffix not in formats:
        raise InputError(
            f"--out {out}: cannot write .{suffix} images; use one of "
            + ", ".join(f".{f}" for f in sorted(formats))
        )
