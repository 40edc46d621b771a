"""`RetrofitConfig`: what a RETRO-fitted Hugging Face model is, written beside its weights.

The decoder fields (`dec_dim`, `dec_depth`, `dec_heads`, `vocab_size`) are read from the base
model's config and never chosen; the retrieval fields are named as in `RetroConfig`, whose
checks they go through (`retro_config`), so that retrolm's own `Encoder` and
`ChunkedCrossAttention` can be built from it unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from retrolm.config import RetroConfig
from retrolm.errors import ConfigError

# the retrieval settings `retrofit_hf` accepts as keyword arguments
RETRIEVAL_SETTINGS = (
    "chunk_size",
    "num_neighbours",
    "neighbour_len",
    "cca_layers",
    "enc_dim",
    "enc_depth",
    "enc_heads",
    "cca_match",
    "copy_head",
    "ff_mult",
    "max_seq_len",
    "pad_id",
    "dropout",
    "rotary_base",
    "norm_eps",
    "init_std",
    "dtype",
    "gradient_checkpointing",
)
DTYPES = ("float32", "bfloat16")


def default_cca_layers(depth: int) -> tuple[int, ...]:
    """Every third decoder layer from the middle on (1-based): 12 layers -> (6, 9, 12)."""
    return tuple(range(max(1, depth // 2), depth + 1, 3))


@dataclass
class RetrofitConfig:
    """A frozen Hugging Face causal LM plus retrolm's encoder and CCA after `cca_layers`.

    An empty `cca_layers` is the base model alone (what `--baseline HF_FOLDER` evaluates).
    """

    base_path: str  # the Hugging Face model folder the base weights are loaded from
    base_sha256: str  # hash of its weights files (`retrolm.hf.base.weights_sha256`)
    base_type: str  # the base's `model_type` (gpt2, llama, gpt_neox, ...)
    vocab_size: int  # rows of the base's token embedding
    dec_dim: int  # the base's hidden size
    dec_depth: int  # the base's number of decoder layers
    dec_heads: int  # the base's attention heads (CCA uses as many)
    max_seq_len: int  # longest sequence read at once; a multiple of chunk_size
    chunk_size: int = 64  # m: tokens per chunk; retrieval happens once per chunk
    num_neighbours: int = 2  # k used in training
    neighbour_len: int = 128  # r: tokens per neighbour (the chunk and its continuation, 2m)
    cca_layers: tuple[int, ...] = ()  # base layers (from 1) followed by chunked cross-attention
    enc_dim: int = 896  # retrieval encoder width d'
    enc_depth: int = 2  # retrieval encoder blocks (bidirectional)
    enc_heads: int = 14  # encoder attention heads
    cca_match: int = 0  # retrolm's copy prior in CCA (RetroConfig.cca_match); 0 is off
    copy_head: bool = False  # retrolm's pointer over neighbour tokens (RetroConfig.copy_head),
    # gated to start at exactly zero (CopyHead's `gated`), so the model starts as the base
    ff_mult: int = 4  # encoder feed-forward width = ff_mult * enc_dim
    pad_id: int = 0  # padding token of the database (never attended in encoder and CCA)
    dropout: float = 0.0  # dropout in the encoder and on the CCA residual (the base has none)
    rotary_base: float = 10000.0  # rotary base of the encoder and CCA positions
    norm_eps: float = 1e-5  # LayerNorm epsilon of the encoder and CCA
    init_std: float = 0.02  # std of the new weights (CCA output projections start at zero)
    dtype: str = "float32"  # the frozen base's weights: float32 or bfloat16
    gradient_checkpointing: bool = False  # recompute base layers after the first CCA in backward
    base_gguf: str = ""  # the GGUF file base_path was converted from (retrolm.hf.resolve), if any
    base_gguf_sha256: str = ""  # and that file's sha256

    def __post_init__(self) -> None:
        self.cca_layers = tuple(sorted(int(x) for x in self.cca_layers))
        if self.dtype not in DTYPES:
            raise ConfigError(f"RetrofitConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(
                "RetrofitConfig.gradient_checkpointing must be true or false, got "
                f"{self.gradient_checkpointing!r}"
            )
        self.retro_config()  # every shared field checked by RetroConfig's own rules

    @property
    def retrieval(self) -> bool:
        """True when the model has an encoder and chunked cross-attention."""
        return bool(self.cca_layers)

    def retro_config(self) -> RetroConfig:
        """The `RetroConfig` retrolm's retrieval modules are built from (same field names)."""
        shared = {f.name for f in dataclasses.fields(RetroConfig)} & set(self.to_dict())
        return RetroConfig(**{name: getattr(self, name) for name in shared})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["cca_layers"] = list(self.cca_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetrofitConfig:
        """Inverse of `to_dict`.

        Raises:
            ConfigError: a key that is not a RetrofitConfig field, or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"unknown RetrofitConfig field(s) {sorted(unknown)}; was this written by a "
                "newer retrolm?"
            )
        try:
            return cls(**d)
        except TypeError as e:  # a required field missing
            raise ConfigError(f"RetrofitConfig: {e}") from e
