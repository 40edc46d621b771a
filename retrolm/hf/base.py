"""The frozen base: a local Hugging Face causal LM folder, its decoder layers and its hash.

Loading is offline (`local_files_only=True`). A family is supported when its decoder layers can
be found (`DECODER_LAYERS`); each layer's hidden-state output is where CCA is attached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrolm.errors import InputError, MismatchError

HF_CONFIG = "config.json"
# weights files of a Hugging Face folder (sharded or not), hashed to recognise the base later
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# model_type -> path of the decoder layers' ModuleList inside the *ForCausalLM model
DECODER_LAYERS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gpt_neox": "gpt_neox.layers",
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `config.json` of a Hugging Face model folder, or None if `path` is not one.

    A folder is a Hugging Face model when its config.json names a `model_type` or
    `architectures` (a retrolm model folder's config.json names neither).
    """
    file = Path(path) / HF_CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not ("model_type" in config or "architectures" in config):
        return None
    return config


def is_hf_model_folder(path: str | os.PathLike[str] | None) -> bool:
    """True when `path` is a local Hugging Face model folder (see `read_hf_config`)."""
    return path is not None and read_hf_config(path) is not None


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over the names and contents of the folder's weights files, in name order.

    Raises:
        InputError: the folder holds no *.safetensors or *.bin file.
    """
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise InputError(
            f"{folder} holds no weights file (*.safetensors or *.bin); save the model with "
            "save_pretrained into that folder"
        )
    total = hashlib.sha256()
    for file in files:
        total.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                total.update(block)
    return total.hexdigest()


def check_base_hash(path: str | os.PathLike[str], expected: str) -> None:
    """Refuse a base whose weights are not the ones a retrofit was trained on.

    Raises:
        MismatchError: the weights' hash differs.
    """
    found = weights_sha256(path)
    if found != expected:
        raise MismatchError(
            f"the base model in {path} has other weights (sha256 {found[:12]}...) than the one "
            f"these retrieval weights were trained on ({expected[:12]}...); give the original "
            "base folder (load(folder, base=PATH)) or retrofit this one anew"
        )


def check_family(model_type: Any, path: str | os.PathLike[str]) -> None:
    """Refuse a model family whose decoder layers retrolm does not know.

    Raises:
        InputError: naming the family and the supported ones.
    """
    if model_type not in DECODER_LAYERS:
        raise InputError(
            f"{path} holds a {model_type!r} model; RETRO-fitting supports the families "
            f"{sorted(DECODER_LAYERS)}"
        )


def load_base(path: str | os.PathLike[str], dtype: str = "float32") -> nn.Module:
    """The Hugging Face causal LM in `path`, offline, frozen and in eval mode.

    Raises:
        InputError: not a Hugging Face model folder, an unsupported family, or unreadable.
    """
    from transformers import AutoModelForCausalLM

    config = read_hf_config(path)
    if config is None:
        raise InputError(
            f"{path} is not a Hugging Face model folder (no config.json with a model_type); "
            "give a folder written by save_pretrained"
        )
    check_family(config.get("model_type"), path)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=TORCH_DTYPES[dtype]
        )
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the Hugging Face model in {path}: {e}") from e
    base.requires_grad_(False)
    return base.eval()


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The decoder layers of a loaded base, in order.

    Raises:
        InputError: the family is not supported.
    """
    model_type = getattr(base.config, "model_type", None)
    where = DECODER_LAYERS.get(model_type)
    if where is None:
        raise InputError(
            f"RETRO-fitting supports the families {sorted(DECODER_LAYERS)}, not {model_type!r}"
        )
    layers = base.get_submodule(where)
    assert isinstance(layers, nn.ModuleList)
    return layers
