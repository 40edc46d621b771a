"""Model configuration: the single source of truth for the shape of a RETRO model.

`RetroConfig` is written as `config.json` beside every saved model and read back by
`RETRO.load`; `RetroConfig.preset(name)` gives the common sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from retrolm.errors import ConfigError

# m, the paper's chunk size: the default of the model, the database and the quickstarts
CHUNK_SIZE = 64

# name -> field overrides; anything not named keeps the dataclass default
_PRESETS: dict[str, dict[str, Any]] = {
    # for tests: a few hundred thousand parameters, runs in milliseconds
    "tiny": dict(
        vocab_size=512,
        chunk_size=8,
        neighbour_len=16,
        dec_dim=64,
        dec_depth=4,
        dec_heads=4,
        cca_layers=(2, 4),
        enc_dim=48,
        enc_depth=2,
        enc_heads=3,
        max_seq_len=128,
    ),
    # a model a CPU laptop trains in hours (benchmarks/model_speed.py's configuration)
    "small": dict(
        vocab_size=28996,
        dec_dim=384,
        dec_depth=6,
        dec_heads=6,
        cca_layers=(3, 6),
        enc_dim=256,
        enc_depth=2,
        enc_heads=4,
        max_seq_len=512,
    ),
    # `retrolm quickstart`'s model: narrow, so that a laptop's budget buys many steps.
    # cca_match=4 (a retrolm extension, below) lets CCA read its neighbours within the budget:
    # with the paper's CCA this model gains nothing from its real neighbours after 1,500 steps,
    # and 0.002 nats from perfect ones after 300 (docs/results.md, the sections on learning to
    # read neighbours and on CCA's match bonus). copy_head (a retrolm extension) lets it copy a
    # neighbour token by id: RETRO-fitted for 150 steps it gains 16.4% bpb on the standard
    # library and 5.5% on perl-doc, against 0.6% and 0.2% without it (docs/results.md, the
    # section on the copy head). benchmarks/retrieval_gain.py and retrieval_learning.py train
    # it too. Its vocab comes from the database (the quickstart
    # builds one of 8192 tokens).
    "quickstart": dict(
        chunk_size=CHUNK_SIZE,
        neighbour_len=2 * CHUNK_SIZE,
        num_neighbours=2,
        dec_dim=128,
        dec_depth=4,
        dec_heads=4,
        cca_layers=(2, 4),
        enc_dim=128,
        enc_depth=2,
        enc_heads=4,
        max_seq_len=256,
        cca_match=4,
        copy_head=True,
    ),
    # close to the paper's smallest model (Borgeaud et al. 2021, table 2: 172M with retrieval)
    "base": dict(
        vocab_size=28996,
        dec_dim=768,
        dec_depth=12,
        dec_heads=12,
        cca_layers=(6, 9, 12),
        enc_dim=896,
        enc_depth=2,
        enc_heads=14,
        max_seq_len=2048,
    ),
}

PRESETS = tuple(_PRESETS)  # the preset names


def preset_fields(name: str) -> dict[str, Any]:
    """The fields a preset sets (a copy), e.g. as `TrainConfig.model` overrides.

    Raises:
        ConfigError: unknown preset name.
    """
    if name not in _PRESETS:
        raise ConfigError(f"unknown RetroConfig preset {name!r}; choose one of {list(_PRESETS)}")
    return dict(_PRESETS[name])


@dataclass
class RetroConfig:
    """Shape and behaviour of a RETRO model (decoder, retrieval encoder, chunked cross-attention).

    An empty `cca_layers` gives a plain decoder-only transformer (the no-retrieval baseline):
    no encoder and no cross-attention are built.
    """

    vocab_size: int = 28996  # number of token ids, pad_id included
    chunk_size: int = CHUNK_SIZE  # m: tokens per chunk; retrieval happens once per chunk
    num_neighbours: int = 2  # k used in training; k at run time may differ
    neighbour_len: int = (
        2 * CHUNK_SIZE
    )  # r: tokens per neighbour (the chunk and its continuation, 2m)
    dec_dim: int = 768  # decoder width d
    dec_depth: int = 12  # number of decoder blocks
    dec_heads: int = 12  # decoder attention heads (dec_dim // dec_heads must be even)
    cca_layers: tuple[int, ...] = (6, 9, 12)  # decoder blocks (from 1) with chunked cross-attn
    enc_dim: int = 896  # retrieval encoder width d'
    enc_depth: int = 2  # retrieval encoder blocks (bidirectional)
    enc_heads: int = 14  # encoder attention heads (enc_dim // enc_heads must be even)
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * width
    max_seq_len: int = 2048  # longest decoder sequence; a multiple of chunk_size
    pad_id: int = 0  # padding token: never attended, in the decoder and in the neighbours
    dropout: float = 0.0  # dropout on attention outputs and feed-forward outputs
    rotary_base: float = 10000.0  # rotary position embedding base
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # std of the normal initialisation of linear and embedding weights
    use_deepnet: bool = False  # DeepNet post-norm with scaled residuals (for very deep models)
    # retrolm extension, not in the paper (0 turns it off): each CCA head adds a learned bonus
    # to the attention score of a neighbour token whose preceding tokens equal the query's last
    # cca_match tokens, one weight per lag and head (a copy prior; see ChunkedCrossAttention)
    cca_match: int = 0
    # retrolm extension, not in the paper: a pointer over the neighbour tokens (a copy head on
    # the final hidden state, with cca_match's match bonus and a sentinel for "no copy"); the
    # next-token distribution mixes the LM's softmax with the copied tokens' probability (see
    # CopyHead). Needs cca_match >= 1; RETRO[OFF] is the plain LM. Like cca_match, unused
    # without cca_layers (a baseline made from a preset keeps the field, and has no copy head).
    copy_head: bool = False

    def __post_init__(self) -> None:
        self.cca_layers = tuple(int(x) for x in self.cca_layers)
        positive = (
            "vocab_size",
            "chunk_size",
            "num_neighbours",
            "neighbour_len",
            "dec_dim",
            "dec_depth",
            "dec_heads",
            "enc_dim",
            "enc_heads",
            "ff_mult",
            "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"RetroConfig.{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.cca_match, int)
            or isinstance(self.cca_match, bool)
            or not (0 <= self.cca_match <= self.chunk_size)
        ):
            raise ConfigError(
                f"RetroConfig.cca_match must be an integer in 0..chunk_size ({self.chunk_size}), "
                f"got {self.cca_match!r}"
            )
        if not isinstance(self.copy_head, bool):
            raise ConfigError(
                f"RetroConfig.copy_head must be true or false, got {self.copy_head!r}"
            )
        if self.copy_head and self.cca_layers and self.cca_match < 1:
            raise ConfigError(
                "RetroConfig.copy_head needs cca_match >= 1 (the copy head finds what to copy "
                "with the match bonus); set cca_match or copy_head=false"
            )
        if not isinstance(self.enc_depth, int) or self.enc_depth < 0:
            raise ConfigError(f"RetroConfig.enc_depth must be >= 0, got {self.enc_depth!r}")
        for dim, heads, prefix in (
            (self.dec_dim, self.dec_heads, "dec"),
            (self.enc_dim, self.enc_heads, "enc"),
        ):
            if dim % heads != 0:
                raise ConfigError(
                    f"RetroConfig.{prefix}_dim ({dim}) must be divisible by "
                    f"{prefix}_heads ({heads})"
                )
            if (dim // heads) % 2 != 0:
                raise ConfigError(
                    f"RetroConfig.{prefix}_heads: head size {prefix}_dim/{prefix}_heads = "
                    f"{dim // heads} must be even (rotary embeddings rotate pairs)"
                )
        bad = [x for x in self.cca_layers if not 1 <= x <= self.dec_depth]
        if bad:
            raise ConfigError(
                f"RetroConfig.cca_layers {bad} out of range: layers are numbered 1..dec_depth "
                f"({self.dec_depth})"
            )
        if len(set(self.cca_layers)) != len(self.cca_layers):
            raise ConfigError(f"RetroConfig.cca_layers has duplicates: {self.cca_layers}")
        self.cca_layers = tuple(sorted(self.cca_layers))
        if self.cca_layers and self.enc_depth < 1:
            raise ConfigError("RetroConfig.enc_depth must be >= 1 when cca_layers is not empty")
        if self.max_seq_len % self.chunk_size != 0:
            raise ConfigError(
                f"RetroConfig.max_seq_len ({self.max_seq_len}) must be a multiple of "
                f"chunk_size ({self.chunk_size})"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(
                f"RetroConfig.pad_id ({self.pad_id}) must lie in 0..vocab_size-1 "
                f"({self.vocab_size - 1})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"RetroConfig.dropout must lie in [0, 1), got {self.dropout}")
        for name in ("rotary_base", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RetroConfig.{name} must be > 0, got {getattr(self, name)}")

    def flops_per_token(self, seq_len: int, k: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per decoder token at sequence length `seq_len` with k neighbours.

        Counts every linear layer (2 FLOPs per multiply-add), the attention score and value
        products at full (not causally halved) length, the encoder (k*r/m encoder tokens per
        decoder token) and CCA; `training=True` multiplies the forward count by 3 (backward
        twice the forward). Norms, softmax and other elementwise work are not counted.
        """
        cfg = self
        k = cfg.num_neighbours if k is None else k
        d, e, m, r, ff = cfg.dec_dim, cfg.enc_dim, cfg.chunk_size, cfg.neighbour_len, cfg.ff_mult
        macs = cfg.dec_depth * (4 * d * d + 2 * ff * d * d + 2 * seq_len * d) + d * cfg.vocab_size
        if cfg.retrieval and k > 0:
            n_cca = len(cfg.cca_layers)
            enc_tokens = k * r / m  # encoder tokens per decoder token
            per_enc_token = d * e + cfg.enc_depth * (
                4 * e * e + 2 * r * e + 2 * e * e + 2 * m * e + 2 * ff * e * e
            )
            macs += enc_tokens * per_enc_token + cfg.enc_depth * 2 * d * e  # + chunk keys/values
            macs += n_cca * (2 * d * d + 2 * k * r * d + enc_tokens * 2 * e * d)
        return 2.0 * macs * (3 if training else 1)

    @property
    def retrieval(self) -> bool:
        """True when the model has an encoder and chunked cross-attention."""
        return bool(self.cca_layers)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RetroConfig:
        """A named size (`PRESETS`: "tiny", "small", "quickstart", "base"), fields overridden.

        Raises:
            ValueError: unknown preset name or invalid override.
        """
        fields = preset_fields(name)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown RetroConfig field(s) {sorted(unknown)}")
        return cls(**{**fields, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["cca_layers"] = list(self.cca_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetroConfig:
        """Inverse of `to_dict`.

        Raises:
            ValueError: a key that is not a RetroConfig field, or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        # `extra` (free-form notes that configs of retrolm 0.1.0 carry) has no meaning: dropped
        d = {k: v for k, v in d.items() if k != "extra"}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(
                f"unknown RetroConfig field(s) {sorted(unknown)}; was this config written by a "
                "newer retrolm?"
            )
        return cls(**d)
