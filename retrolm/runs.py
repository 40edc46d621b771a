"""Run folders: their file names, and the helpers that train, eval, generate and serve share.

A run folder (written by `retrolm.train`) holds::

    train_config.json   the TrainConfig it was started with
    run.json            the database it trains on (path, tokenizer hash, chunk size) and the model
                        config
    metrics.jsonl       one JSON object per logged step / validation
    checkpoints/        see retrolm.checkpoint
    model/              the final model (retrolm.weights), written when training completes
    tensorboard/        TensorBoard events (with --tensorboard)

These names (`RUN_ARTIFACTS`), their temporary files and the lock file are all a run writes:
anything else in the folder is the user's, and `--overwrite` leaves it alone.

This module opens and checks what a run depends on (device, database, model) without importing
the training loop, so that evaluation, generation and serving need nothing from `retrolm.train`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrolm.checkpoint import checkpoint_steps, latest_checkpoint, step_name, verify_checkpoint
from retrolm.data import ChunkSource
from retrolm.errors import ConfigError, CorruptArtifactError, InputError, MismatchError
from retrolm.io import TMP_MARK, read_json

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
RUN_ARTIFACTS = (CONFIG_FILE, RUN_FILE, METRICS_FILE, MODEL_DIR, CHECKPOINTS_DIR, TENSORBOARD_DIR)
# the probe file `retrolm.io.check_writable` creates and removes at once
_PROBE = ".write-check" + TMP_MARK


def is_run_temp(path: Path) -> bool:
    """A temporary file (or folder) that a killed writer of a run artifact left behind."""
    name = path.name
    return name.startswith(_PROBE) or any(name.startswith(a + TMP_MARK) for a in RUN_ARTIFACTS)


def is_run_artifact(path: Path) -> bool:
    """A file or folder a run writes into its folder (`RUN_ARTIFACTS`) or a temporary one of
    them; the lock file is neither."""
    return path.name in RUN_ARTIFACTS or is_run_temp(path)


def read_run_json(path: Path, hint: str) -> dict[str, Any]:
    """A JSON object file of a run folder (`train_config.json`, `run.json`).

    Raises:
        CorruptArtifactError: it is not a readable JSON object; `hint` says what to do.
    """
    try:
        data = read_json(path)
    except ValueError as e:  # invalid JSON or UTF-8
        raise CorruptArtifactError(f"{path} is damaged ({_first_line(e)}); {hint}") from e
    if not isinstance(data, dict):
        raise CorruptArtifactError(
            f"{path} is damaged (a JSON {type(data).__name__}, not an object); {hint}"
        )
    return data


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device cuda requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def open_database(db: str | Path | ChunkSource) -> ChunkSource:
    """A database path (opened) or an already opened chunk source."""
    if isinstance(db, (str, Path)):
        from retrolm.database import Database

        if not Path(db).exists():
            raise InputError(f"database {db} does not exist; build one with `retrolm db build`")
        return Database.open(db)
    return db


def database_facts(db: ChunkSource) -> dict[str, Any]:
    """What a run must remember of its database to check another one against it later."""
    tokenizer = getattr(db, "tokenizer", None)
    return {
        "path": str(Path(db.path).resolve()) if hasattr(db, "path") else None,
        "tokenizer_sha256": getattr(tokenizer, "sha256", None),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "chunk_size": int(db.chunk_size),
        "pad_id": int(db.pad_id),
        "num_chunks": int(db.num_chunks) if hasattr(db, "num_chunks") else None,
        "stored_neighbours": stored_neighbours(db),
    }


def stored_neighbours(db: ChunkSource) -> int:
    """K, the neighbours the database stores per chunk (0 for a database of no chunks)."""
    if not getattr(db, "num_chunks", 1):
        return 0
    ids, _ = db.neighbours(np.zeros(1, dtype=np.int64))
    return int(ids.shape[-1])


def check_same_database(run_db: dict[str, Any], db: ChunkSource, where: str) -> None:
    """On resume: refuse a database other than the run's (same tokenizer, other chunks).

    Raises:
        MismatchError: the chunk count differs.
    """
    now = database_facts(db)
    if run_db.get("num_chunks") is not None and now["num_chunks"] != run_db["num_chunks"]:
        raise MismatchError(
            f"{where} was started on a database of {run_db['num_chunks']} chunks "
            f"({run_db.get('path')}), but {now['path']} has {now['num_chunks']}: it is another "
            "database, or one extended since; resume with the database the run started with "
            "(--db), or start a new run"
        )


def neighbours_read(requested: int | None, mcfg: Any) -> int:
    """k, the neighbours a model reads per chunk when it is used (eval, generate, serve): the
    number asked for (`--neighbours`), or the k it was trained with."""
    return requested or mcfg.num_neighbours


def check_model_database(mcfg: Any, facts: dict[str, Any], k: int) -> None:
    """Refuse a model that cannot read this database, before any file is written.

    Raises:
        ConfigError: chunk size, neighbour length, vocabulary or pad id disagree with the
            database, or more neighbours are asked for than it stores.
    """
    m, where = facts["chunk_size"], facts.get("path") or "the database"
    if mcfg.chunk_size != m:
        raise ConfigError(
            f"RetroConfig.chunk_size is {mcfg.chunk_size}, but {where} has chunks of {m} "
            "tokens; a model reads the database's chunks: drop the chunk_size override (or "
            "build a database with --chunk-size)"
        )
    if mcfg.cca_layers and mcfg.neighbour_len != 2 * m:
        raise ConfigError(
            f"RetroConfig.neighbour_len is {mcfg.neighbour_len}, but the neighbours of {where} "
            f"are {2 * m} tokens (a chunk and its continuation); drop the neighbour_len override"
        )
    vocab = facts.get("vocab_size")
    if vocab and mcfg.vocab_size < vocab:
        raise ConfigError(
            f"RetroConfig.vocab_size is {mcfg.vocab_size}, but the tokenizer of {where} has "
            f"{vocab} tokens; drop the vocab_size override (or use at least {vocab})"
        )
    if mcfg.pad_id != facts["pad_id"]:
        raise ConfigError(
            f"RetroConfig.pad_id is {mcfg.pad_id}, but {where} pads with {facts['pad_id']}; "
            "drop the pad_id override"
        )
    stored = facts.get("stored_neighbours")
    if k and stored is not None and k > stored:
        raise ConfigError(
            f"{k} neighbours per chunk asked for (--neighbours / num_neighbours), but {where} "
            f"stores {stored}; use --neighbours {stored} or fewer, or build the database with "
            f"--neighbours {k}"
        )


def check_database(run_db: dict[str, Any], db: ChunkSource, where: str) -> None:
    """Refuse a database whose tokenizer or chunk size differs from the run's.

    Raises:
        MismatchError: naming the setting that differs.
    """
    now = database_facts(db)
    for key in ("tokenizer_sha256", "chunk_size", "pad_id"):
        if run_db.get(key) is not None and now[key] != run_db[key]:
            raise MismatchError(
                f"{where} was trained with {key}={run_db[key]}, but the database "
                f"{now['path']} has {key}={now[key]}; use a database built with the same "
                "tokenizer and chunk size"
            )


def finished_model(run: Path) -> Path:
    """The final model folder of a finished run.

    Raises:
        InputError: `run` is not a run folder or has not finished.
    """
    if run.exists() and not run.is_dir():
        raise InputError(f"{run} is a file, not a run folder; give the folder of a training run")
    if not run.is_dir():
        raise InputError(f"run folder {run} does not exist")
    if not (run / MODEL_DIR / "config.json").is_file():
        hint = "resume it with `retrolm train --out RUN --resume`"
        if not (run / CONFIG_FILE).is_file():
            hint = "train one with `retrolm train`"
        raise InputError(f"{run} holds no finished model ({run / MODEL_DIR} missing); {hint}")
    return run / MODEL_DIR


def read_run_meta(run: str | Path) -> dict[str, Any]:
    """The run.json of a run folder.

    Raises:
        InputError: not a run folder; CorruptArtifactError: a run.json that is not a readable
            record of the run.
    """
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise InputError(f"{run} is a file, not a run folder; give the folder of a training run")
    if not run.is_dir():
        raise InputError(f"run folder {run} does not exist; train one with `retrolm train`")
    if not (run / RUN_FILE).is_file():
        if (run / CONFIG_FILE).is_file():
            raise InputError(
                f"{run} holds a run stopped before it recorded its database ({RUN_FILE} "
                f"missing); train it with `retrolm train --out {run} --db DB`"
            )
        raise InputError(f"{run} is not a retrolm run folder ({RUN_FILE} missing)")
    meta = read_run_json(
        run / RUN_FILE,
        "it records the run's database and model; restore it, or train the run again "
        "(`retrolm train --overwrite`)",
    )
    if not isinstance(meta.get("database"), dict):
        raise CorruptArtifactError(
            f"{run / RUN_FILE} is damaged (no database recorded); restore it, or train the run "
            "again (`retrolm train --overwrite`)"
        )
    return meta


def load_run_model(
    run: str | Path, *, allow_unfinished: bool = True, checkpoint: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """(model, run.json) of a run: its final model, or its latest checkpoint if unfinished, or
    the model of the checkpoint of step `checkpoint`.

    Raises:
        InputError: no run folder, nothing saved yet, or no intact checkpoint of that step.
    """
    from retrolm.hf import load_model_folder  # a RETRO folder, or a RETRO-fitted HF model

    run = Path(run)
    meta = read_run_meta(run)
    if checkpoint is not None:
        return load_model_folder(checkpoint_folder(run, checkpoint) / "model"), meta
    if (run / MODEL_DIR / "config.json").is_file():
        return load_model_folder(run / MODEL_DIR), meta
    ckpt = latest_checkpoint(run / "checkpoints") if allow_unfinished else None
    if ckpt is None:
        raise InputError(f"{run} has no saved model yet; train it (or resume it) first")
    log.warning("%s is unfinished; using its latest checkpoint %s", run, ckpt.name)
    return load_model_folder(ckpt / "model"), meta


def checkpoint_folder(run: Path, step: int) -> Path:
    """The intact checkpoint of `step` in a run.

    Raises:
        InputError: there is none (naming the steps there are), or it is damaged.
    """
    folder = run / "checkpoints" / step_name(step)
    if not folder.is_dir():
        kept = [str(s) for s in checkpoint_steps(run / "checkpoints")]
        raise InputError(
            f"{run} has no checkpoint of step {step} (it keeps "
            f"{', '.join(kept) if kept else 'none'}); give one of those steps, or train with "
            "a smaller --checkpoint-every and a larger --keep-checkpoints"
        )
    problem = verify_checkpoint(folder)
    if problem is not None:
        raise InputError(f"checkpoint {folder} is damaged ({problem}); give another step")
    return folder


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a line cut short by a kill, or damaged, is
    skipped)."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist; is {run} a training run folder?")
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records
