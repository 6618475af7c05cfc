"""Where raw preference records come from: files, folders and hub datasets.

Yields ``(location, raw record, decoding error)``; ``records.py`` validates the records.
Reading errors are located: a malformed line is an error item (skippable), a file that
cannot be read at all (truncated or corrupt gzip, broken parquet, malformed JSON array)
raises at once.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from sail_lightning.common import PATH_STARTS

logger = logging.getLogger("sail_lightning.data")

_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet")
# What a folder source reads; a bare ".gz" is read only when named (its content is a guess).
DIR_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class RecordError(ValueError):
    """Bad input; the message starts with the location: 'x.jsonl:17: missing key "rejected"'.

    ``reason`` ("missing_key", "prompt_mismatch", ...) is the key the readers count it under.
    ``"unreadable_file"`` (a truncated or corrupt gzip file, a non-gzip ``.gz``, a broken
    parquet file) is raised whatever ``on_bad_record`` says: the rest of the file is lost,
    and a run on part of a file must not pass for a run on all of it.
    """

    def __init__(self, message: str, *, reason: str = "invalid", location: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.location = location


Item = tuple[str, object, RecordError | None]  # (location, raw record, error while decoding)


def fail(location: str, reason: str, detail: str) -> RecordError:
    """A :class:`RecordError` whose message starts with ``location``."""
    return RecordError(f"{location}: {detail}", reason=reason, location=location)


def _unreadable(path: str, line: int | None, detail: str) -> RecordError:
    location = f"{path}:{line}" if line else path
    return RecordError(f"{location}: {detail}", reason="unreadable_file", location=location)


def _read_error(path: str, line: int | None, exc: Exception) -> RecordError:
    """The located error for an exception raised while reading (not parsing) a file.

    ``line``: the line being read (``None``: unknown, or the first line of a whole file).
    """
    if isinstance(exc, gzip.BadGzipFile):
        detail = "not a gzip file" if line in (None, 1) else "bad gzip data"
        return _unreadable(path, None if line == 1 else line, f"{detail} ({exc})")
    if isinstance(exc, EOFError):
        # A copy or download cut short: the records after this point are lost.
        after = f" after line {line - 1}" if line and line > 1 else ""
        return _unreadable(path, line, f"truncated gzip file: the data ends{after}, the "
                           "records after it are lost")
    if isinstance(exc, zlib.error):
        return _unreadable(path, line, f"corrupt gzip data ({exc})")
    return _unreadable(path, line, f"cannot be read ({exc})")


_READ_ERRORS = (OSError, EOFError, zlib.error)  # what reading a (gzip) file raises


def _iter_parquet(path: str) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                yield f"{path}:row {number}", record, None
                number += 1
    except (pa.ArrowException, OSError) as exc:
        # pyarrow's messages ("Parquet magic bytes not found") name no file.
        where = f"at row {number}" if number else "before its first row"
        raise _unreadable(path, None, f"not a readable parquet file ({where}): {exc}") from exc


def _iter_json_lines(path: str, f: BinaryIO) -> Iterator[Item]:
    # Bytes are decoded line by line (not in text mode) so that an invalid UTF-8 line
    # becomes a located malformed_json record instead of aborting the whole file;
    # utf-8-sig on line 1 because json.loads rejects a byte-order mark.
    number = 0
    while True:
        try:
            line = f.readline()
        except _READ_ERRORS as exc:
            raise _read_error(path, number + 1, exc) from exc
        if not line:
            return
        number += 1
        location, raw, error = f"{path}:{number}", None, None
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            if not text.strip():
                continue
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            error = fail(location, "malformed_json", f"malformed JSON: {exc}")
        yield location, raw, error


def _iter_json_array(path: str, f: BinaryIO) -> Iterator[Item]:
    # One document: an error leaves nothing after it readable, so it is never skipped.
    try:
        data = f.read()
    except _READ_ERRORS as exc:
        raise _read_error(path, None, exc) from exc
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise fail(f"{path}:{line}", "malformed_json", f"malformed JSON array: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise fail(f"{path}:{exc.lineno}", "malformed_json",
                    f"malformed JSON array: {exc}") from exc
    for number, record in enumerate(rows):
        yield f"{path}:record {number}", record, None


def _starts_with_bracket(path: str, f: BinaryIO) -> bool:
    """Whether the first character after any byte-order mark and whitespace is ``[``."""
    blank = b"\xef\xbb\xbf \t\r\n"
    try:
        head = f.read(4096)
        while head and not head.lstrip(blank):
            head = f.read(4096)
        f.seek(0)
    except _READ_ERRORS as exc:
        raise _read_error(path, 1, exc) from exc
    return head.lstrip(blank)[:1] == b"["


def _iter_file(path: str) -> Iterator[Item]:
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    if not path.endswith((".jsonl", ".json", ".gz")):
        raise ValueError(f"{path}: unsupported file type, expected one of {_FILE_SUFFIXES}")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        # ".json" is either a JSON array of records (pandas' orient="records") or JSON
        # Lines (what datasets' to_json writes); the first character tells them apart.
        if path.endswith((".json", ".json.gz")) and _starts_with_bracket(path, f):
            yield from _iter_json_array(path, f)
        else:
            yield from _iter_json_lines(path, f)


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local file (missing: an error) rather than a hub dataset."""
    return source.startswith(PATH_STARTS) or source.endswith(_FILE_SUFFIXES)


def _list_folder(source: str, path: str) -> tuple[list[str], list[str]]:
    """The files of a folder source that are read, and the entries that are not."""
    read, ignored = [], []
    for name in sorted(os.listdir(path)):
        # Hidden files and "_"-prefixed markers (Spark's _SUCCESS) are skipped unlisted, as
        # pyarrow.dataset does; anything else that is not read is named in a warning.
        if name.startswith((".", "_")):
            continue
        full = os.path.join(path, name)
        if os.path.isfile(full) and name.endswith(DIR_SUFFIXES):
            read.append(full)
        else:
            ignored.append(name + "/" if os.path.isdir(full) else name)
    if not read:
        listed = f" (it holds: {', '.join(ignored)})" if ignored else ""
        raise FileNotFoundError(f"{source}: no {', '.join(DIR_SUFFIXES)} files in directory"
                                f"{listed}")
    if ignored:
        logger.warning("%s: %d file(s) not read (not one of %s): %s", source, len(ignored),
                       ", ".join(DIR_SUFFIXES), ", ".join(ignored))
    return read, ignored


def open_source(source: str, split: str) -> tuple[Iterator[Item], list[str]]:
    """The items of a source, and the folder entries it does not read."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files, ignored = _list_folder(source, path)
        return (item for file in files for item in _iter_file(file)), ignored
    if os.path.exists(path):
        return _iter_file(path), []
    if looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or directory")

    def hub() -> Iterator[Item]:
        import datasets

        for row, record in enumerate(datasets.load_dataset(source, split=split)):
            yield f"{source}[{split}]:row {row}", record, None

    return hub(), []


def iter_raw_records(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """Yield ``(location, raw record)`` from a file, a directory or a hub dataset name.

    Args:
        source: A file: ``.jsonl``, ``.jsonl.gz`` or bare ``.gz`` (JSON Lines), ``.json`` or
            ``.json.gz`` (a JSON array of records, or JSON Lines), ``.parquet``. A directory:
            its files with one of :data:`DIR_SUFFIXES`, in name order, not recursing; other
            entries are named in one logged warning (and listed in
            ``ReadStats.ignored_files`` by :func:`read_preference_records`), except hidden
            and ``_``-prefixed ones (``_SUCCESS`` markers). Anything else: a hub dataset name.
        split: The split to load; used only for hub datasets.

    Raises:
        RecordError: A JSON line is malformed (location ``path:line``), or a file cannot be
            read (``reason == "unreadable_file"``, location ``path`` or ``path:line``).
        FileNotFoundError: ``source`` looks like a path but does not exist, or is a folder
            without a readable file.
    """
    for location, raw, error in open_source(source, split)[0]:
        if error is not None:
            raise error
        yield location, raw
