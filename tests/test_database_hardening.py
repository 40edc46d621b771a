"""Bad inputs to the database commands: each is a one-line error (exit 2) or a warning, never a
traceback, a hang or a half-made database; and retrieval-only copies of held-out documents are
never indexed (they would leak the evaluation text)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import retrolm.database.build as build_module
from retrolm.cli import main as cli_main
from retrolm.corpus import Skipped, iter_corpus, list_inputs
from retrolm.database import Database, add_documents, build_database
from retrolm.database.chunks import name_inputs
from retrolm.database.embed import make_tiny_bert
from retrolm.errors import InputError
from retrolm.evaluate import leakage_ratio, stream_neighbours
from tests.test_database import WORDS, arrays, make_corpus, tiny_config


@pytest.fixture(autouse=True)
def keep_logging():
    # the CLI's setup_logging sets the level and stops propagation (caplog needs it): undo it
    logger = logging.getLogger("retrolm")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    logger.propagate = True
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    bert = make_tiny_bert(root / "bert")
    corpus = make_corpus(root / "corpus", 30, seed=1)
    split_list = root / "valid.txt"  # a fixed valid split, whatever the temporary path
    split_list.write_text(
        "".join(f"{corpus.as_posix()}/doc{i:03d}.txt\n" for i in (2, 7, 11, 19, 23, 28)),
        encoding="utf-8",
    )
    config = tiny_config(bert, valid_list=str(split_list))
    folder = build_database([corpus], root / "db", config, show_progress=False)
    return root, bert, corpus, folder, config


def flags(bert: Path) -> list[str]:
    return [
        "--vocab-size", "300", "--chunk-size", "16", "--block-rows", "40", "--neighbours", "4",
        "--valid-fraction", "0.2", "--embed-batch-size", "64", "--embedder", f"bert-mean:{bert}",
        "--no-progress",
    ]  # fmt: skip


def one_line_error(capsys, code: int) -> str:
    """The CLI's stderr, checked to be exit 2 with a single `error:` line and no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "bug in retrolm" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


class Hung(BaseException):
    """Raised by `deadline` (no OSError, which a reader may turn into a skipped input)."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise `Hung` where the block blocks (a FIFO read) longer than `seconds`."""

    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retrolm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def valid_files(db: Database) -> list[Path]:
    return [Path(d.name) for d in db.documents if d.split == "valid"]


# --------------------------------------------------------------------------- leakage


def test_retrieval_only_copies_of_documents_are_not_indexed_and_are_counted(
    setup, tmp_path, caplog, capsys
):
    root, bert, corpus, folder, config = setup
    db = Database.open(folder)
    held_out = valid_files(db)
    assert len(held_out) >= 3
    extra = tmp_path / "extra"
    extra.mkdir()
    for i, path in enumerate(held_out):  # copies of every held-out document
        shutil.copy(path, extra / f"copy{i:02d}.txt")
    train_doc = next(Path(d.name) for d in db.documents if d.split == "train")
    shutil.copy(train_doc, extra / "train-copy.txt")
    new_text = "a retrieval-only text that no corpus document has, alpha beta\n"
    (extra / "new1.txt").write_text(new_text, encoding="utf-8")
    (extra / "new2.txt").write_text(new_text, encoding="utf-8")  # a copy of another extra
    duplicates = len(held_out) + 2

    out = tmp_path / "db"
    build_database([corpus], out, config, retrieval_only=[extra], show_progress=False)
    built = Database.open(out)
    retrieval = [d for d in built.documents if d.split == "retrieval"]
    assert [Path(d.name).name for d in retrieval] == ["new1.txt"]
    assert built.manifest.counts.skipped["duplicate"] == duplicates
    assert f"{duplicates} document(s) of {extra.as_posix()} skipped" in caplog.text
    assert f"skipping {extra.as_posix()}/copy00.txt: duplicate" in caplog.text
    # no held-out chunk retrieves its own text any more
    valid = built.split_chunk_ids("valid")
    ids, tokens = stream_neighbours(built, valid, 4)
    own = built.chunk_tokens(valid)
    assert not (tokens[:, 0, :16] == own).all(axis=1).any()
    assert cli_main(["db", "info", str(out)]) == 0
    assert f"{duplicates} duplicate" in capsys.readouterr().out
    # the rerun of the finished build changes nothing
    before = arrays(out)
    build_database([corpus], out, config, retrieval_only=[extra], show_progress=False)
    assert arrays(out) == before


def test_a_source_of_many_inputs_is_named_in_one_short_log_line():
    """A retrieval-only source given as hundreds of files (as the quickstart gives them) is
    named by its first inputs and a count, not by every path."""
    inputs = [f"/corpus/folder/file-{i:04d}.txt" for i in range(500)]
    line = name_inputs(inputs)
    assert line == (
        "/corpus/folder/file-0000.txt /corpus/folder/file-0001.txt /corpus/folder/file-0002.txt "
        "and 497 more inputs"
    )
    assert name_inputs(inputs[:2]) == "/corpus/folder/file-0000.txt /corpus/folder/file-0001.txt"


def test_a_database_that_indexed_copies_before_still_opens_and_resumes(setup, tmp_path):
    """A database whose retrieval-only copies were indexed (built without the duplicate rule)
    still opens, and rerunning its build command leaves it as it is."""
    root, bert, corpus, folder, config = setup
    extra = tmp_path / "extra"
    extra.mkdir()
    for i, path in enumerate(valid_files(Database.open(folder))):
        shutil.copy(path, extra / f"copy{i:02d}.txt")
    real = build_module.run_chunks

    def without_duplicate_rule(*args, **kwargs):
        return real(*args, **{**kwargs, "skip_duplicates": False})

    out = tmp_path / "old"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "run_chunks", without_duplicate_rule)
        build_database([corpus], out, config, retrieval_only=[extra], show_progress=False)
    old = Database.open(out)
    assert sum(d.split == "retrieval" for d in old.documents) == len(list(extra.iterdir()))
    before = arrays(out)
    build_database([corpus], out, config, retrieval_only=[extra], show_progress=False)
    assert arrays(out) == before
    Database.open(out)


def test_r_of_c_counts_a_near_copy_among_the_retrieval_only_chunks(setup, tmp_path):
    root, bert, corpus, folder, config = setup
    db = Database.open(folder)
    extra = tmp_path / "extra"
    extra.mkdir()
    for i, path in enumerate(valid_files(db)):  # one word changed in each (its last)
        words = path.read_text(encoding="utf-8").split(" ")
        words[-1] = "CHANGED\n"
        (extra / f"near{i:02d}.txt").write_text(" ".join(words), encoding="utf-8")
    out = build_database(
        [corpus], tmp_path / "db", config, retrieval_only=[extra], show_progress=False
    )
    built = Database.open(out)
    assert built.manifest.counts.skipped.get("duplicate", 0) == 0  # not exact copies
    valid = built.split_chunk_ids("valid")
    m = built.chunk_size

    def r_of_c(database: Database) -> tuple[np.ndarray, np.ndarray]:
        ids, tokens = stream_neighbours(database, valid, 4)
        return leakage_ratio(database.chunk_tokens(valid), tokens, m, database.pad_id), ids

    r, ids = r_of_c(built)
    retrieval = built.split_chunk_ids("retrieval")
    assert np.median(r) == 1.0 and (r >= 0.5).mean() > 0.9  # the near-copies leak
    assert np.isin(ids[:, 0], retrieval).mean() > 0.9  # found among the retrieval-only chunks
    r_without, _ = r_of_c(db)  # the same held-out chunks without the near-copies
    assert r.mean() > r_without.mean() + 0.3


def test_a_build_killed_in_the_retrieval_only_chunks_resumes_to_the_same_database(
    setup, tmp_path, monkeypatch
):
    """The duplicate rule gives the same database after a kill: the documents written before it
    are read back as known texts."""
    from retrolm.database.chunks import _BlockWriter

    root, bert, corpus, folder, config = setup
    extra = make_corpus(tmp_path / "extra", 12, seed=7, prefix="new")
    shutil.copy(extra / "new001.txt", extra / "new010-copy.txt")  # a copy of an earlier one
    for i, path in enumerate(valid_files(Database.open(folder))):
        shutil.copy(path, extra / f"new{i:03d}-valid-copy.txt")
    straight = build_database(
        [corpus], tmp_path / "straight", config, retrieval_only=[extra], show_progress=False
    )
    real, flushed = _BlockWriter.flush, []

    def flush(self):
        if self.group == 1 and self.count:
            flushed.append(self.group)
            if len(flushed) == 3:
                raise KeyboardInterrupt  # as if killed before the third retrieval-only block
        real(self)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(_BlockWriter, "flush", flush)
        with pytest.raises(KeyboardInterrupt):
            build_database([corpus], resumed, config, retrieval_only=[extra], show_progress=False)
    build_database([corpus], resumed, config, retrieval_only=[extra], show_progress=False)
    assert arrays(resumed) == arrays(straight)
    counts = Database.open(resumed).manifest.counts
    assert counts == Database.open(straight).manifest.counts
    assert counts.skipped["duplicate"] == 1 + len(valid_files(Database.open(folder)))


@pytest.mark.slow
def test_two_ranks_skip_the_same_retrieval_only_copies(setup, tmp_path):
    root, bert, corpus, folder, config = setup
    extra = tmp_path / "extra"
    extra.mkdir()
    held_out = valid_files(Database.open(folder))
    for i, path in enumerate(held_out):
        shutil.copy(path, extra / f"copy{i:02d}.txt")
    (extra / "new.txt").write_text("something else entirely, gamma delta\n", encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    for out, workers in ((one, "1"), (two, "2")):
        done = run_cli(
            "-q", "db", "build", str(corpus), "--out", str(out), *flags(bert),
            "--retrieval-only", str(extra), "--workers", workers, "--index", "Flat",
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    a, b = Database.open(one), Database.open(two)
    assert a.manifest.counts.skipped["duplicate"] == len(held_out)
    assert a.manifest.counts == b.manifest.counts
    assert (one / "documents.jsonl").read_bytes() == (two / "documents.jsonl").read_bytes()


# --------------------------------------------------------------------------- db add


def test_rerunning_a_finished_add_says_so_and_exits_0(setup, tmp_path, capsys):
    root, bert, corpus, folder, config = setup
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        (more / f"n{i}.txt").write_text(f"zeta eta theta new document {i} alpha\n", "utf-8")
    assert cli_main(["db", "add", str(copy), str(more), "--no-progress"]) == 0
    before = arrays(copy)
    capsys.readouterr()
    assert cli_main(["db", "add", str(copy), str(more), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "already in the database" in err and "nothing to add" in err
    assert arrays(copy) == before
    code = cli_main(["db", "add", str(copy), "--retrieval-only", str(more), "--no-progress"])
    assert "as train/valid documents" in one_line_error(capsys, code)
    # another path to documents of the same text: refused as before, naming the duplicates
    other = tmp_path / "other"
    shutil.copytree(more, other)
    code = cli_main(["db", "add", str(copy), str(other), "--no-progress"])
    assert "3 duplicate" in one_line_error(capsys, code)
    # a document of the added folder that changed since cannot replace the stored one
    (more / "n1.txt").write_text("a different text now\n", encoding="utf-8")
    code = cli_main(["db", "add", str(copy), str(more), "--no-progress"])
    assert "changed or new since" in one_line_error(capsys, code)
    assert arrays(copy) == before


def test_an_add_killed_after_chunking_resumes_without_its_inputs(setup, tmp_path, monkeypatch):
    root, bert, corpus, folder, config = setup
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    more = make_corpus(tmp_path / "more", 4, seed=9, prefix="more")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "_run_index", killed)
        with pytest.raises(KeyboardInterrupt):
            add_documents(copy, [more], show_progress=False)
    shutil.rmtree(more)  # the documents are in the chunk blocks already
    add_documents(copy, [more], show_progress=False)
    assert len(Database.open(copy).documents) == 34


def test_a_strict_add_stopped_by_a_bad_file_leaves_the_database_finished(setup, tmp_path, capsys):
    root, bert, corpus, folder, config = setup
    clean = tmp_path / "corpus"
    shutil.copytree(corpus, clean, ignore=shutil.ignore_patterns("zz*"))
    out = tmp_path / "db"
    build_database([clean], out, dataclasses.replace(config, strict=True), show_progress=False)
    more = tmp_path / "more"
    more.mkdir()
    (more / "a.txt").write_text("a good new document, alpha beta\n", encoding="utf-8")
    (more / "b.bin").write_bytes(b"\x00\x01")
    code = cli_main(["db", "add", str(out), str(more), "--no-progress"])
    assert "b.bin: binary" in one_line_error(capsys, code)
    assert len(Database.open(out).documents) == 30  # finished, as before
    (more / "b.bin").unlink()
    assert cli_main(["-q", "db", "add", str(out), str(more), "--no-progress"]) == 0
    assert len(Database.open(out).documents) == 31


# --------------------------------------------------------------------------- corpus files


def test_a_file_name_that_is_not_utf8_is_read_under_an_escaped_name(setup, tmp_path, capsys):
    root, bert, corpus, folder, config = setup
    source = tmp_path / "corpus"
    shutil.copytree(corpus, source)
    raw = os.fsencode(source) + b"/caf\xe9-\xff.txt"
    with open(raw, "wb") as f:
        f.write(b"latin-1 named file, alpha beta gamma delta\n")
    out = tmp_path / "db"
    assert cli_main(["-q", "db", "build", str(source), "--out", str(out), *flags(bert)]) == 0
    db = Database.open(out)
    (doc,) = [d for d in db.documents if "caf" in d.name]
    assert doc.name == f"{source.as_posix()}/caf\\xe9-\\xff.txt"
    ids = np.arange(doc.first_chunk, doc.first_chunk + doc.num_chunks)
    assert "latin-1 named file" in db.tokenizer.decode(db.chunk_tokens(ids).reshape(-1))
    json.loads((out / "documents.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    # named directly on the command line, too
    single = tmp_path / "single"
    assert (
        cli_main(
            [
                "-q",
                "db",
                "chunk",
                os.fsdecode(raw),
                "--out",
                str(single),
                *flags(bert),
                "--valid-fraction",
                "0",
            ]
        )
        == 0
    )


def test_fifos_devices_and_broken_links(tmp_path, caplog, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta\n", encoding="utf-8")
    os.mkfifo(folder / "pipe.txt")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (folder / "zero").symlink_to("/dev/zero")
    with deadline(20):
        events = list(iter_corpus([folder]))
    assert [item.name for _, item in events] == [f"{folder.as_posix()}/a.txt"]
    for name in ("pipe.txt", "loop", "dangling.txt", "zero"):
        assert caplog.text.count(f"skipping {folder.as_posix()}/{name}:") == 1, name
    assert "FIFO" in caplog.text and "character device" in caplog.text
    # a path named directly: refused, nothing created
    for path in (folder / "pipe.txt", Path("/dev/zero")):
        with pytest.raises(InputError, match="not a regular file"):
            list_inputs([path])
        out = tmp_path / f"db-{path.name}"
        with deadline(20):
            code = cli_main(["db", "build", str(path), "--out", str(out), "--no-progress"])
        assert "not a regular file" in one_line_error(capsys, code)
        assert not out.exists()
    # a file replaced by a FIFO after the listing: read without blocking, and skipped
    from retrolm.corpus import _text_file

    with deadline(20):
        item = _text_file("late", folder / "pipe.txt")
    assert isinstance(item, Skipped) and item.reason == "unreadable"


def test_a_fifo_given_to_add_is_refused_and_the_database_stays_finished(setup, tmp_path, capsys):
    root, bert, corpus, folder, config = setup
    copy = tmp_path / "db"
    shutil.copytree(folder, copy)
    os.mkfifo(tmp_path / "pipe")
    with deadline(20):
        code = cli_main(["db", "add", str(copy), str(tmp_path / "pipe"), "--no-progress"])
    assert "FIFO" in one_line_error(capsys, code)
    Database.open(copy)  # still finished


def test_hidden_folders_are_not_read(tmp_path):
    folder = tmp_path / "corpus"
    (folder / ".git" / "refs").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    (folder / ".git" / "refs" / "x").write_text("abc\n", encoding="utf-8")
    (folder / "a.txt").write_text("alpha\n", encoding="utf-8")
    names = [item.name for _, item in iter_corpus([folder])]
    assert names == [f"{folder.as_posix()}/a.txt"]


def test_crlf_nul_and_long_words_keep_their_exact_text(setup, tmp_path):
    root, bert, corpus, folder, config = setup
    source = tmp_path / "corpus"
    shutil.copytree(corpus, source)
    texts = {
        "crlf.txt": "first line\r\nsecond line\r\n\r\nend alpha\r\n",
        "late-nul.txt": "alpha beta " * 7000 + "\x00 after a NUL\n",  # past the binary probe
        "long-word.txt": "start " + "ab" * 150_000 + " end\n",
    }
    for name, text in texts.items():
        with open(source / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    start = time.perf_counter()
    out = build_database([source], tmp_path / "db", config, show_progress=False)
    assert time.perf_counter() - start < 60
    db = Database.open(out)
    for name, text in texts.items():
        (doc,) = [d for d in db.documents if d.name.endswith("/" + name)]
        ids = np.arange(doc.first_chunk, doc.first_chunk + doc.num_chunks)
        assert db.tokenizer.decode(db.chunk_tokens(ids).reshape(-1)) == text, name


# --------------------------------------------------------------------------- flags and paths


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be at least 1, got -1"),
        (["--chunk-size", "0"], "chunk_size must be a positive number"),
        (["--chunk-size", "1000000000"], "--chunk-size must be at most 4096"),
        (["--neighbours", "0"], "neighbours must be a positive number"),
        (["--neighbours", "-1"], "neighbours must be a positive number"),
        (["--neighbours", "1000000000"], "--neighbours must be at most 1024"),
        (["--vocab-size", "1000000000"], "--vocab-size must be at most 1048576"),
        (["--glob", "/abs/*.txt"], "--glob '/abs/*.txt' cannot be used"),
        (["--glob", ""], "--glob '' cannot be used"),
        (["--retrieval-only", "/nonexistent/extra"], "/nonexistent/extra: no such file"),
    ],
)
def test_bad_build_flags_are_one_line_errors(setup, tmp_path, capsys, extra, message):
    root, bert, corpus, folder, config = setup
    out = tmp_path / "db"
    code = cli_main(["db", "build", str(corpus), "--out", str(out), *flags(bert), *extra])
    assert message in one_line_error(capsys, code)
    assert not out.exists() or not any(out.iterdir())


def test_bad_corpus_and_out_paths_are_one_line_errors(setup, tmp_path, capsys):
    root, bert, corpus, folder, config = setup
    code = cli_main(["db", "build", "", "--out", str(tmp_path / "db"), *flags(bert)])
    assert "a corpus path is empty" in one_line_error(capsys, code)
    code = cli_main(["db", "build", str(corpus), "--out", os.fsdecode(b"db-\xff"), *flags(bert)])
    assert "not valid UTF-8" in one_line_error(capsys, code)
    source = tmp_path / "corpus"
    shutil.copytree(corpus, source)
    inside = source / "db"
    code = cli_main(["db", "build", str(source), "--out", str(inside), *flags(bert)])
    assert "lies inside the corpus folder" in one_line_error(capsys, code)
    assert not inside.exists()
    hidden = source / ".db"  # a hidden folder is not read: allowed
    assert cli_main(["-q", "db", "build", str(source), "--out", str(hidden), *flags(bert)]) == 0
    assert len(Database.open(hidden).documents) == 30
    capsys.readouterr()
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "a.txt").write_text("alpha beta gamma\n", encoding="utf-8")
    shutil.copytree(folder, parent / "db")  # a database inside the folder it would read
    code = cli_main(["db", "add", str(parent / "db"), str(parent), "--no-progress"])
    assert "lies inside the corpus folder" in one_line_error(capsys, code)


def test_search_with_a_huge_k_or_undecodable_text(setup, capsys):
    root, bert, corpus, folder, config = setup
    db = Database.open(folder)
    assert (
        cli_main(["db", "search", str(folder), "alpha beta", "-k", "1000000000000", "--json"]) == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == db.manifest.index.ntotal
    code = cli_main(["db", "search", str(folder), os.fsdecode(b"alpha \xff beta")])
    assert "not valid UTF-8" in one_line_error(capsys, code)


def test_a_bm25_search_without_a_match_says_so(setup, tmp_path, capsys):
    root, bert, corpus, folder, config = setup
    out = build_database(
        [corpus],
        tmp_path / "db",
        dataclasses.replace(config, retriever="bm25"),
        show_progress=False,
    )
    assert cli_main(["db", "search", str(out), "!!! ??? ..."]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no chunk matches" in captured.err


def test_no_progress_hides_the_model_loading_bars(setup, tmp_path):
    root, bert, corpus, folder, config = setup
    done = run_cli("db", "build", str(corpus), "--out", str(tmp_path / "db"), *flags(bert))
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "%|" not in done.stderr


# --------------------------------------------------------------------------- tokenizer


def _long_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(words))


def test_training_in_pieces_gives_the_tokenizer_of_the_whole_text(monkeypatch):
    import retrolm.tokenizer as tokenizer_module
    from retrolm.database.chunks import encode_documents

    text = _long_text(40_000) + "\n\n  two spaces, a tab\there " + _long_text(20_000, seed=1)
    monkeypatch.setattr(tokenizer_module, "TRAIN_PIECE_CHARS", len(text) + 1)
    whole = tokenizer_module.train_tokenizer([text], 600)
    monkeypatch.setattr(tokenizer_module, "TRAIN_PIECE_CHARS", 4096)
    assert len(list(tokenizer_module.training_pieces(text))) > 50  # really in pieces
    pieces = tokenizer_module.train_tokenizer([text], 600)
    assert pieces.hf.to_str() == whole.hf.to_str()
    (ids,) = encode_documents(pieces, [text], 4096)  # encoded in pieces too
    assert ids.tolist() == pieces.encode(text)


def test_a_very_long_word_trains_quickly():
    from retrolm.tokenizer import train_tokenizer

    rng = random.Random(0)
    word = "".join(rng.choice("ab") for _ in range(400_000))
    start = time.perf_counter()
    tok = train_tokenizer([word + "\n", "alpha beta gamma " * 100], 400)
    assert time.perf_counter() - start < 15  # quadratic in the word: minutes without the cap
    assert tok.decode(tok.encode(word)) == word


def test_training_on_one_long_line_keeps_memory_bounded(tmp_path):
    """A 12 MB text without a newline trains in bounded pieces: training adds a fraction of the
    memory one 12 MB sequence takes (about 900 MB more)."""
    script = (
        "import random, resource\n"
        "from retrolm.tokenizer import train_tokenizer\n"
        "rng = random.Random(0)\n"
        "words = [''.join(rng.choice('abcdefghijklmnop') for _ in range(rng.randint(2, 9)))"
        " for _ in range(20000)]\n"
        "parts = [' '.join(rng.choices(words, k=10000)) for _ in range(200)]\n"
        "text = ' '.join(parts)[:12_000_000]\n"
        "del parts\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "train_tokenizer([text], 1000)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 450, done.stdout  # MB added by training


def test_search_scores_are_named_with_their_direction(setup, tmp_path, capsys):
    """BM25 and inner-product scores are similarities (higher is nearer), l2 a distance: the
    hits come nearest first under each, and the text output says which way is nearer."""
    from retrolm.database.db import nearer

    root, bert, corpus, folder, config = setup
    bm25 = build_database(
        [corpus],
        tmp_path / "db",
        dataclasses.replace(config, retriever="bm25"),
        show_progress=False,
    )
    assert nearer("bm25") == "higher" and nearer("ip") == "higher" and nearer("l2") == "lower"
    for path in (folder, bm25):
        db = Database.open(path)
        scores = [h.score for h in db.search("alpha beta gamma", k=5)[0]]
        assert len(scores) == 5
        ordered = sorted(scores, reverse=nearer(db.metric) == "higher")
        assert scores == ordered and scores[0] != scores[-1], (db.metric, scores)
        assert cli_main(["db", "search", str(path), "alpha beta gamma", "-k", "2"]) == 0
        out = capsys.readouterr().out
        assert (
            f"({db.metric} scores: {nearer(db.metric)} is nearer)" in out and "distance" not in out
        )
    assert Database.open(bm25).metric == "bm25"


def test_a_build_says_what_it_loads(setup, tmp_path, caplog):
    """Loading an encoder can take minutes on a slow machine: the build says so first."""
    root, bert, corpus, folder, config = setup
    with caplog.at_level(logging.INFO, logger="retrolm"):
        build_database([corpus], tmp_path / "db", config, show_progress=False)
    messages = [r.getMessage() for r in caplog.records]
    loading = next(i for i, m in enumerate(messages) if m.startswith("loading the embedder"))
    assert str(bert) in messages[loading]
    assert any("database ready" in m for m in messages[loading:])


def test_db_add_under_torchrun_is_refused(setup, monkeypatch, capsys):
    root, bert, corpus, folder, config = setup
    before = (folder / "manifest.json").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli_main(["db", "add", str(folder), str(corpus), "--no-progress"])
    assert "db add runs as one process" in one_line_error(capsys, code)
    assert (folder / "manifest.json").read_bytes() == before
