"""Training checkpoints: one folder per step, written atomically, and a pointer to the latest.

Layout inside a run folder::

    checkpoints/step-00000100/model/      model.save(): config.json + model.safetensors
    checkpoints/step-00000100/trainer.pt  optimizer state and RNG states (torch.save)
    checkpoints/step-00000100/state.json  step, sampler position, tokens seen
    checkpoints/latest.json               {"step": 100, "name": "step-00000100"}

A step folder appears complete or not at all (`retrolm.io.atomic_dir`), and `latest.json` is
replaced only after its folder is in place, so a kill at any moment of a save leaves the
previous checkpoint as the latest, readable one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from retrolm.errors import CorruptArtifactError
from retrolm.io import atomic_dir, read_json, remove_stale_tmp, write_json

log = logging.getLogger(__name__)

LATEST = "latest.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


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
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_name(step)
    with atomic_dir(final) as tmp:
        model.save(tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        write_json(tmp / "state.json", {"step": step, **state})
    write_json(folder / LATEST, {"step": step, "name": final.name})
    _prune(folder, keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_tmp(folder)


def latest_checkpoint(folder: Path) -> Path | None:
    """The latest complete checkpoint folder, or None when there is none.

    Raises:
        CorruptArtifactError: `latest.json` names a checkpoint that is missing or incomplete.
    """
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    try:
        name = read_json(pointer)["name"]
    except (ValueError, KeyError, OSError) as e:
        raise CorruptArtifactError(f"{pointer} is unreadable ({e}); delete it to restart") from e
    path = folder / name
    missing = [f for f in ("model", "trainer.pt", "state.json") if not (path / f).exists()]
    if missing:
        raise CorruptArtifactError(
            f"checkpoint {path} lacks {missing}; it was damaged after it was written. Delete "
            f"{pointer} to fall back to an older checkpoint or restart with --overwrite"
        )
    return path


def load_checkpoint_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state, state) of the checkpoint folder `path`."""
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return trainer_state, read_json(path / "state.json")
