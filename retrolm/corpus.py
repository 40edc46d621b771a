"""Read documents from folders, single files, JSONL and Parquet, in a stable order.

A corpus is a list of input paths. Reading it yields a stream of *events*, numbered from 0:
each event is either a `Document` or a `Skipped` input (undecodable, binary, empty, unreadable).
The numbering depends only on the inputs, so a resumed job can start at any event number and
see exactly the stream it would have seen (`iter_corpus(..., start_event=n)`).

Document names are the input path as given, joined with the file's path inside a folder
(`corpus/a/b.txt`), or `FILE:LINE` / `FILE:ROW` for JSONL and Parquet records; bytes of a file
name that are not UTF-8 are written `\\xNN` (the file is read all the same). A document's id is a
hash of its name, and so is its train/valid split.

Only regular files are read: inside a folder a FIFO, device, socket or broken symbolic link is
left out with a warning, and hidden files and folders (a name starting with ".") are left out;
a FIFO, device or socket named as a corpus path is refused (`InputError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from retrolm.errors import InputError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SPLITS = ("train", "valid", "retrieval")  # retrieval: indexed only (never trained or scored)


@dataclass(frozen=True)
class Document:
    """One document: its source name and its full text."""

    name: str
    text: str

    @property
    def id(self) -> str:
        return document_id(self.name)

    @property
    def byte_length(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class Skipped:
    """An input that gave no document, and why (`reason` is one of `SKIP_REASONS`)."""

    name: str
    reason: str
    detail: str


SKIP_REASONS = ("unreadable", "binary", "undecodable", "empty", "bad_record")


def document_id(name: str) -> str:
    """A stable id for a document: the first 16 hex digits of sha256(name)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def assign_split(
    name: str, valid_fraction: float, valid_names: frozenset[str] | None = None
) -> str:
    """`train` or `valid` for a document name.

    With `valid_names`, exactly those names are `valid`. Otherwise a document is `valid` when a
    hash of its name, read as a number in [0, 1), is below `valid_fraction`; the split of a
    document never depends on the other documents, so adding documents keeps old splits.
    """
    if valid_names is not None:
        return "valid" if name in valid_names else "train"
    digest = hashlib.sha256(b"split:" + name.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "valid" if position < valid_fraction else "train"


def read_split_list(path: str | os.PathLike[str]) -> frozenset[str]:
    """Read a list of document names (one per line, `#` comments allowed) that form `valid`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read the split list {path}: {e.strerror or e}") from e
    names = frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    if not names:
        raise InputError(f"the split list {path} names no documents; put one name per line")
    return names


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """Decode file bytes as UTF-8 text. Returns (text, None) or (None, skip reason)."""
    if b"\x00" in data[:65536]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text = text[1:]
    if not text.strip():
        return None, "empty"
    return text, None


def display_name(path: str) -> str:
    """`path` as a valid UTF-8 string: a file name that is not UTF-8 (its undecodable bytes held
    as surrogates by the operating system's decoding) gets those bytes written as `\\xNN`."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def _special(mode: int) -> str | None:
    """Why a file of this `st_mode` cannot be read (a FIFO, device or socket), or None for a
    regular file or a folder."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((text for test, text in kinds if test(mode)), "a special file")
    return f"{kind}, not a regular file"


def _stat(path: str | os.PathLike[str]) -> tuple[int | None, str | None]:
    """(`st_mode` after following symbolic links, or None; why it cannot be read, or None)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return None, e.strerror or str(e)
    return mode, _special(mode)


def special_kind(path: str | os.PathLike[str]) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder (after
    following symbolic links): a FIFO, a device or a socket, whose reading would block or never
    end; None otherwise."""
    mode, problem = _stat(path)
    return None if mode is None else problem


def file_kind_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as a corpus file or folder, or None for a regular file or a
    folder: a special file (`special_kind`), or a dangling or looping symbolic link."""
    return _stat(path)[1]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def list_inputs(
    paths: Iterable[str | os.PathLike[str]], glob: str = "**/*", *, warn: bool = True
) -> list[tuple[str, Path]]:
    """Expand corpus paths into (name, file path) pairs, in a stable order.

    A folder contributes its regular files matching `glob` (sorted by relative path), except
    hidden ones (a name starting with "." anywhere below the folder); a file contributes itself;
    a path that does not exist is kept so that reading it reports it as unreadable. The same
    file given twice is listed once. Names are valid UTF-8 (`display_name`).

    Inside a folder, an entry that is not a regular file or folder (a FIFO, a device, a socket,
    a dangling or looping symbolic link) is left out, with a warning when `warn`.

    Raises:
        InputError: a path given that is a FIFO, device or socket (reading it would block or
            never end); a `glob` pattern that cannot be used.
    """
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            entries = []
            for p in _glob(path, glob):
                relative = p.relative_to(path)
                if _hidden(relative):
                    continue
                mode, problem = _stat(p)  # one stat per entry
                if problem is None and mode is not None and stat.S_ISDIR(mode):
                    continue
                if problem is not None:
                    if warn:
                        log.warning("skipping %s: %s", display_name(p.as_posix()), problem)
                    continue
                entries.append((relative.as_posix(), p))
            entries.sort(key=lambda e: e[0])
            entries = [(display_name(p.as_posix()), p) for _, p in entries]
        else:
            if (problem := special_kind(path)) is not None:
                raise InputError(
                    f"the corpus path {display_name(path.as_posix())} is {problem}; give "
                    "folders or regular files"
                )
            entries = [(display_name(path.as_posix()), path)]
        for name, p in entries:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                out.append((name, p))
    return out


def _glob(folder: Path, pattern: str) -> list[Path]:
    try:
        return list(folder.glob(pattern))
    except (ValueError, NotImplementedError) as e:
        raise InputError(
            f"--glob {pattern!r} cannot be used ({e}); give a pattern relative to the corpus "
            "folder, e.g. '**/*.txt'"
        ) from None


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _open_regular(path: Path):  # noqa: ANN202
    """`path` opened for binary reading, refused unless it is a regular file (checked on the
    opened file, and opened without blocking, so that a FIFO put in its place never hangs)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise OSError(f"{file_kind_problem(path) or 'not a regular file'}")
    return f


def _text_file(name: str, path: Path) -> Document | Skipped:
    try:
        with _open_regular(path) as f:
            data = f.read()
    except OSError as e:
        return Skipped(name, "unreadable", e.strerror or str(e))
    text, reason = decode_text(data)
    if text is None:
        return Skipped(name, reason or "undecodable", f"{len(data)} bytes")
    return Document(name, text)


def _record_text(name: str, record: object, text_field: str) -> Document | Skipped:
    if not isinstance(record, dict):
        return Skipped(name, "bad_record", "the line is not a JSON object")
    value = record.get(text_field)
    if not isinstance(value, str):
        return Skipped(name, "bad_record", f"no string field {text_field!r} (use --text-field)")
    if not value.strip():
        return Skipped(name, "empty", "empty text")
    return Document(name, value)


def _jsonl_file(name: str, path: Path, text_field: str) -> Iterator[Document | Skipped]:
    try:
        f = _open_regular(path)
    except OSError as e:
        yield Skipped(name, "unreadable", e.strerror or str(e))
        return
    with f:
        for number, line in enumerate(f, start=1):
            record_name = f"{name}:{number}"
            if not line.strip():
                continue  # blank lines are not records
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield Skipped(record_name, "undecodable", "the line is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield Skipped(record_name, "bad_record", f"not JSON: {e.msg}")
                continue
            yield _record_text(record_name, record, text_field)


def _parquet_file(name: str, path: Path, text_field: str) -> Iterator[Document | Skipped]:
    import pyarrow.parquet as pq

    problem = file_kind_problem(path)
    if problem is not None:
        yield Skipped(name, "unreadable", problem)
        return
    try:
        pfile = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on non-Parquet
        yield Skipped(name, "unreadable", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    if text_field not in pfile.schema_arrow.names:
        columns = ", ".join(pfile.schema_arrow.names)
        yield Skipped(
            name, "bad_record", f"no column {text_field!r} (columns: {columns}); use --text-field"
        )
        return
    row = 0
    for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            record_name = f"{name}:{row}"
            if not isinstance(value, str):
                yield Skipped(record_name, "bad_record", f"column {text_field!r} is not a string")
            elif not value.strip():
                yield Skipped(record_name, "empty", "empty text")
            else:
                yield Document(record_name, value)


def iter_corpus(
    paths: Iterable[str | os.PathLike[str]],
    *,
    glob: str = "**/*",
    text_field: str = "text",
    strict: bool = False,
    start_event: int = 0,
    warn: bool = True,
) -> Iterator[tuple[int, Document | Skipped]]:
    """Yield (event number, Document or Skipped) for every input, in a stable order.

    Args:
        paths: folders, text files, `.jsonl` / `.parquet` files.
        glob: which files of a folder to read (default: all; binary files are skipped).
        text_field: the JSONL field / Parquet column holding the text.
        strict: raise `InputError` on the first bad input instead of skipping it.
        start_event: skip events before this number (plain text files are not even read).
        warn: log a warning for each skipped input.

    Raises:
        InputError: with `strict`, for the first input that would be skipped.
    """
    event = 0
    for name, path in list_inputs(paths, glob, warn=warn):
        kind = _file_kind(path)
        if kind == "text":
            if event >= start_event:
                yield event, _check(_text_file(name, path), strict, warn)
            event += 1
            continue
        records = (
            _jsonl_file(name, path, text_field)
            if kind == "jsonl"
            else _parquet_file(name, path, text_field)
        )
        for item in records:
            if event >= start_event:
                yield event, _check(item, strict, warn)
            event += 1


def _check(item: Document | Skipped, strict: bool, warn: bool = True) -> Document | Skipped:
    if isinstance(item, Skipped):
        if strict:
            raise InputError(
                f"{item.name}: {item.reason} input ({item.detail}); remove it, or drop --strict "
                "to skip bad inputs with a warning"
            )
        if warn:
            log.warning("skipping %s: %s (%s)", item.name, item.reason, item.detail)
    return item


def iter_documents(paths: Iterable[str | os.PathLike[str]], **kwargs: object) -> Iterator[Document]:
    """Only the documents of `iter_corpus` (skipped inputs are logged)."""
    for _, item in iter_corpus(paths, **kwargs):  # type: ignore[arg-type]
        if isinstance(item, Document):
            yield item
