"""Reading corpora: folders, files, JSONL, Parquet; stable names, ids, splits; bad inputs."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrolm.corpus import (
    Document,
    Skipped,
    assign_split,
    document_id,
    iter_corpus,
    read_split_list,
)
from retrolm.errors import InputError


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second file\n", encoding="utf-8")
    (root / "a.txt").write_text("first file ünï 日本\n", encoding="utf-8")
    (root / "sub" / "c.md").write_text("# nested\n", encoding="utf-8")
    (root / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_text("   \n", encoding="utf-8")
    return root


def _events(paths, **kw):
    return list(iter_corpus(paths, **kw))


def test_folder_yields_documents_in_stable_order_and_skips_bad_files(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(
        logging.getLogger("retrolm"), "propagate", True
    )  # the CLI may have unset it
    root = _corpus(tmp_path)
    events = _events([root])
    docs = [item for _, item in events if isinstance(item, Document)]
    skipped = {
        item.name.rsplit("/", 1)[-1]: item.reason for _, item in events if isinstance(item, Skipped)
    }
    assert [d.name for d in docs] == [
        f"{root.as_posix()}/{n}" for n in ("a.txt", "b.txt", "sub/c.md")
    ]
    assert docs[0].text == "first file ünï 日本\n"  # exact text, no normalisation
    assert skipped == {"binary.bin": "binary", "latin1.txt": "undecodable", "empty.txt": "empty"}
    assert [e for e, _ in events] == list(range(len(events)))
    assert "latin1.txt: undecodable" in caplog.text


def test_glob_selects_files_and_missing_path_is_skipped(tmp_path):
    root = _corpus(tmp_path)
    docs = [i for _, i in _events([root], glob="**/*.md")]
    assert [d.name for d in docs] == [f"{root.as_posix()}/sub/c.md"]
    (item,) = [i for _, i in _events([tmp_path / "nope.txt"])]
    assert isinstance(item, Skipped) and item.reason == "unreadable"


def test_strict_turns_a_skip_into_an_error_naming_the_file(tmp_path):
    root = _corpus(tmp_path)
    with pytest.raises(InputError, match="binary.bin: binary"):
        _events([root], strict=True)


def test_start_event_resumes_the_same_stream(tmp_path):
    root = _corpus(tmp_path)
    full = _events([root])
    assert _events([root], start_event=3) == full[3:]


def test_jsonl_text_field_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"body": "one"}),
        "",
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"body": "two <eos> \u00e9"}),
        json.dumps(["a list"]),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = [i for _, i in _events([path], text_field="body")]
    docs = [i for i in items if isinstance(i, Document)]
    assert [(d.name, d.text) for d in docs] == [
        (f"{path.as_posix()}:1", "one"),
        (f"{path.as_posix()}:5", "two <eos> é"),
    ]
    reasons = [i.reason for i in items if isinstance(i, Skipped)]
    assert reasons == ["bad_record", "bad_record", "bad_record"]
    with pytest.raises(InputError, match=r"data.jsonl:3: bad_record"):
        _events([path], text_field="body", strict=True)


def test_parquet_text_column(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"content": ["alpha", "", None, "beta"], "n": [1, 2, 3, 4]}), path)
    items = [i for _, i in _events([path], text_field="content")]
    assert [(i.name, i.text) for i in items if isinstance(i, Document)] == [
        (f"{path.as_posix()}:1", "alpha"),
        (f"{path.as_posix()}:4", "beta"),
    ]
    assert [i.reason for i in items if isinstance(i, Skipped)] == ["empty", "bad_record"]
    (missing,) = [i for _, i in _events([path])]  # default field "text" is not a column
    assert missing.reason == "bad_record" and "content" in missing.detail


def test_ids_and_splits_are_stable_and_follow_the_fraction():
    names = [f"doc-{i}" for i in range(4000)]
    splits = [assign_split(n, 0.1) for n in names]
    assert splits == [assign_split(n, 0.1) for n in names]
    assert 0.08 < splits.count("valid") / len(names) < 0.12
    assert all(assign_split(n, 0.0) == "train" for n in names[:100])
    assert document_id("a/b.txt") == document_id("a/b.txt") != document_id("a/c.txt")
    assert len(document_id("x")) == 16


def test_explicit_split_list(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text("# valid docs\ndoc-1\n\ndoc-7\n", encoding="utf-8")
    names = read_split_list(path)
    assert names == {"doc-1", "doc-7"}
    assert [assign_split(f"doc-{i}", 0.5, names) for i in range(8)].count("valid") == 2
    (tmp_path / "blank.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="names no documents"):
        read_split_list(tmp_path / "blank.txt")
