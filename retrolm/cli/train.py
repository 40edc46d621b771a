"""`retrolm train`: flags -> TrainConfig -> `retrolm.train.train`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from retrolm.config import PRESETS
from retrolm.errors import InputError

# flag dest -> TrainConfig field
_FIELDS = {
    "preset": "preset",
    "steps": "max_steps",
    "tokens": "max_tokens",
    "seq_len": "seq_len",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "neighbours": "num_neighbours",
    "lr": "lr",
    "min_lr_ratio": "min_lr_ratio",
    "warmup": "warmup_steps",
    "weight_decay": "weight_decay",
    "clip": "grad_clip",
    "bf16": "bf16",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "eval_every": "eval_every",
    "eval_batches": "eval_batches",
    "no_retrieval": "no_retrieval",
    "retrofit": "retrofit",
    "neighbour_dropout": "neighbour_dropout",
    "device": "device",
    "tensorboard": "tensorboard",
    "minutes": "minutes",
}


# TrainConfig fields of real numbers: a config file's `lr: 1e-3` is a string to YAML 1.1
_NUMBERS = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip")
_NUMBERS += ("neighbour_dropout", "minutes")


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text  # TrainConfig names the field and the value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a RETRO model (or the no-retrieval baseline) on a database",
        description="Train a RETRO model on a database's train split. Flags override the "
        "--config file, which overrides the defaults. A run folder is refused if it holds "
        "another run, unless --resume or --overwrite; a run stopped before its first "
        "checkpoint is started again.",
    )
    p.add_argument("--db", type=Path, help="database folder (default on --resume: the run's)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig fields")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default small)")
    p.add_argument(
        "--model", action="append", metavar="FIELD=VALUE", help="override a RetroConfig field"
    )
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps")
    steps.add_argument("--tokens", type=int, help="training tokens (rounded up to whole steps)")
    p.add_argument(
        "--minutes",
        type=float,
        help="wall-time budget: the steps that fit are decided from the first steps' measured "
        "time (--steps / --tokens stay the upper bound) and kept on --resume",
    )
    p.add_argument("--seq-len", type=int, help="tokens per sample (default: max_seq_len)")
    p.add_argument("--batch-size", type=int, help="sequences per step, all processes together")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--neighbours", type=int, help="k neighbours per chunk")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip", type=float, help="max gradient norm (0: off)")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints kept")
    p.add_argument("--eval-every", type=int, help="steps between validation losses (0: off)")
    p.add_argument("--eval-batches", type=int, help="validation batches")
    p.add_argument(
        "--no-retrieval", action="store_true", default=None, help="train the baseline decoder"
    )
    p.add_argument(
        "--retrofit",
        help="finished baseline run or Hugging Face model folder: freeze it, train encoder + CCA",
    )
    p.add_argument(
        "--neighbour-dropout", type=float, help="share of samples trained without neighbours"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tensorboard", action="store_true", default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in --out first (only the files a run writes; others are kept)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def build_config(args: argparse.Namespace, base: dict[str, Any] | None) -> Any:
    """TrainConfig from defaults < base (config file or stored run) < given flags."""
    from retrolm.train import TrainConfig

    values: dict[str, Any] = dict(base or {})
    for dest, name in _FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            values[name] = value
            if name in ("max_steps", "max_tokens"):  # one replaces the other
                values.pop("max_tokens" if name == "max_steps" else "max_steps", None)
    for name, value in list(values.items()):
        if name in _NUMBERS and isinstance(value, str):
            values[name] = _number(value)
    for item in args.model or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--model {item!r}: expected FIELD=VALUE, e.g. --model dec_depth=4")
        values.setdefault("model", {})
        values["model"] = {**values["model"], key: _parse_value(value)}
    return TrainConfig.from_dict(values)


def _read_config_file(path: Path) -> dict[str, Any]:
    import yaml

    if path.is_dir():
        raise InputError(f"config file {path} is a folder; give a YAML or JSON file")
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"config file {path} is not UTF-8 text (byte {e.start}); give a YAML or JSON file"
        ) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"cannot parse {path}: {_yaml_problem(e)}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of TrainConfig fields")
    return data


def _yaml_problem(e: Exception) -> str:
    """One line of a YAML error: the problem and where (PyYAML's text spans several lines)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def run(args: argparse.Namespace) -> int:
    from retrolm.errors import CorruptArtifactError
    from retrolm.runs import RUN_FILE, read_run_meta
    from retrolm.train import check_run_flags, stored_config, train

    # what a Ctrl-C leaves is resumed with --resume (the same command without it is refused)
    args.interrupt_hint = (
        f"continue from the last checkpoint with `retrolm train --out {args.out} --resume`"
    )
    check_run_flags(args.out, args.resume, args.overwrite)
    stored = stored_config(args.out, warn=False) if args.resume else None
    if stored is not None:
        base = stored
        if args.config is not None:
            base.update(_read_config_file(args.config))
    else:
        base = _read_config_file(args.config) if args.config else None
    config = build_config(args, base)
    db = args.db
    if db is None and args.resume and (args.out / RUN_FILE).is_file():
        try:
            db = read_run_meta(args.out)["database"].get("path")
        except CorruptArtifactError as e:
            raise InputError(
                f"{args.out / RUN_FILE}, which names the run's database, is damaged; give the "
                "database the run started with: --db DB"
            ) from e
    if db is None:
        if args.resume and stored is None:
            raise InputError(
                f"{args.out} holds no run to resume; start one with --db DB (without --resume)"
            )
        elif args.resume:
            raise InputError(
                f"{args.out} holds a run that stopped before it recorded its database; give "
                "it with --db DB"
            )
        else:
            raise InputError("--db is required to start a run")
    out = train(
        config,
        db,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    print(out / "model")
    return 0
