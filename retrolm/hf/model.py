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
- Everything but the base's layers is `retrolm.model.RetrievalModel`'s, as in RETRO: the
  hooks run `Reading.observe` and `ChunkedCrossAttention.read` over the pass's `Span`, and
  decoding (`new_cache`, `prefill_rows`, `decode_rows`, `generate`) keeps the base's keys and
  values in the same `KVCache` as the CCA's: the base's attention writes them through
  `_CacheView`, a transformers cache that stores each row at its own position, with a 4-d mask
  and per-row position ids, so rows at different positions decode in one forward pass.
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
from retrolm.inputs import check_neighbours
from retrolm.model import (
    ChunkedCrossAttention,
    CopyHead,
    Encoder,
    Reading,
    Residual,
    RetrievalModel,
    Rotary,
    Span,
)

CONFIG_FILE = "config.json"  # as a RETRO folder's: the file that marks a finished model
WEIGHTS_FILE = "retrofit.safetensors"
_META_KEY = "retrolm_retrofit_config"  # the config, also stored inside the weights file


class _CacheView:
    """The base's KV cache during one cached pass: its attention layers call
    `update(keys, values, layer)` (the transformers `Cache` method they use), which stores them
    in the `KVCache` at the span's positions (`KVCache.write_kv`) and returns every key and
    value the span's queries may attend."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def update(self, keys: Tensor, values: Tensor, layer: int, *args: Any, **kwargs: Any):
        assert self.span.cache is not None
        return self.span.cache.write_kv(layer, keys, values, self.span)


class RetroFitted(RetrievalModel):
    """A frozen Hugging Face causal LM with retrolm's encoder and CCA after some of its layers.

    The same contract as `RETRO` (`retrolm.model.RetrievalModel`): `model(tokens, neighbours)`
    -> logits (`neighbours=None` is RETRO[OFF], which is the base model), `loss`,
    `hidden_states`, the decoding calls (`new_cache`, `prefill_rows`, `decode_rows`), `generate`,
    `retrieval_parameters`, `save` / `load`.
    """

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
        self._state: tuple[Span, Reading | None] | None = None  # set during one base pass
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
        state = self._state
        if state is None or state[1] is None:
            return None  # RETRO[OFF]: the base's output, untouched
        span, reading = state
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        x = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # CCA in >= float32
        reading.observe(layer, x, span)  # the first CCA layer: encode the new neighbours
        cca = partial(self.cca[str(layer)].read, span=span, layer=layer, reading=reading)
        new = self.cca_res[str(layer)](x, cca).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    # ---- the pass through the base

    def _embed_neighbours(self, neighbours: Tensor) -> Tensor:
        embedded = self.base.get_input_embeddings()(neighbours)
        return embedded.to(torch.promote_types(embedded.dtype, torch.float32))

    def _pass(self, tokens: Tensor, span: Span, reading: Reading | None) -> Tensor:
        """The base's decoder (no output layer) over tokens (B, T), the hooks reading `span` and
        `reading`: its final (normalised) hidden states (B, T, d). A cached pass gives the base
        per-row positions, a 4-d mask (a query attends its own and earlier positions; the
        base's own padding rule, no pad mask) and `_CacheView`."""
        kwargs: dict[str, Any] = {"use_cache": False}
        if span.cache is not None:
            B, T = tokens.shape
            dev = tokens.device
            if span.pos is None:
                positions = torch.arange(span.start, span.start + T, device=dev).expand(B, T)
            else:
                positions = span.pos[:, None]  # (R, 1)
            allowed = torch.arange(span.end, device=dev) <= positions[:, None, :, None]
            dtype = self.base.get_input_embeddings().weight.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)  # (B, 1, T, S)
            kwargs = {
                "use_cache": True,
                "position_ids": positions,
                "attention_mask": mask,
                self._cache_arg: _CacheView(span),
            }
        self._state = (span, reading)
        try:
            return self.base.base_model(input_ids=tokens, **kwargs).last_hidden_state
        finally:
            self._state = None

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
            hidden, span, reading = self._full(tokens, neighbours)
        finally:
            for layer, forward in zip(layers, own, strict=True):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
        return base_hidden, self._head(hidden, span, reading)

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
