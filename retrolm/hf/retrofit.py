"""`retrofit_hf` and what the pipeline needs to train, evaluate and load RETRO-fitted models."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from retrolm.errors import ConfigError, CorruptArtifactError, InputError, MismatchError
from retrolm.hf.base import check_family, read_hf_config, weights_sha256
from retrolm.hf.config import RETRIEVAL_SETTINGS, RetrofitConfig, default_cca_layers
from retrolm.hf.model import RetroFitted, is_retrofit_folder
from retrolm.hf.resolve import resolve_base, source_of

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048  # the longest window by default (capped by the base's positions)
DEFAULT_CCA_MATCH = 4  # lags of CCA's match bonus, which the copy head needs (RetroConfig's)


def retrofit_config(path: str | os.PathLike[str], **settings: Any) -> RetrofitConfig:
    """The RetrofitConfig of the Hugging Face model in `path` with retrieval `settings`.

    Reads the base's config.json and hashes its weights; loads no weights.

    Args:
        path: a local Hugging Face model folder, a .gguf file or a packaged name such as
            `smollm2` (`retrolm.hf.resolve.resolve_base`).
        settings: RetrofitConfig fields (`RETRIEVAL_SETTINGS`); defaults: chunk_size 64,
            neighbour_len 2 * chunk_size, cca_layers every third layer from the middle,
            max_seq_len the base's longest sequence (at most 2048) in whole chunks, pad_id
            the base's pad (or eos) token, cca_match 4 and the copy head on.
    Raises:
        InputError: not a Hugging Face model folder; ConfigError: a bad or unknown setting.
    """
    path = resolve_base(path)
    unknown = sorted(set(settings) - set(RETRIEVAL_SETTINGS))
    if unknown:
        raise ConfigError(
            f"unknown retrieval setting(s) {unknown} for RETRO-fitting; choose from "
            f"{list(RETRIEVAL_SETTINGS)} (the decoder's shape is the base model's)"
        )
    config = read_hf_config(path)
    if config is None:
        raise InputError(
            f"{path} is not a Hugging Face model folder (no config.json with a model_type); "
            "give a folder written by save_pretrained"
        )
    shape = _base_shape(path)
    m = int(settings.get("chunk_size", 64))
    longest = shape.pop("longest")
    settings.setdefault("chunk_size", m)
    settings.setdefault("neighbour_len", 2 * m)
    settings.setdefault("cca_layers", default_cca_layers(shape["dec_depth"]))
    settings.setdefault("max_seq_len", max(m, min(longest, DEFAULT_MAX_SEQ_LEN) // m * m))
    settings.setdefault("pad_id", _default_pad(config, shape["vocab_size"]))
    settings.setdefault("cca_match", DEFAULT_CCA_MATCH)
    settings.setdefault("copy_head", settings["cca_match"] > 0)
    source = source_of(path) or {}
    if settings["max_seq_len"] > longest:
        raise ConfigError(
            f"max_seq_len {settings['max_seq_len']} is longer than the base model's "
            f"{longest} positions; use at most {longest // m * m}"
        )
    check_weights_readable(path)
    return RetrofitConfig(
        base_path=str(Path(path).resolve()),
        base_sha256=weights_sha256(path),
        base_gguf=str(source.get("gguf", "")),
        base_gguf_sha256=str(source.get("sha256", "")),
        **shape,
        **settings,
    )


def retrofit_hf(path: str | os.PathLike[str], **settings: Any) -> RetroFitted:
    """RETRO-fit the Hugging Face causal LM in `path`: freeze it, add encoder and CCA.

    Returns a model equal to the base until its retrieval weights are trained (the CCA output
    projections start at zero). See `retrofit_config` for the settings.

    Raises:
        InputError: not a Hugging Face model folder or an unsupported family;
        ConfigError: a bad or unknown setting.
    """
    return RetroFitted.from_config(retrofit_config(path, **settings))


def _base_shape(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The base's shape from its config.json.

    Raises:
        InputError: an unsupported family; CorruptArtifactError: a config.json transformers
            cannot read.
    """
    from transformers import AutoConfig

    raw = read_hf_config(path)
    if raw is not None:  # an unsupported family is named before transformers reads it
        check_family(raw.get("model_type"), path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises value, type, key and validation errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptArtifactError(
            f"cannot read the Hugging Face config {Path(path) / 'config.json'} ({first}); give "
            "a folder written by save_pretrained"
        ) from e
    check_family(config.model_type, path)
    longest = getattr(config, "max_position_embeddings", None) or config.n_positions
    return {
        "base_type": config.model_type,
        "vocab_size": int(config.vocab_size),
        "dec_dim": int(config.hidden_size),
        "dec_depth": int(config.num_hidden_layers),
        "dec_heads": int(config.num_attention_heads),
        "longest": int(longest),
    }


def check_weights_readable(path: str | os.PathLike[str]) -> None:
    """Open the header of every *.safetensors file of the base (reading no weights).

    Raises:
        CorruptArtifactError: a file that is truncated or not safetensors.
    """
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own SafetensorError, OSError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptArtifactError(
                f"cannot read the weights {file} ({first}); the file may be truncated: copy or "
                "save the model again"
            ) from e


def _default_pad(config: dict[str, Any], vocab_size: int) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        value = config.get(key)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < vocab_size:
            return value
    return 0


# ---- the pipeline: train --retrofit HF_FOLDER, eval --baseline HF_FOLDER, loading runs


def train_model_config(
    path: str | os.PathLike[str],
    facts: dict[str, Any],
    overrides: dict[str, Any],
    num_neighbours: int | None,
) -> RetrofitConfig:
    """The config of `retrolm train --retrofit HF_FOLDER` on a database with `facts`.

    Chunk size, neighbour length and pad id come from the database; `overrides` are the
    run's `--model FIELD=VALUE` settings.
    """
    m = int(facts["chunk_size"])
    settings: dict[str, Any] = {"chunk_size": m, "neighbour_len": 2 * m, "pad_id": facts["pad_id"]}
    if num_neighbours is not None:
        settings["num_neighbours"] = num_neighbours
    settings.update(overrides)
    return retrofit_config(path, **settings)


def check_database_tokens(path: str | os.PathLike[str], source: Any) -> None:
    """Refuse a database whose token ids are not the base model's.

    Every id of the database's tokenizer must have a row in the base's token embedding, and
    every token of the base's own tokenizer.json (when it has one) must have the same id.

    Raises:
        MismatchError: naming the first token that differs, or the sizes.
    """
    from tokenizers import Tokenizer as HFTokenizer

    path = resolve_base(path)
    tokenizer = getattr(source, "tokenizer", None)
    where = getattr(source, "path", "the database")
    if tokenizer is None:
        return
    rows = int(_base_shape(path)["vocab_size"])
    if tokenizer.vocab_size > rows:
        raise MismatchError(
            f"the tokenizer of {where} has {tokenizer.vocab_size} token ids, but the base model "
            f"{path} embeds {rows}: build the database in the base's tokens "
            f"(`retrolm db build CORPUS --tokenizer {path}`)"
        )
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        log.warning("%s has no tokenizer.json: only the vocabulary size was checked", path)
        return
    base_vocab = HFTokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
    db_vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    for token, token_id in sorted(base_vocab.items(), key=lambda item: item[1]):
        if db_vocab.get(token) != token_id:
            raise MismatchError(
                f"{where} was built with another tokenizer than the base model {path} (token "
                f"{token!r} is id {token_id} in the base, {db_vocab.get(token)} in the database); "
                f"rebuild it with `retrolm db build CORPUS --tokenizer {path}`"
            )


def hf_baseline(path: str | os.PathLike[str], source: Any, like: Any) -> RetroFitted:
    """The untouched base model in `path`, to score beside a run whose config is `like`."""
    path = resolve_base(path)
    check_database_tokens(path, source)
    m = int(like.chunk_size)
    longest = _base_shape(path)["longest"]
    return retrofit_hf(
        path,
        cca_layers=(),
        chunk_size=m,
        max_seq_len=min(int(like.max_seq_len), longest // m * m),
        pad_id=int(like.pad_id),
        dtype=getattr(like, "dtype", "float32"),  # a retrofit's base as it runs in the retrofit
    )


def load_model_folder(folder: str | os.PathLike[str]) -> Any:
    """A saved model folder: a `RetroFitted` (retrofit.safetensors) or a `RETRO`."""
    if is_retrofit_folder(folder):
        return RetroFitted.load(folder)
    from retrolm.model import RETRO

    return RETRO.load(folder)
