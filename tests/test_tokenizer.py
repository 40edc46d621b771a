"""The byte-level BPE tokenizer: exact round trip, special ids, save/load, determinism."""

from __future__ import annotations

import pytest

from retrolm.errors import InputError
from retrolm.tokenizer import Tokenizer, train_tokenizer

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "ünïcødé, 日本語のテキスト, emoji 🙂🚀 and tabs\tand\r\nwindows newlines",
] * 10

HARD = [
    "",
    " ",
    "  leading and trailing  ",
    "<eos> and <pad> are text here",
    "\x00\x01 control \u200b zero-width \ufeff bom",
    "a" * 1000,
    "mixed 🙂 scripts: Ελληνικά русский עברית العربية",
    "\n\n\t\r\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.mark.parametrize("text", HARD + TEXTS[:3])
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_decode_drops_them(tok):
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids = tok.encode("hello world")
    assert tok.pad_id not in tok.encode("<pad>") and tok.eos_id not in tok.encode("<eos>")
    assert tok.decode(ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "hello world"
    assert 258 < tok.vocab_size <= 400  # fewer when the texts run out of pairs to merge


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(HARD) == [tok.encode(t) for t in HARD]
    assert tok.decode_batch(tok.encode_batch(HARD)) == HARD


def test_training_is_deterministic_and_save_load_keeps_everything(tok, tmp_path):
    again = train_tokenizer(TEXTS, vocab_size=400)
    assert again.sha256 == tok.sha256
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)  # a folder holding tokenizer.json
    assert loaded.sha256 == tok.sha256
    assert loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_bad_tokenizers_are_refused(tmp_path):
    with pytest.raises(InputError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{nonsense", encoding="utf-8")
    with pytest.raises(InputError, match="cannot read the tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")
    from retrolm.database.embed import make_tiny_bert

    folder = make_tiny_bert(tmp_path / "bert")  # a lower-casing WordPiece tokenizer
    with pytest.raises(InputError, match="exact text back"):
        Tokenizer.load(folder)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)
