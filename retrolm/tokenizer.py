"""Tokenizers (HF `tokenizers`): retrolm's own byte-level BPE, or a Hugging Face model's.

Two kinds:
- `retrolm`: trained here (`train_tokenizer`): byte-level BPE with `<pad>` at id 0 and `<eos>` at
  id 1; `decode(encode(text)) == text` for every string.
- `foreign`: a Hugging Face model's tokenizer (a folder with `tokenizer.json` and
  `tokenizer_config.json`, or a bare `tokenizer.json`): byte-level BPE (GPT-2, GPT-NeoX/Pythia,
  Qwen2) or SentencePiece-style (Llama, Mistral: "▁" for spaces, byte fallback). No token is
  added (the base model's embedding has none for it): eos and pad are the tokenizer's own ids,
  named by its config (pad falls back to eos). Its decode need not be an exact inverse (a
  SentencePiece decode drops the space at the start of a text, normalizers change characters):
  bytes are counted from the source text (`byte_counts`), and decoded text is for display.

Special-token strings that occur in the text itself are encoded as plain text
(`encode_special_tokens`), so "<eos>" or "<|endoftext|>" in a document is text, never an eos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from retrolm.errors import InputError
from retrolm.io import atomic_open

log = logging.getLogger(__name__)

PAD = "<pad>"
EOS = "<eos>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # HF: special tokens
# end-of-text tokens of common model families, tried when the config names none
EOS_NAMES = ("<|endoftext|>", "</s>", "<|im_end|>", "<|end_of_text|>", EOS)
# files of a tokenizer folder that transformers can convert to a tokenizer.json
SLOW_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")
# Checked on every loaded tokenizer: retrolm's must give this back exactly; a foreign one at
# least up to whitespace and Unicode normal form (else it loses case, accents or characters).
ROUND_TRIP_PROBE = 'Hello  world!\n\tTabs, "quotes", <eos> and ünïcødé 日本語 🙂\r\n  end '
# Cut before each space to learn how a tokenizer encodes the pieces of a long document.
PIECES_PROBE = "The quick brown fox, 42 jumps over the lazy dog. Ünïcødé 日本語 end"


class Tokenizer:
    """A HF `tokenizers.Tokenizer` with the ids retrolm needs (`pad_id`, `eos_id`).

    Attributes:
        kind: "retrolm" (trained here: `<pad>` = 0, `<eos>` = 1) or "foreign" (a Hugging Face
            model's tokenizer, its own special ids, nothing added).
        vocab_size: number of token ids (including the special tokens).
        pad_id: padding id (0 for tokenizers trained here; a foreign one's pad, else its eos).
        eos_id: end-of-text id, appended to every document.
        bos_id: a foreign tokenizer's beginning-of-text id (None if it has none); never inserted
            into the database, recorded for models that expect it.
        decode_exact: whether `decode(encode(text)) == text` held on the probe text.
        piece_drops_space: encode the pieces of a long document (cut before a space) without
            that space, because the tokenizer marks the start of every text with one ("▁"):
            then the pieces' ids, joined, are the whole text's (see `encode_documents`).
        sha256: hash of the tokenizer's JSON serialisation (and, foreign, its special ids);
            recorded in a database manifest.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        special: dict[str, str | None] | None = None,
        name: str = "the tokenizer",
    ) -> None:
        """Wrap `hf`.

        Args:
            hf: the HF tokenizer.
            special: None for a retrolm tokenizer (`<pad>` and `<eos>` are required, and added
                if missing); for a foreign one, its special tokens by role (`eos_token`,
                `pad_token`, `bos_token`; None where the config names none).
            name: where it came from, for messages.

        Raises:
            InputError: a foreign tokenizer whose eos cannot be found.
        """
        self.hf = hf
        self.hf.encode_special_tokens = True  # "<eos>" in the text is text, not a special token
        self.kind = "retrolm" if special is None else "foreign"
        self.bos_id: int | None = None
        if special is None:
            self.pad_id = self._require(PAD)
            self.eos_id = self._require(EOS)
        else:
            self._foreign_ids(special, name)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        identity = hf.to_str()
        if self.kind == "foreign":
            identity += json.dumps([self.pad_id, self.eos_id, self.bos_id])
        self.sha256 = hashlib.sha256(identity.encode("utf-8")).hexdigest()
        self._special = {self.pad_id, self.eos_id}
        self.decode_exact = self.decode(self.encode(ROUND_TRIP_PROBE)) == ROUND_TRIP_PROBE
        self.piece_drops_space = self._pieces_drop_space()

    def _require(self, token: str) -> int:
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            self.hf.add_special_tokens([token])
            token_id = self.hf.token_to_id(token)
            log.info("the tokenizer had no %s token; added it as id %d", token, token_id)
        return int(token_id)

    def _foreign_ids(self, special: dict[str, str | None], name: str) -> None:
        eos = special.get("eos_token")
        candidates = [eos] if eos else [t for t in EOS_NAMES if self.hf.token_to_id(t) is not None]
        if not candidates or self.hf.token_to_id(candidates[0]) is None:
            what = (
                f"its eos_token {eos!r} is not in its vocabulary"
                if eos
                else (
                    "no eos_token in tokenizer_config.json / special_tokens_map.json, and none of "
                    + ", ".join(EOS_NAMES)
                    + " in its vocabulary"
                )
            )
            raise InputError(
                f"{name} has no end-of-text token ({what}); give the model's tokenizer folder "
                "with a tokenizer_config.json that names its eos_token"
            )
        self.eos_id = int(self.hf.token_to_id(candidates[0]))
        pad = special.get("pad_token")
        pad_id = self.hf.token_to_id(pad) if pad else None
        if pad_id is None:
            pad_id = self.eos_id
            log.info(
                "%s has no pad token: padding with its eos %r (id %d), so eos targets are not "
                "scored or trained on",
                name,
                candidates[0],
                self.eos_id,
            )
        self.pad_id = int(pad_id)
        bos = special.get("bos_token")
        bos_id = self.hf.token_to_id(bos) if bos else None
        self.bos_id = None if bos_id is None else int(bos_id)

    def _pieces_drop_space(self) -> bool:
        cuts = [i for i, c in enumerate(PIECES_PROBE) if c == " "]
        pieces = [PIECES_PROBE[a:b] for a, b in zip([0, *cuts], [*cuts, len(PIECES_PROBE)])]
        whole = self.encode(PIECES_PROBE)
        kept = [i for ids in self.encode_batch(pieces) for i in ids]
        if kept == whole:
            return False
        dropped = self.encode_batch([pieces[0], *(p[1:] for p in pieces[1:])])
        if [i for ids in dropped for i in ids] == whole:
            return True
        log.warning(
            "the tokenizer encodes text cut before a space differently from the whole text: a "
            "document longer than --tokenize-batch-bytes gets slightly different ids near its cuts"
        )
        return False

    def special_tokens(self) -> dict[str, Any]:
        """The special ids (and, foreign, their strings): what a database manifest records."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }
        if self.kind == "foreign":
            for role in ("pad", "eos", "bos"):
                token_id = out[f"{role}_id"]
                out[f"{role}_token"] = None if token_id is None else self.hf.id_to_token(token_id)
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel, in Rust)."""
        # encode_batch_fast skips the character offsets: same ids, less memory and time
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_batch_with_ends(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, end character offset into the text of each token) of many texts at once."""
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, [end for _, end in e.offsets]) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; `<pad>` and `<eos>` are dropped."""
        kept = [int(i) for i in ids if int(i) not in self._special]
        return self.hf.decode(kept, skip_special_tokens=False)

    def decode_after(self, context: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `context` (a prompt): `decode(ids)` for an exact byte-level
        decode; otherwise decoded behind the last tokens of `context`, so that a SentencePiece
        continuation keeps the space its first token ("▁sat") stands for."""
        if self.kind == "retrolm":
            return self.decode(ids)
        tail = [int(i) for i in context if int(i) not in self._special][-8:]
        head, full = self.decode(tail), self.decode([*tail, *ids])
        return full[len(head) :] if full.startswith(head) else self.decode(ids)

    def decode_batch(self, rows: Sequence[Iterable[int]]) -> list[str]:
        """`decode` of many id sequences at once (parallel, in Rust)."""
        kept = [[int(i) for i in row if int(i) not in self._special] for row in rows]
        return self.hf.decode_batch(kept, skip_special_tokens=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as `tokenizer.json` (atomically) at `path` (a file path); a foreign
        one also gets its special tokens in `tokenizer_config.json` beside it, so that `load`
        of the file gives the same ids."""
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(self.hf.to_str())
        if self.kind == "foreign":
            special = self.special_tokens()
            roles = {f"{r}_token": special[f"{r}_token"] for r in ("eos", "pad", "bos")}
            with atomic_open(Path(path).with_name(CONFIG_FILES[0]), "w", encoding="utf-8") as f:
                json.dump(roles, f, ensure_ascii=False, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a `tokenizer.json` file or a local HF tokenizer folder that contains one.

        A tokenizer with `<pad>` at id 0 and `<eos>` at id 1 is retrolm's own; any other is a
        foreign one, whose special tokens come from the `tokenizer_config.json` /
        `special_tokens_map.json` beside the file (or the usual eos names, `EOS_NAMES`).

        Raises:
            InputError: missing or unreadable file; a folder with only a slow tokenizer (no
                tokenizer.json); a foreign tokenizer without an eos; a retrolm tokenizer that does
                not give the exact text back, or a foreign one that does not even up to
                whitespace and Unicode normal form (one that lower-cases or strips accents).
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise InputError(_missing_message(path))
        try:  # read here, not by path: the library takes only UTF-8 paths
            hf = HFTokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise InputError(f"cannot read the tokenizer {file}: {e}") from e
        retrolm_kind = hf.token_to_id(PAD) == 0 and hf.token_to_id(EOS) == 1
        _check_round_trip(hf, file, exact=retrolm_kind)
        if retrolm_kind:
            return cls(hf)
        tok = cls(hf, special=read_special_tokens(file.parent), name=f"the tokenizer {file}")
        if not tok.decode_exact:
            log.info(
                "the tokenizer %s does not decode exactly (%r -> %r): bytes are counted from the "
                "source text, and decoded text (neighbours, samples) may differ in spaces",
                file,
                ROUND_TRIP_PROBE,
                tok.decode(tok.encode(ROUND_TRIP_PROBE)),
            )
        return tok


def _missing_message(path: Path) -> str:
    slow = [f for f in SLOW_FILES if (path / f).is_file()] if path.is_dir() else []
    if slow:
        return (
            f"the tokenizer folder {path} has no tokenizer.json (only a slow tokenizer: "
            f"{', '.join(slow)}); convert it once with transformers: "
            f"AutoTokenizer.from_pretrained('{path}').save_pretrained('{path}')"
        )
    return f"no tokenizer at {path}: give a tokenizer.json file or a folder containing one"


def loose_text(text: str) -> str:
    """`text` up to Unicode normal form and whitespace (what a decode may change harmlessly)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _check_round_trip(hf: HFTokenizer, file: Path, *, exact: bool) -> None:
    hf.encode_special_tokens = True
    back = hf.decode(hf.encode(ROUND_TRIP_PROBE, add_special_tokens=False).ids)
    if back == ROUND_TRIP_PROBE or (not exact and loose_text(back) == loose_text(ROUND_TRIP_PROBE)):
        return
    also = "" if exact else ", not even up to whitespace and Unicode normal form"
    raise InputError(
        f"the tokenizer {file} does not give the exact text back{also} ({ROUND_TRIP_PROBE!r} -> "
        f"{back!r}); use a byte-level BPE or SentencePiece tokenizer with byte fallback, or let "
        "retrolm train one"
    )


def read_special_tokens(folder: Path) -> dict[str, str | None]:
    """`eos_token`, `pad_token`, `bos_token` named by a HF tokenizer folder's config files."""
    found: dict[str, str | None] = {"eos_token": None, "pad_token": None, "bos_token": None}
    for name in reversed(CONFIG_FILES):  # tokenizer_config.json wins
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {path}: {e}; fix or remove it") from None
        for role in found:
            value = config.get(role)
            if isinstance(value, dict):  # an AddedToken: {"content": "</s>", ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                found[role] = value
    return found


def byte_counts(text: str, ends: Sequence[int]) -> np.ndarray:
    """UTF-8 bytes of `text` that each token stands for, from the tokens' end offsets.

    A token counts the source bytes from the end of the furthest earlier token to its own end,
    so the counts are right whatever the tokenizer does to the text (a SentencePiece "▁"
    added at the start, byte-fallback tokens of one character, normalizers): they add up to the
    bytes the tokens cover, i.e. `len(text.encode())` less what lies after the last token's end.

    Args:
        text: the encoded text.
        ends: (n,) end character offset (into `text`) of each token.

    Returns:
        (n,) int64 byte counts.
    """
    if len(ends) == 0:
        return np.zeros(0, dtype=np.int64)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)  # UTF-8 bytes
    position = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])  # char -> byte offset
    furthest = np.maximum.accumulate(np.asarray(ends, dtype=np.int64))
    return np.diff(position[furthest], prepend=0)


def split_for_tokenizer(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most about `max_chars`, cut where the byte-level pre-tokenizer
    splits anyway: before a space between two non-space characters (a token never spans
    such a cut, so the pieces' ids, joined, are the whole text's). Where no such place lies in
    the last half of a piece, the piece is cut at `max_chars` (the ids near that cut may then
    differ from those of the whole text; the result is still deterministic).

    A SentencePiece-style tokenizer ("▁" for a space, "▁" put before every text) encodes
    the pieces after the first without their leading space (`Tokenizer.piece_drops_space`), so
    that the "▁" it adds is the one the whole text has there; see `retrolm.database.chunks.encode_documents`."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + max_chars // 2, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1 : cut + 2].isspace()):
            cut = text.rfind(" ", start + max_chars // 2, cut)
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# Training reads each text in pieces of at most this many characters, cut where the
# pre-tokenizer splits anyway (`split_for_tokenizer`): the same words, so the same merges, as the
# whole text, in memory bounded by the piece (a one-line 30 MB document is not one sequence).
TRAIN_PIECE_CHARS = 1 << 20
# Runs of non-space characters longer than this are fed to training in pieces of this length:
# the BPE trainer's time grows with the square of a word's length (hours for a 5 MB word).
MAX_TRAIN_WORD = 256


def training_pieces(text: str) -> Iterator[str]:
    """`text` as the trainer reads it: pieces of at most `TRAIN_PIECE_CHARS` characters cut at
    pre-tokenizer splits, with every run of more than `MAX_TRAIN_WORD` non-space characters cut
    into runs of `MAX_TRAIN_WORD` (each its own piece)."""
    long_run = re.compile(rf"\S{{{MAX_TRAIN_WORD + 1},}}")
    for piece in split_for_tokenizer(text, TRAIN_PIECE_CHARS):
        position = 0
        for match in long_run.finditer(piece):
            if match.start() > position:
                yield piece[position : match.start()]
            for start in range(match.start(), match.end(), MAX_TRAIN_WORD):
                yield piece[start : min(start + MAX_TRAIN_WORD, match.end())]
            position = match.end()
        if position < len(piece):
            yield piece[position:]


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
        texts: the training texts (streamed; the train split of a corpus), each read in
            bounded pieces (`training_pieces`).
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
    hf.train_from_iterator(
        (piece for text in texts for piece in training_pieces(text)), trainer=trainer
    )
    return Tokenizer(hf)
