"""Model weights on disk: a folder of `config.json` and `model.safetensors`.

The model class owns `save` / `load` / `from_baseline` (each a one-line call into this module);
the file format, its checks and their error messages live here, beside `retrolm.checkpoint`,
so that the model file holds no I/O. The weights file also carries the config (in its
metadata), so a folder whose two files come from different saves is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from retrolm.config import RetroConfig
from retrolm.errors import CorruptArtifactError, InputError, MismatchError
from retrolm.io import atomic_path, write_json

if TYPE_CHECKING:
    from retrolm.model import RETRO

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_META_KEY = "retrolm_config"  # the config, also stored inside the weights file

# decoder settings a baseline must share with the model it is RETRO-fitted into
_DECODER_FIELDS = ("vocab_size", "dec_dim", "dec_depth", "dec_heads", "ff_mult", "pad_id",
                   "use_deepnet", "norm_eps", "rotary_base")  # fmt: skip


def save_model(model: RETRO, folder: str | os.PathLike[str]) -> Path:
    """Write `config.json` and `model.safetensors` of `model` into `folder` (each atomically).

    Args:
        model: a RETRO (anything with `cfg.to_dict()` and `state_dict()`).
        folder: created if missing.
    Returns:
        the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(config, sort_keys=True)})
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


def load_model(
    folder: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    model_class: type[RETRO] | None = None,
) -> RETRO:
    """Load a model written by `save_model`. Every weight must be present, and no other.

    Args:
        model_class: the class to build (RETRO by default; `RETRO.load` passes its own class).
    Raises:
        InputError: a file is missing.
        CorruptArtifactError: unreadable files, missing, extra or misshapen weights.
    """
    if model_class is None:
        from retrolm.model import RETRO as model_class
    folder = Path(folder)
    cfg, state = read_model_folder(folder)
    model = model_class(cfg)
    check_keys(model.state_dict(), state, folder / WEIGHTS_FILE, "this config")
    model.load_state_dict(state, strict=True)
    return model.to(map_location)


def load_from_baseline(
    baseline_folder: str | os.PathLike[str],
    cfg: RetroConfig,
    model_class: type[RETRO] | None = None,
) -> RETRO:
    """RETRO-fitting: a model with `cfg` whose decoder weights come from a saved baseline.

    The baseline's decoder must match `cfg` exactly (every decoder weight, same shapes);
    the encoder and CCA layers are freshly initialised.

    Raises:
        MismatchError: the baseline's decoder settings differ from `cfg`.
        CorruptArtifactError: missing or extra decoder weights.
    """
    if model_class is None:
        from retrolm.model import RETRO as model_class
    folder = Path(baseline_folder)
    base_cfg, state = read_model_folder(folder)
    diff = [f"{k}: {getattr(base_cfg, k)} vs {getattr(cfg, k)}" for k in _DECODER_FIELDS
            if getattr(base_cfg, k) != getattr(cfg, k)]  # fmt: skip
    if diff:
        raise MismatchError(
            f"the baseline in {folder} has another decoder than the requested config "
            f"({'; '.join(diff)}); use the baseline's decoder settings"
        )
    model = model_class(cfg)
    is_retrieval = model_class._is_retrieval_name
    decoder = {k: v for k, v in model.state_dict().items() if not is_retrieval(k)}
    check_keys(decoder, state, folder / WEIGHTS_FILE, "a decoder of this config")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(is_retrieval(k) for k in missing)
    return model
