"""`retrolm train`: flags -> TrainConfig -> `retrolm.train.train`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from retrolm.cli.flags import add_config_flags, flag_error
from retrolm.config import PRESETS, TrainConfig
from retrolm.errors import ConfigError, InputError

# TrainConfig fields that are flags (`--field-name`, or the name in FLAG_NAMES); a flag not
# given is None, so that it overrides the config file only when given
TRAIN_FLAGS = (
    "preset", "seq_len", "batch_size", "grad_accum", "num_neighbours", "lr", "min_lr_ratio",
    "warmup_steps", "weight_decay", "grad_clip", "bf16", "seed", "checkpoint_every",
    "keep_checkpoints", "eval_every", "eval_batches", "no_retrieval", "retrofit",
    "neighbour_dropout", "device", "tensorboard", "minutes",
)  # fmt: skip
STEP_FLAGS = ("max_steps", "max_tokens")  # one or the other
FLAG_NAMES = {
    "max_steps": "--steps",
    "max_tokens": "--tokens",
    "num_neighbours": "--neighbours",
    "warmup_steps": "--warmup",
    "grad_clip": "--clip",
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
    p.add_argument(
        "--model", action="append", metavar="FIELD=VALUE", help="override a RetroConfig field"
    )
    steps = p.add_mutually_exclusive_group()
    add_config_flags(steps, TrainConfig, STEP_FLAGS, flags=FLAG_NAMES, unset=True)
    add_config_flags(
        p,
        TrainConfig,
        TRAIN_FLAGS,
        flags=FLAG_NAMES,
        unset=True,
        preset={"help": f"model size: {', '.join(PRESETS)} (default small)"},
        no_retrieval={"action": "store_true"},
        device={"choices": ("auto", "cpu", "cuda")},
    )
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
    values: dict[str, Any] = dict(base or {})
    given = tuple(n for n in (*STEP_FLAGS, *TRAIN_FLAGS) if getattr(args, n) is not None)
    for name in given:
        values[name] = getattr(args, name)
        if name in STEP_FLAGS:  # one replaces the other
            values.pop(STEP_FLAGS[1 - STEP_FLAGS.index(name)], None)
    for name, value in list(values.items()):
        if name in _NUMBERS and isinstance(value, str):
            values[name] = _number(value)
    for item in args.model or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--model {item!r}: expected FIELD=VALUE, e.g. --model dec_depth=4")
        values.setdefault("model", {})
        values["model"] = {**values["model"], key: _parse_value(value)}
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as e:
        raise flag_error(e, TrainConfig, given, FLAG_NAMES) from None


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
