"""Byte-level BPE tokenizers (HF `tokenizers`): train, load, encode exactly, decode exactly.

A trained tokenizer has `<pad>` at id 0 and `<eos>` at id 1. Special-token strings that occur in
the text itself are encoded as plain text (`encode_special_tokens`), so that
`decode(encode(text)) == text` holds for every string, including one that contains "<eos>".
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from retrolm.errors import InputError
from retrolm.io import atomic_open

log = logging.getLogger(__name__)

PAD = "<pad>"
EOS = "<eos>"
TOKENIZER_FILE = "tokenizer.json"
# Checked on every loaded tokenizer: a tokenizer that cannot give this back is refused.
ROUND_TRIP_PROBE = 'Hello  world!\n\tTabs, "quotes", <eos> and ünïcødé 日本語 🙂\r\n  end '


class Tokenizer:
    """A HF `tokenizers.Tokenizer` with the ids retrolm needs (`pad_id`, `eos_id`).

    Attributes:
        vocab_size: number of token ids (including the special tokens).
        pad_id: id of `<pad>` (0 for tokenizers trained here).
        eos_id: id of `<eos>`, appended to every document.
        sha256: hash of the tokenizer's JSON serialisation (recorded in a database manifest).
    """

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        self.hf.encode_special_tokens = True  # "<eos>" in the text is text, not a special token
        self.pad_id = self._require(PAD)
        self.eos_id = self._require(EOS)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(hf.to_str().encode("utf-8")).hexdigest()
        self._special = {self.pad_id, self.eos_id}

    def _require(self, token: str) -> int:
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            self.hf.add_special_tokens([token])
            token_id = self.hf.token_to_id(token)
            log.info("the tokenizer had no %s token; added it as id %d", token, token_id)
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel, in Rust)."""
        # encode_batch_fast skips the character offsets: same ids, less memory and time
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; `<pad>` and `<eos>` are dropped."""
        kept = [int(i) for i in ids if int(i) not in self._special]
        return self.hf.decode(kept, skip_special_tokens=False)

    def decode_batch(self, rows: Sequence[Iterable[int]]) -> list[str]:
        """`decode` of many id sequences at once (parallel, in Rust)."""
        kept = [[int(i) for i in row if int(i) not in self._special] for row in rows]
        return self.hf.decode_batch(kept, skip_special_tokens=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as `tokenizer.json` (atomically) at `path` (a file path)."""
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(self.hf.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a `tokenizer.json` file or a local HF tokenizer folder that contains one.

        Raises:
            InputError: missing or unreadable file, or a tokenizer that does not give the exact
                text back (e.g. one that lower-cases or normalises).
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise InputError(
                f"no tokenizer at {path}: give a tokenizer.json file or a folder containing one"
            )
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise InputError(f"cannot read the tokenizer {file}: {e}") from e
        tok = cls(hf)
        back = tok.decode(tok.encode(ROUND_TRIP_PROBE))
        if back != ROUND_TRIP_PROBE:
            raise InputError(
                f"the tokenizer {file} does not give the exact text back ({ROUND_TRIP_PROBE!r} -> "
                f"{back!r}); use a byte-level BPE tokenizer, or let retrolm train one"
            )
        return tok


def new_bpe() -> HFTokenizer:
    """An untrained byte-level BPE tokenizer that round-trips any text exactly."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 16384, *, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `<pad>` = 0 and `<eos>` = 1.

    Args:
        texts: the training texts (streamed; the train split of a corpus).
        vocab_size: the number of ids, special tokens and the 256 byte tokens included.

    Raises:
        ValueError: a vocabulary too small for the 256 bytes and the special tokens.
    """
    if vocab_size < 258:
        raise ValueError(
            f"vocab_size must be >= 258 (256 bytes + 2 special tokens), got {vocab_size}"
        )
    hf = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
