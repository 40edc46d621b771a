"""Model weights on disk: a folder of `config.json` and a safetensors weights file.

The file format, its checks and their error messages: writing and reading a folder, refusing
weights that are not exactly a model's, and refusing a baseline with another decoder. This
module knows no model class; `RETRO.save` / `load` / `from_baseline` and `RetroFitted.save` /
`load` call it. The weights file also carries the config (in its metadata), so a folder whose
two files come from different saves is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from retrolm.config import RetroConfig
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.io import atomic_path, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_META_KEY = "retrolm_config"  # the config, also stored inside the weights file

# decoder settings a baseline must share with the model it is RETRO-fitted into
_DECODER_FIELDS = ("vocab_size", "dec_dim", "dec_depth", "dec_heads", "ff_mult", "pad_id",
                   "use_deepnet", "norm_eps", "rotary_base")  # fmt: skip


def write_model_folder(
    folder: str | os.PathLike[str],
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    weights_file: str = WEIGHTS_FILE,
    meta_key: str = _META_KEY,
) -> Path:
    """Write `config.json` and the weights file into `folder` (each atomically).

    Args:
        config: the model's config as a dict (also stored in the weights file's metadata).
        tensors: name -> tensor, copied to the CPU.
        weights_file, meta_key: another model kind's file names (`retrolm.hf`'s RETRO-fitted
            folders write `retrofit.safetensors`).
    Returns:
        the folder (created if missing).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(folder / weights_file) as tmp:
        save_file(cpu, str(tmp), metadata={meta_key: json.dumps(config, sort_keys=True)})
    write_json(folder / CONFIG_FILE, config)
    return folder


def _same_config(config_class: Any, stored: str, cfg: Any) -> bool:
    """Is the config stored in a weights file `cfg`, read through the same class (so that a
    field added after the save takes its default on both sides)?"""
    try:
        return bool(config_class.from_dict(json.loads(stored)).to_dict() == cfg.to_dict())
    except (ValueError, TypeError, json.JSONDecodeError):
        return False


def read_model_folder(
    folder: Path,
    *,
    config_class: Any = RetroConfig,
    weights_file: str = WEIGHTS_FILE,
    meta_key: str = _META_KEY,
    written_by: str = "RETRO.save",
) -> tuple[Any, dict[str, Tensor]]:
    """The config and the weights (name -> tensor, on the CPU) of a saved model folder.

    The keyword arguments name another model kind's files (`retrolm.hf`'s RETRO-fitted
    folders: `RetrofitConfig`, `retrofit.safetensors`).

    Raises:
        InputError: a file is missing.
        CorruptArtifactError: unreadable files, or the two files come from different saves.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    config_path, weights_path = folder / CONFIG_FILE, folder / weights_file
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(
                f"{path} not found: a saved model folder holds {CONFIG_FILE} and "
                f"{weights_file} (written by {written_by})"
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        cfg = config_class.from_dict(config)
        with safe_open(str(weights_path), framework="pt") as f:
            stored = (f.metadata() or {}).get(meta_key)
        state = load_file(str(weights_path))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CorruptArtifactError(f"cannot read the model in {folder}: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise CorruptArtifactError(f"cannot read {weights_path}: {exc}") from exc
    # both sides through from_dict: a field added after the save (its default) is no mismatch
    if stored is not None and not _same_config(config_class, stored, cfg):
        raise CorruptArtifactError(
            f"{config_path} and {weights_path} come from different saves; save the model again"
        )
    return cfg, state


def check_keys(
    expected: dict[str, Tensor], found: dict[str, Tensor], where: Path, what: str
) -> None:
    """Refuse weights `found` that are not exactly `expected` (same names, same shapes).

    Args:
        expected, found: name -> tensor.
        where, what: named in the error ("{where} does not hold the weights of {what}").
    Raises:
        CorruptArtifactError: listing (the first five) missing, unexpected or misshapen names.
    """
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    if missing or extra or wrong:

        def show(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

        parts = [f"missing: {show(missing)}"] if missing else []
        parts += [f"unexpected: {show(extra)}"] if extra else []
        parts += [f"wrong shape: {show(wrong)}"] if wrong else []
        raise CorruptArtifactError(
            f"{where} does not hold the weights of {what} ({'; '.join(parts)}); nothing was loaded"
        )


def check_decoder(base_cfg: RetroConfig, cfg: RetroConfig, folder: Path) -> None:
    """Refuse a baseline (in `folder`) whose decoder settings differ from `cfg`'s.

    Raises:
        MismatchError: naming each differing setting.
    """
    diff = [f"{k}: {getattr(base_cfg, k)} vs {getattr(cfg, k)}" for k in _DECODER_FIELDS
            if getattr(base_cfg, k) != getattr(cfg, k)]  # fmt: skip
    if diff:
        raise MismatchError(
            f"the baseline in {folder} has another decoder than the requested config "
            f"({'; '.join(diff)}); use the baseline's decoder settings"
        )
