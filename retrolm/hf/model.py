"""`RetroFitted`: a frozen Hugging Face causal LM reading retrieved neighbours through CCA.

RETRO-fitting (Borgeaud et al. 2021, section 4.2): the base model is frozen and only the
neighbour encoder and the chunked cross-attention (CCA) layers are trained. The retrieval part
is retrolm's own (`retrolm.model`: `Encoder`, `ChunkedCrossAttention`, `Residual`, `Rotary`),
attached to the base by a forward hook on each chosen decoder layer: the hook takes the
layer's hidden states (B, T, d) and returns them plus the CCA residual, nothing else.

- The neighbours are embedded with the base's (frozen) token embedding, projected to the
  encoder width by `Encoder.proj_in`, and the encoder is conditioned on the base's hidden
  states of the retrieving chunk after the first CCA layer, as RETRO's decoder does.
- Each CCA output projection starts at zero, so a fresh RetroFitted computes exactly the base
  model, with or without neighbours; with `neighbours=None` (RETRO[OFF]) the hooks do nothing,
  so it is the base model always.
- The m-1 shift, the masks and the rotary positions are those of `ChunkedCrossAttention`, so the
  neighbours of chunk u reach positions (u+1)m-1 onwards only.
- Cached decoding uses the base's own KV cache (`DynamicCache`) and a CCA cache (`CCACache`):
  the neighbours of a chunk are encoded once, their CCA keys/values kept per layer.
- The base reads its tokens as it was trained to, with no padding mask (retrolm pads only a
  sequence's tail, which causal attention never reads from earlier positions); pad tokens are
  masked in the encoder and in CCA, as in RETRO.
- The retrieval weights stay float32; with `dtype="bfloat16"` the base is held in bfloat16 and
  the hook computes CCA in float32 from its hidden states.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retrolm import weights
from retrolm.errors import InputError, MismatchError
from retrolm.hf.base import check_base_hash, decoder_layers, load_base
from retrolm.hf.config import RetrofitConfig
from retrolm.inputs import check_neighbours, check_tokens
from retrolm.model import (
    RETRO,
    ChunkedCrossAttention,
    CopyHead,
    Encoder,
    Residual,
    Retrieve,
    Rotary,
    Span,
    _LinearCrossEntropy,
    windowed_generate,
)

CONFIG_FILE = "config.json"  # as a RETRO folder's: the file that marks a finished model
WEIGHTS_FILE = "retrofit.safetensors"
_META_KEY = "retrolm_retrofit_config"  # the config, also stored inside the weights file


@dataclass
class CCACache:
    """What `RetroFitted.generate` keeps between steps besides the base's own KV cache."""

    token_ids: Tensor  # (B, size) every token fed so far
    kv: Any  # the base's transformers.DynamicCache
    retrieval: bool  # True: CCA is on (a `retrieve` function was given)
    length: int = 0  # positions filled
    num_chunks: int = 0  # chunks whose neighbours are encoded
    chunk_acts: Tensor | None = None  # (B, size, d) hidden states after the first CCA layer
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, chunks, h, k*r, hd)
    values: dict[int, Tensor] = field(default_factory=dict)
    mask: Tensor | None = None  # (B, chunks, k*r) True where a neighbour token is real
    nb_ids: Tensor | None = None  # (B, chunks, k, r) neighbour ids (for cca_match), pad as -1

    @property
    def size(self) -> int:
        return self.token_ids.shape[1]


@dataclass
class _Pass:
    """The state of one forward pass through the base, read by the layer hooks."""

    tokens: Tensor  # (B, T) the tokens fed in this pass
    start: int  # absolute position of tokens[:, 0]
    neighbours: Tensor | None  # (B, U, k, r): full pass: chunks 0..U-1; cached: the new chunks
    cache: CCACache | None = None  # None: a full pass from position 0
    encoded: Tensor | None = None  # (B, U, k, r, e) once the first CCA layer has run
    nb_mask: Tensor | None = None  # (B, U, k*r)
    match: tuple[Tensor, Tensor] | None = None  # (ids, nb_ids) of a full pass, for cca_match


class RetroFitted(nn.Module):
    """A frozen Hugging Face causal LM with retrolm's encoder and CCA after some of its layers.

    The same contract as `RETRO`: `model(tokens, neighbours)` -> logits (`neighbours=None` is
    RETRO[OFF], which is the base model), `loss`, `hidden_states`, `generate`,
    `retrieval_parameters`, `save` / `load`.
    """

    # input checks shared with RETRO: they read only self.cfg (vocab_size, max_seq_len, ...)
    _retrieve = RETRO._retrieve
    _match_ids = RETRO._match_ids  # pad_id as -2 (decoder), -1 (neighbours), for cca_match

    def __init__(self, base: nn.Module, cfg: RetrofitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.base = base.requires_grad_(False).eval()
        layers = list(decoder_layers(base))  # a plain list: the base's, not modules of ours
        found = (len(layers), int(base.get_input_embeddings().weight.shape[0]))
        if found != (cfg.dec_depth, cfg.vocab_size):
            raise MismatchError(
                f"the base model has {found[0]} layers and {found[1]} token embeddings, but the "
                f"config says {cfg.dec_depth} and {cfg.vocab_size}: it is another model"
            )
        rcfg = cfg.retro_config()
        d, heads, m = cfg.dec_dim, cfg.dec_heads, cfg.chunk_size
        self.encoder = Encoder(rcfg) if cfg.retrieval else None
        self.cca = nn.ModuleDict(
            {str(i): ChunkedCrossAttention(d, cfg.enc_dim, heads, m, cfg.cca_match)
             for i in cfg.cca_layers}
        )  # fmt: skip
        self.cca_res = nn.ModuleDict(
            {str(i): Residual(d, cfg.norm_eps, False, 1.0, cfg.dropout) for i in cfg.cca_layers}
        )
        self.copy = (
            CopyHead(d, cfg.enc_dim, m, cfg.cca_match,
                     cfg.num_neighbours * cfg.neighbour_len, gated=True)
            if cfg.copy_head and cfg.retrieval else None
        )  # fmt: skip
        self.copy_layer = cfg.dec_depth + 1  # the copy head's key in the CCA cache
        self.rotary = Rotary(d // heads, cfg.rotary_base)
        self.first_cca = cfg.cca_layers[0] if cfg.retrieval else 0
        self._pass: _Pass | None = None  # set for the duration of one forward through the base
        self._cache_arg = _cache_argument(self.base.base_model)
        self.reset_parameters()
        for i in cfg.cca_layers:
            layers[i - 1].register_forward_hook(partial(self._after_layer, i))
        if cfg.gradient_checkpointing:
            for layer in layers[self.first_cca :] if cfg.retrieval else []:
                layer.forward = partial(_checkpointed, layer.forward)

    # ---- parameters

    def reset_parameters(self) -> None:
        """Normal(0, init_std) new weights; every CCA output projection and the copy head's gate
        zero (model == base)."""
        for name, module in self.named_modules():
            if name.startswith("base"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for cca in self.cca.values():
            nn.init.zeros_(cca.out.weight)
            if cca.match_weight is not None:
                nn.init.constant_(cca.match_weight, cca.MATCH_INIT)
        if self.copy is not None:
            nn.init.zeros_(self.copy.sentinel)
            nn.init.constant_(self.copy.sentinel_bias, self.copy.init_bias)
            nn.init.constant_(self.copy.match_weight, self.copy.MATCH_INIT)
            nn.init.zeros_(self.copy.gate)

    def retrieval_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the encoder and the CCA layers: the only weights trained."""
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield name, p

    def num_params(self) -> int:
        """Number of parameters, the frozen base's included."""
        return sum(p.numel() for p in self.parameters())

    def train(self, mode: bool = True) -> RetroFitted:
        """Train mode for the retrieval part; the frozen base stays in eval mode (no dropout)."""
        super().train(mode)
        self.base.eval()
        return self

    @property
    def lm_head(self) -> nn.Module:
        """The base's output layer (hidden states -> logits)."""
        return self.base.get_output_embeddings()

    # ---- the hook: hidden states in, hidden states plus the CCA residual out

    def _after_layer(self, layer: int, module: nn.Module, args: Any, output: Any) -> Any:
        state = self._pass
        if state is None or (state.cache is None and state.neighbours is None):
            return None  # RETRO[OFF]: the base's output, untouched
        if state.cache is not None and not state.cache.retrieval:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        new = self._cca_residual(layer, hidden, state)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _cca_residual(self, layer: int, hidden: Tensor, state: _Pass) -> Tensor:
        """hidden + CCA(norm(hidden)) (B, T, d), in float32, returned in the base's dtype."""
        x = hidden.float()  # (B, T, d)
        cache, start, m = state.cache, state.start, self.cfg.chunk_size
        if cache is None:
            chunks = x.shape[1] // m  # chunks whose neighbours some position reads
            if layer == self.first_cca and chunks > 0 and state.neighbours is not None:
                state.encoded, state.nb_mask = self._encode(
                    state.neighbours[:, :chunks], x[:, : chunks * m], state.tokens[:, : chunks * m]
                )
            keys = values = None
            if state.encoded is not None:
                keys, values = self.cca[str(layer)].keys_values(state.encoded, self.rotary)
            key_mask, ids, nb_ids = state.nb_mask, None, None
            if self.cfg.cca_match and state.neighbours is not None:
                if state.match is None:
                    state.match = self._match_ids(state.tokens, state.neighbours[:, :chunks])
                ids, nb_ids = state.match
        else:
            keys, values, key_mask, ids, nb_ids = self._cached_keys(layer, x, state)
        cca = partial(
            self.cca[str(layer)],
            start=start,
            keys=keys,
            values=values,
            key_mask=key_mask,
            rotary=self.rotary,
            ids=ids,
            nb_ids=nb_ids,
        )
        return self.cca_res[str(layer)](x, cca).to(hidden.dtype)

    def _cached_keys(self, layer: int, x: Tensor, state: _Pass) -> tuple[Any, ...]:
        """Cache the chunk activations and new neighbours' keys/values; read every chunk's."""
        cache = state.cache
        assert cache is not None
        B, T, _ = x.shape
        m, start = self.cfg.chunk_size, state.start
        new = 0 if state.neighbours is None else state.neighbours.shape[1]
        total = cache.num_chunks + new
        if layer == self.first_cca:
            if cache.chunk_acts is None:
                cache.chunk_acts = x.new_zeros(B, cache.size, x.shape[2])
            cache.chunk_acts[:, start : start + T] = x
            if new:
                span = slice(cache.num_chunks * m, total * m)
                state.encoded, state.nb_mask = self._encode(
                    state.neighbours, cache.chunk_acts[:, span], cache.token_ids[:, span]
                )
        if state.encoded is not None and state.nb_mask is not None:
            keys, values = self.cca[str(layer)].keys_values(state.encoded, self.rotary)
            self._store(cache, layer, keys, values, state)
        if total == 0:
            return None, None, None, None, None
        ids = nb_ids = None
        if cache.nb_ids is not None:
            ids = cache.token_ids[:, : start + T]
            ids = ids.masked_fill(ids == self.cfg.pad_id, -2)
            nb_ids = cache.nb_ids[:, :total]
        return (
            cache.keys[layer][:, :total],
            cache.values[layer][:, :total],
            cache.mask[:, :total] if cache.mask is not None else None,
            ids,
            nb_ids,
        )

    def _store(
        self, cache: CCACache, layer: int, keys: Tensor, values: Tensor | None, state: _Pass
    ) -> None:
        """Write keys/values (B, U, h, k*r, hd) of the newly encoded chunks into the cache
        (values None: the copy head's keys)."""
        B, U, h, KR, hd = keys.shape
        u0, u1 = cache.num_chunks, cache.num_chunks + U
        chunks = cache.size // self.cfg.chunk_size
        if layer not in cache.keys:
            cache.keys[layer] = keys.new_zeros(B, chunks, h, KR, hd)
            if values is not None:
                cache.values[layer] = values.new_zeros(B, chunks, h, KR, hd)
        cache.keys[layer][:, u0:u1] = keys
        if values is not None:
            cache.values[layer][:, u0:u1] = values
        if layer == self.first_cca:
            assert state.nb_mask is not None and state.neighbours is not None
            if cache.mask is None:
                cache.mask = state.nb_mask.new_zeros(B, chunks, KR)
            cache.mask[:, u0:u1] = state.nb_mask
            if self.cfg.cca_match:
                if cache.nb_ids is None:
                    cache.nb_ids = state.neighbours.new_full(
                        (B, chunks, *state.neighbours.shape[2:]), -1
                    )
                cache.nb_ids[:, u0:u1] = self._match_ids(state.tokens, state.neighbours)[1]

    def _encode(
        self, neighbours: Tensor, chunk_acts: Tensor, chunk_tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Encode the neighbours (B, U, k, r) of U chunks, given the chunks' activations
        (B, U*m, d) and tokens (B, U*m); returns (B, U, k, r, e) and the mask (B, U, k*r)."""
        assert self.encoder is not None
        B, U, K, R = neighbours.shape
        m, pad = self.cfg.chunk_size, self.cfg.pad_id
        neighbour_mask = neighbours != pad  # (B, U, k, r)
        embedded = self.base.get_input_embeddings()(neighbours).float()  # (B, U, k, r, d)
        encoded = self.encoder(
            embedded.flatten(0, 1),  # (B*U, k, r, d)
            neighbour_mask.flatten(0, 1),  # (B*U, k, r)
            chunk_acts.reshape(B * U, m, -1),  # (B*U, m, d)
            (chunk_tokens != pad).reshape(B * U, m),  # (B*U, m)
        )
        return encoded.view(B, U, K, R, -1), neighbour_mask.view(B, U, K * R)

    # ---- forward

    def _run_base(self, state: _Pass, **kwargs: Any) -> Any:
        """The base's decoder (no output layer) with the hooks reading `state`."""
        self._pass = state
        try:
            return self.base.base_model(input_ids=state.tokens, **kwargs)
        finally:
            self._pass = None

    def hidden_states(self, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """The base's final (normalised) hidden states (B, n, d) with CCA; see `forward`. (With a
        copy head, `lm_head` of them is the LM part of the distribution, not all of it.)"""
        return self._hidden(tokens, neighbours)[0]

    def _hidden(self, tokens: Tensor, neighbours: Tensor | None) -> tuple[Tensor, _Pass]:
        """The checked full pass: (final hidden states (B, n, d), the pass's state)."""
        check_tokens(self.cfg, tokens)
        if neighbours is not None:
            check_neighbours(self.cfg, neighbours, *tokens.shape)
        state = _Pass(tokens=tokens, start=0, neighbours=neighbours)
        return self._run_base(state, use_cache=False).last_hidden_state, state

    def _copy(self, hidden: Tensor, state: _Pass, start: int) -> tuple[Tensor, Tensor] | None:
        """The copy head's (weights (B, T, 1 + k*r), ids (B, T, k*r)) for final hidden states
        (B, T, d) at positions start..start+T-1 of the pass `state`; None: no position copies.
        In a cached pass the head's keys of the newly encoded chunks are cached here."""
        if self.copy is None or (self.copy.closed() and not torch.is_grad_enabled()):
            return None  # a closed gate is the plain LM (training still needs its gradient)
        cache, T = state.cache, hidden.shape[1]
        if cache is None:
            if state.encoded is None or state.match is None:
                return None
            keys, mask = self.copy.keys(state.encoded), state.nb_mask
            ids, nb_ids = state.match
        else:
            if not cache.retrieval:
                return None
            if state.encoded is not None:
                self._store(cache, self.copy_layer, self.copy.keys(state.encoded), None, state)
            new = 0 if state.neighbours is None else state.neighbours.shape[1]
            total = cache.num_chunks + new
            if total == 0 or cache.mask is None or cache.nb_ids is None:
                return None
            keys, mask = cache.keys[self.copy_layer][:, :total], cache.mask[:, :total]
            ids = cache.token_ids[:, : start + T]
            ids, nb_ids = ids.masked_fill(ids == self.cfg.pad_id, -2), cache.nb_ids[:, :total]
        span = Span(start, T, self.rotary, hidden.device, start + T, match_ids=ids)
        weights = self.copy.attend(hidden.float(), span, keys, None, mask, nb_ids)
        return None if weights is None else (weights, self.copy.copy_ids(span, nb_ids, T))

    def forward(self, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """Logits (B, n, vocab_size) for every position (with a copy head reading neighbours:
        the log-probabilities of its mixture, `CopyHead.mix`).

        Args:
            tokens: (B, n) int64, 1 <= n <= max_seq_len.
            neighbours: (B, n // m or ceil(n / m), k, r) int64: neighbours[:, u] were retrieved
                with chunk u; pad_id tokens are padding. None runs RETRO[OFF] (the base model).
        Raises:
            ValueError: wrong shapes, dtypes or token ids.
        """
        return self._logits(*self._hidden(tokens, neighbours))

    def _logits(self, hidden: Tensor, state: _Pass) -> Tensor:
        """The output distribution of a full pass's final hidden states (B, n, d)."""
        logits = self.lm_head(hidden)
        copy = self._copy(hidden, state, 0)
        return logits if copy is None else CopyHead.mix(logits, *copy)

    @torch.no_grad()
    def base_and_retro(self, tokens: Tensor, neighbours: Tensor) -> tuple[Tensor, Tensor]:
        """The base's final hidden states (B, n, d) and RETRO[ON]'s logits (B, n, V) (`forward`
        with `neighbours`), with the layers below the first CCA layer run once for both: the
        second pass replays their output instead of recomputing it. Inference only.
        """
        layers = list(decoder_layers(self.base))[: self.first_cca]
        if not self.cfg.retrieval or not layers:
            return self.hidden_states(tokens), self(tokens, neighbours)
        check_neighbours(self.cfg, neighbours, *tokens.shape)
        shared: list[Any] = []
        capture = layers[-1].register_forward_hook(lambda module, args, out: shared.append(out))
        try:
            base_hidden = self.hidden_states(tokens)
        finally:
            capture.remove()
        own = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:  # each returns the shared output whatever it is given
            layer.forward = lambda *args, **kwargs: shared[0]
        try:
            hidden, state = self._hidden(tokens, neighbours)
        finally:
            for layer, forward in zip(layers, own, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
        return base_hidden, self._logits(hidden, state)

    def loss(self, tokens: Tensor, targets: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of `targets` (B, n) given `tokens`; targets equal to pad_id ignored
        (0 when every target is padding). The output layer and the loss run in row blocks
        (`_LinearCrossEntropy`, with the copy head's mixture), so no (B, n, vocab) logits are
        kept for backward.
        """
        if not isinstance(targets, Tensor) or targets.shape != tokens.shape:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"targets must have the shape of tokens {tuple(tokens.shape)}; got {got}"
            )
        hidden, state = self._hidden(tokens, neighbours)  # (B, n, d)
        mixture: tuple[Tensor, ...] = ()
        copy = self._copy(hidden, state, 0)
        if copy is not None:
            weights, ids = copy  # (B, n, 1 + k*r), (B, n, k*r)
            copied = (weights[..., 1:] * (ids == targets[..., None])).sum(-1)  # (B, n)
            log_gate = weights[..., 0].clamp_min(1e-30).log()
            mixture = (log_gate.flatten(), copied.flatten())
        head = self.lm_head
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("RETRO-fitting expects an output layer without bias")
        weight = head.weight  # (V, d)
        return _LinearCrossEntropy.apply(
            hidden.flatten(0, 1).to(weight.dtype), weight, targets.flatten(), self.cfg.pad_id,
            *mixture,
        )  # fmt: skip

    # ---- generation

    def _forward_cached(self, tokens: Tensor, cache: CCACache, neighbours: Tensor | None) -> Tensor:
        """Feed tokens (B, T) at positions cache.length.. and return the last logits (B, V).

        `neighbours` (B, U, k, r) belong to chunks cache.num_chunks .. +U-1, which complete
        within these tokens; they are encoded here, once, and their CCA keys/values cached.
        """
        B, T = tokens.shape
        start = cache.length
        cache.token_ids[:, start : start + T] = tokens
        positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        state = _Pass(tokens=tokens, start=start, neighbours=neighbours, cache=cache)
        out = self._run_base(
            state, position_ids=positions, use_cache=True, **{self._cache_arg: cache.kv}
        )
        last = out.last_hidden_state[:, -1:]  # (B, 1, d)
        copy = self._copy(last, state, start + T - 1)
        cache.length = start + T
        cache.num_chunks += 0 if neighbours is None else neighbours.shape[1]
        logits = self.lm_head(last)
        return (logits if copy is None else CopyHead.mix(logits, *copy))[:, 0]  # (B, V)

    def _new_cache(self, out: Tensor, size: int, retrieval: bool) -> CCACache:
        from transformers import DynamicCache

        kv = DynamicCache(config=self.base.config)
        return CCACache(token_ids=out.new_zeros(out.shape[0], size), kv=kv, retrieval=retrieval)

    @torch.inference_mode()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        retrieve: Retrieve | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """Continue `prompt` (B, P) by `max_new_tokens` tokens, as `RETRO.generate` does.

        Each time a chunk of m tokens is complete and a later token is about to be fed,
        `retrieve(chunk (B, m)) -> (B, k, r)` gives its neighbours, encoded once. Past
        max_seq_len the window drops its oldest whole chunk and is encoded again
        (`window_start`). Greedy output equals recomputation with `model(window, neighbours)`.

        Returns:
            (B, P + max_new_tokens) int64.
        Raises:
            ValueError: bad shapes, lengths or sampling settings.
        """
        return windowed_generate(
            self, prompt, max_new_tokens, retrieve, temperature, top_k, top_p, generator, on_token
        )

    # ---- save / load: the retrieval weights and the config only, never the base

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write `config.json` (the RetrofitConfig) and `retrofit.safetensors` (retrieval weights).

        The base is not copied: the config names its folder and the hash of its weights.
        """
        tensors = dict(self.retrieval_parameters())
        return weights.write_model_folder(
            folder, self.cfg.to_dict(), tensors, weights_file=WEIGHTS_FILE, meta_key=_META_KEY
        )

    @classmethod
    def from_config(cls, cfg: RetrofitConfig) -> RetroFitted:
        """Fresh retrieval weights on the base named by `cfg` (made by `retrofit_config`)."""
        return cls(load_base(cfg.base_path, cfg.dtype), cfg)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        base: str | os.PathLike[str] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> RetroFitted:
        """Load a model written by `save`, with the base from `base` (default: the recorded
        folder, or the recorded GGUF file converted again if that folder is gone).

        Raises:
            InputError: a file is missing, or the base folder is not there.
            MismatchError: the base's weights changed since the retrofit was trained.
            CorruptArtifactError: unreadable files, missing, extra or misshapen weights.
        """
        from retrolm.hf.resolve import resolve_base

        folder = Path(folder)
        cfg, state = _read_folder(folder)
        if base is None and not Path(cfg.base_path).is_dir() and cfg.base_gguf:
            base = cfg.base_gguf  # the converted folder is gone: convert the file again
        base_path = resolve_base(base) if base is not None else Path(cfg.base_path)
        if not base_path.is_dir():
            raise InputError(
                f"the base model folder {base_path} recorded in {folder / CONFIG_FILE} is not "
                "there; give it with load(folder, base=PATH)"
            )
        check_base_hash(base_path, cfg.base_sha256)
        model = cls(load_base(base_path, cfg.dtype), cfg)
        expected = dict(model.retrieval_parameters())
        weights.check_keys(expected, state, folder / WEIGHTS_FILE, "this retrofit config")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(state[name])
        return model.to(map_location)


def is_retrofit_folder(folder: str | os.PathLike[str]) -> bool:
    """True when `folder` holds a model written by `RetroFitted.save` (not by `RETRO.save`)."""
    return (Path(folder) / WEIGHTS_FILE).is_file()


def _read_folder(folder: Path) -> tuple[RetrofitConfig, dict[str, Tensor]]:
    return weights.read_model_folder(
        folder,
        config_class=RetrofitConfig,
        weights_file=WEIGHTS_FILE,
        meta_key=_META_KEY,
        written_by="RetroFitted.save",
    )


def _cache_argument(backbone: nn.Module) -> str:
    """The keyword the base's decoder takes its KV cache by: `cache` where the installed
    transformers names it so, else `past_key_values`."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A base layer's forward, recomputed in backward instead of keeping its activations."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
