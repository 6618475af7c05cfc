"""Read preference pairs: every record of a source parsed (``formats.py``), counted, kept,
skipped or dropped.

Files, folders and hub datasets are read by ``sources.py``, layouts parsed by
``formats.py``. Bad records raise a located :class:`RecordError` or are skipped and
counted; valid but unusable pairs are always dropped and counted, so nothing disappears
silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sail_lightning.data.formats import (
    COLUMN_FIELDS,
    FORMATS,
    PREFERENCES,
    PreferenceRecord,
    check_reading_options,
    parse_record,
)
from sail_lightning.data.sources import (
    DIR_SUFFIXES,
    Item,
    RecordError,
    iter_raw_records,
    looks_like_path,
    open_source,
)

# Re-exported: callers import the whole reading API from here.
__all__ = [
    "BAD_RECORD_MODES", "COLUMN_FIELDS", "DIR_SUFFIXES", "DROP_REASONS", "FORMATS", "PREFERENCES",
    "PreferenceRecord", "ReadStats", "RecordError", "check_reading_options", "iter_raw_records",
    "looks_like_path", "parse_record", "read_preference_records", "records_from_dicts",
]

logger = logging.getLogger("sail_lightning.data")

BAD_RECORD_MODES = ("error", "skip")
DROP_REASONS = {
    "identical_pair": "chosen and rejected responses are identical",
    "prompt_mismatch": "chosen and rejected answer different prompts",
    # Counted by data/tokenize.py: the DPO loss of such a pair has no gradient.
    "identical_tokens": "chosen and rejected have the same token ids after truncation",
}


@dataclass
class ReadStats:
    """Counts from one read; ``read == kept + sum(dropped) + sum(skipped)`` always holds.

    ``ignored_files`` lists the entries of a folder source that were not read (names,
    folders with a trailing ``/``); they hold no counted records.
    """

    read: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    ignored_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return one line, e.g. ``read 10, kept 9; dropped: identical_pair=1; skipped: none``
        (then ``; ignored files: a.csv, notes.txt`` when a folder held any)."""
        dropped, skipped = (
            ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"
            for c in (self.dropped, self.skipped)
        )
        line = f"read {self.read}, kept {self.kept}; dropped: {dropped}; skipped: {skipped}"
        if self.ignored_files:
            line += f"; ignored files: {', '.join(self.ignored_files)}"
        return line


def _collect(
    items: Iterable[Item],
    on_bad_record: str,
    limit: int | None = None,
    **options: Any,
) -> tuple[list[PreferenceRecord], ReadStats]:
    if on_bad_record not in BAD_RECORD_MODES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
    check_reading_options(**options)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records: list[PreferenceRecord] = []
    stats = ReadStats()
    first: dict[str, str] = {}  # reason -> first error message (skips) or location (drops)
    for location, raw, error in items if limit != 0 else ():
        stats.read += 1
        try:
            if error is not None:
                raise error
            record = parse_record(raw, location, **options)
        except RecordError as exc:
            if exc.reason in DROP_REASONS:
                stats.dropped[exc.reason] += 1
                first.setdefault(exc.reason, location)
                continue
            if on_bad_record == "error":
                raise
            stats.skipped[exc.reason] += 1
            first.setdefault(exc.reason, str(exc))
            continue
        if record.chosen == record.rejected:
            stats.dropped["identical_pair"] += 1
            first.setdefault("identical_pair", location)
            continue
        records.append(record)
        stats.kept += 1
        if limit is not None and stats.kept >= limit:
            break
    # One line per reason, not per record: a noisy file must not flood the log.
    for reason, count in sorted(stats.dropped.items()):
        why = DROP_REASONS[reason]
        logger.warning(
            "dropped %d record(s) [%s: %s], first at %s", count, reason, why, first[reason]
        )
    for reason, count in sorted(stats.skipped.items()):
        logger.warning("skipped %d bad record(s) [%s], first: %s", count, reason, first[reason])
    return records, stats


def read_preference_records(
    source: str,
    *,
    split: str = "train",
    fmt: str = "auto",
    on_bad_record: str = "error",
    limit: int | None = None,
    preference: str = "better",
    columns: dict[str, str] | None = None,
) -> tuple[list[PreferenceRecord], ReadStats]:
    """Read, validate and normalise all preference pairs of a source.

    Args:
        source: A file, a directory or a hub dataset name (see :func:`iter_raw_records`).
        split: The split to load; used only for hub datasets.
        fmt: ``"auto"``, ``"hh"``, ``"prompt"`` or ``"pku"`` (see :func:`parse_record`).
        on_bad_record: ``"error"`` raises on the first bad record; ``"skip"`` skips and
            counts bad records by reason and logs one warning per reason.
        limit: Stop once this many records are kept (``None``: read everything).
        preference: ``"better"`` or ``"safer"``: PKU-SafeRLHF's label to train on.
        columns: Field-to-column mapping for other layouts (see :func:`parse_record`).

    Returns:
        The kept records, in source order, and the read statistics.

    Raises:
        RecordError: A bad record with ``on_bad_record="error"`` (the real HH test files
            contain a few empty responses, so read HH with ``"skip"``); a file that cannot
            be read (truncated or corrupt gzip, broken parquet) in either mode.
        FileNotFoundError: ``source`` looks like a path but does not exist.
        ValueError: An invalid ``on_bad_record``, ``fmt``, ``preference`` or ``columns``, or a
            negative ``limit``.
    """
    check_reading_options(fmt, preference, columns)
    items, ignored = open_source(source, split)
    records, stats = _collect(items, on_bad_record, limit, fmt=fmt, preference=preference,
                              columns=columns)
    stats.ignored_files = ignored
    logger.info("%s: %s", source, stats.summary())
    return records, stats


def records_from_dicts(
    rows: Iterable[dict],
    name: str,
    *,
    fmt: str = "auto",
    on_bad_record: str = "error",
    preference: str = "better",
    columns: dict[str, str] | None = None,
) -> tuple[list[PreferenceRecord], ReadStats]:
    """Validate in-memory rows as :func:`read_preference_records` does.

    Args:
        rows: Raw records (dicts built in code, rows of a loaded dataset, ...).
        name: Label for locations, which are ``"name:row N"`` (0-based).
        fmt: As in :func:`read_preference_records`.
        on_bad_record: As in :func:`read_preference_records`.
        preference: As in :func:`read_preference_records`.
        columns: As in :func:`read_preference_records`.
    """
    items = ((f"{name}:row {i}", row, None) for i, row in enumerate(rows))
    return _collect(items, on_bad_record, fmt=fmt, preference=preference, columns=columns)
