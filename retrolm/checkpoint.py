"""Training checkpoints: one folder per step, written atomically, and a pointer to the latest.

Layout inside a run folder::

    checkpoints/step-00000100/model/      model.save() (retrolm.weights): config.json + model.safetensors
    checkpoints/step-00000100/trainer.pt  optimizer state and RNG states (torch.save)
    checkpoints/step-00000100/state.json  step, sampler position, tokens seen, and the sha256
                                          of every other file of the checkpoint ("files")
    checkpoints/latest.json               {"step": 100, "name": "step-00000100"}

A step folder appears complete or not at all (`retrolm.io.atomic_dir`), and `latest.json` is
replaced only after its folder is in place, so a kill at any moment of a save leaves the
previous checkpoint as the latest, readable one. A checkpoint damaged later (a truncated or
altered file) fails its checksums: `latest_checkpoint` then falls back, with a warning, to the
newest checkpoint that is intact. Checkpoints are ordered by their step number, never by name.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from retrolm.errors import CorruptArtifactError
from retrolm.io import atomic_dir, read_json, remove_stale_tmp, sha256_file, write_guard, write_json

log = logging.getLogger(__name__)

LATEST = "latest.json"
STATE = "state.json"
REQUIRED = ("model", "trainer.pt", STATE)
_STEP = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    """The step number of a checkpoint folder name, or None for anything else."""
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def save_checkpoint(
    folder: Path,
    step: int,
    model: Any,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` into `folder` (the run's `checkpoints/`), then prune old ones.

    Args:
        folder: the checkpoints folder of the run.
        step: optimizer steps completed.
        model: anything with `save(folder)` (a `RETRO`).
        trainer_state: tensors and plain values for `torch.save` (optimizer, RNG states).
        state: JSON-serialisable values (sampler position, tokens seen).
        keep: number of most recent checkpoints kept (>= 1).

    Returns:
        The checkpoint's folder.

    Raises:
        WriteError: the disk is full or the folder unwritable (the previous checkpoint is kept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_name(step)
    with atomic_dir(final) as tmp, write_guard(final):
        model.save(tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        files = {
            f.relative_to(tmp).as_posix(): sha256_file(f)
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        write_json(tmp / STATE, {"step": step, **state, "files": files})
    write_json(folder / LATEST, {"step": step, "name": final.name})
    _prune(folder, keep, step)
    return final


def _steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder, by step number."""
    found = [(step_of(p), p) for p in folder.glob("step-*") if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the checkpoint folders in `folder`, lowest first (none if it is absent)."""
    return [s for s, _ in _steps(folder)] if folder.is_dir() else []


def _prune(folder: Path, keep: int, newest: int) -> None:
    """Keep the `keep` checkpoints of highest step up to `newest` (the one just written)."""
    steps = [(s, p) for s, p in _steps(folder) if s <= newest]
    for _, old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_tmp(folder)


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint folder `path` is intact, else what is wrong with it.

    A checkpoint records the sha256 of each of its files in `state.json`; one written before
    checksums were recorded is accepted when its files are present.
    """
    missing = [f for f in REQUIRED if not (path / f).exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        state = read_json(path / STATE)
    except (OSError, ValueError) as e:
        return f"{STATE} unreadable ({e})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE} holds no step"
    for name, digest in (state.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if sha256_file(file) != digest:
            return f"{name} is damaged (its checksum differs from the one recorded)"
    return None


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest intact checkpoint folder, or None when there is none.

    Checkpoints are tried from the highest step down, each damaged one skipped with a warning.
    `latest.json` is not needed to choose: a kill between a step folder's rename and the
    pointer's update leaves a complete, newer checkpoint, which is the one to use.

    Raises:
        CorruptArtifactError: there are checkpoints, and every one is damaged.
    """
    candidates = [p for _, p in reversed(_steps(folder))] if folder.is_dir() else []
    if not candidates:
        return None
    problems = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            for damaged, why in problems:
                log.warning(
                    "checkpoint %s is damaged (%s); using the newest intact one, %s",
                    damaged.name,
                    why,
                    path.name,
                )
            return path
        problems.append((path, problem))
    detail = "; ".join(f"{p.name}: {why}" for p, why in problems)
    raise CorruptArtifactError(
        f"every checkpoint in {folder} is damaged ({detail}); nothing can be resumed from them: "
        "start the run over with --overwrite, or into another --out"
    )


def discard_after(folder: Path, step: int) -> list[Path]:
    """Before resuming from `step`: set `latest.json` to it and set aside newer (damaged)
    checkpoints as `damaged-step-N`, so that they are neither pruned for nor taken for newer
    ones. Returns the folders set aside."""
    aside = []
    for s, path in _steps(folder):
        if s > step:
            target = folder / f"damaged-{path.name}"
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            aside.append(target)
            log.warning("set aside the damaged checkpoint %s as %s", path.name, target.name)
    pointer = folder / LATEST
    if not pointer.is_file() or _pointer_step(pointer) != step:
        write_json(pointer, {"step": step, "name": step_name(step)})
    return aside


def _pointer_step(pointer: Path) -> int | None:
    try:
        return int(read_json(pointer)["step"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


def load_checkpoint_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, state) of the checkpoint folder `path`.

    Raises:
        CorruptArtifactError: `trainer.pt` cannot be read.
    """
    try:
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip, EOF and runtime errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = first if 0 < len(first) <= 160 else f"{type(e).__name__}: not a readable torch file"
        raise CorruptArtifactError(
            f"cannot read {path / 'trainer.pt'} ({why}); the checkpoint is damaged: start "
            "the run over with --overwrite, or into another --out"
        ) from e
    if not isinstance(trainer_state, dict) or "optimizer" not in trainer_state:
        raise CorruptArtifactError(
            f"{path / 'trainer.pt'} holds no optimizer state; the checkpoint is damaged: start "
            "the run over with --overwrite, or into another --out"
        )
    return trainer_state, read_json(path / STATE)
