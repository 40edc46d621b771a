"""RETRO-fitting Hugging Face causal LMs with retrolm's own retrieval modules.

`retrofit_hf(path, **settings)` freezes a local GPT-2, Llama (Mistral, Qwen2) or GPT-NeoX
model and attaches the neighbour encoder, chunked cross-attention and copy head of
`retrolm.model` after some of its layers; `RetroFitted` has the contract of `RETRO`. `path` may
also be a .gguf file or `smollm2` (`resolve_base`).
"""

from retrolm.hf.base import is_hf_model_folder, weights_sha256
from retrolm.hf.config import RetrofitConfig, default_cca_layers
from retrolm.hf.model import RetroFitted, is_retrofit_folder
from retrolm.hf.resolve import resolve_base
from retrolm.hf.retrofit import (
    check_database_tokens,
    hf_baseline,
    load_model_folder,
    retrofit_config,
    retrofit_hf,
    train_model_config,
)

__all__ = [
    "RetroFitted",
    "RetrofitConfig",
    "check_database_tokens",
    "default_cca_layers",
    "hf_baseline",
    "is_hf_model_folder",
    "is_retrofit_folder",
    "load_model_folder",
    "resolve_base",
    "retrofit_config",
    "retrofit_hf",
    "train_model_config",
    "weights_sha256",
]
