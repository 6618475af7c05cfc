"""Tests for sail_lightning.data.records: real shared data plus small synthetic files."""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import types
from pathlib import Path

import pytest

from sail_lightning.data.records import (
    PreferenceRecord,
    ReadStats,
    RecordError,
    iter_raw_records,
    parse_record,
    read_preference_records,
    records_from_dicts,
)

SHARED = Path(
    os.environ.get("SAIL_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)
HH_BASE = SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
UF_TRAIN = SHARED / "ultrafeedback-binarized" / "train.jsonl.gz"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data at {SHARED}")
MARK = "\n\nAssistant:"


def hh(*turns: str, final: str) -> str:
    """Build an HH dialogue from alternating human/assistant turns and a final reply."""
    text = "".join(
        f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)
    )
    return f"{text}{MARK} {final}"


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Write objects as JSON lines; plain strings are written verbatim (for bad lines)."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def load_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_hh_counts(rows: list[dict]) -> dict[str, int]:
    """Independent re-implementation of the HH rules: split at the last marker, compare."""
    counts = {"mismatch": 0, "empty": 0, "identical": 0, "kept": 0}
    for row in rows:
        (pc, _, rc), (pr, _, rr) = (row[k].rpartition(MARK) for k in ("chosen", "rejected"))
        if pc != pr:
            counts["mismatch"] += 1
        elif not rc.strip() or not rr.strip():
            counts["empty"] += 1
        elif rc == rr:
            counts["identical"] += 1
        else:
            counts["kept"] += 1
    return counts


GOOD_HH = {"chosen": hh("Hi there", final="Hello!"), "rejected": hh("Hi there", final="Go away.")}
GOOD_UF = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


# --- real data ---------------------------------------------------------------------------


def test_shared_data_location_is_next_to_repo_root():
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "pyproject.toml").is_file()
    assert (
        Path(__file__).resolve().parents[3] / "shared" / "data" == repo.parent / "shared" / "data"
    )


@needs_shared
def test_hh_helpful_base_counts_match_readme_and_reimplementation():
    rows = load_gz(HH_BASE)
    exp = expected_hh_counts(rows)
    # Numbers stated in shared/data/hh-rlhf/README.md.
    assert len(rows) == 2354
    assert len(rows) - exp["mismatch"] == 2345
    assert sum(r["chosen"] == r["rejected"] for r in rows) == 2
    assert exp["identical"] == 2  # the identical pairs all have matching prefixes

    records, stats = read_preference_records(str(HH_BASE), on_bad_record="skip")
    assert stats.read == 2354
    assert stats.dropped == {"prompt_mismatch": exp["mismatch"], "identical_pair": 2}
    assert stats.skipped == {"empty_field": exp["empty"]}
    assert stats.kept == len(records) == exp["kept"]
    assert stats.read == stats.kept + sum(stats.dropped.values()) + sum(stats.skipped.values())
    assert stats.summary() == (
        f"read 2354, kept {exp['kept']}; dropped: identical_pair=2, "
        f"prompt_mismatch={exp['mismatch']}; skipped: empty_field={exp['empty']}"
    )


@needs_shared
def test_hh_error_mode_stops_at_first_empty_response():
    rows = load_gz(HH_BASE)
    first_bad = next(
        i + 1
        for i, row in enumerate(rows)
        if expected_hh_counts([row])["empty"]  # the first prompt-matched empty response
    )
    with pytest.raises(RecordError, match=rf"test\.jsonl\.gz:{first_bad}: empty") as info:
        read_preference_records(str(HH_BASE))
    assert str(info.value).startswith(f"{HH_BASE}:{first_bad}:")
    assert info.value.reason == "empty_field"


@needs_shared
def test_hh_records_are_split_at_last_assistant_turn():
    raw = {loc: row for loc, row in iter_raw_records(str(HH_BASE))}
    records, _ = read_preference_records(str(HH_BASE), on_bad_record="skip")
    for record in records:
        row = raw[record.location]
        assert record.prompt.endswith(MARK)
        assert record.prompt + record.chosen == row["chosen"]
        assert record.prompt + record.rejected == row["rejected"]
        assert MARK not in record.chosen and MARK not in record.rejected
        roles = [role for role, _ in record.messages]
        assert roles == ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
        assert roles[-1] == "user"
        assert all(content == content.strip() for _, content in record.messages)
    first = records[0]
    chosen = raw[first.location]["chosen"]
    assert first.location == f"{HH_BASE}:1"
    assert first.messages[0] == ("user", chosen[len("\n\nHuman:") : chosen.index(MARK)].strip())


@needs_shared
@pytest.mark.parametrize(
    ("subset", "total", "matched", "identical"),
    [
        ("harmless-base", 2312, 2307, 0),
        ("helpful-base", 2354, 2345, 2),
        ("helpful-online", 1137, 1137, 2),
        ("helpful-rejection-sampled", 2749, 2746, 32),
    ],
)
def test_hh_all_subsets_match_readme(subset, total, matched, identical):
    path = SHARED / "hh-rlhf" / subset / "test.jsonl.gz"
    exp = expected_hh_counts(load_gz(path))
    _, stats = read_preference_records(str(path), fmt="hh", on_bad_record="skip")
    assert stats.read == total
    assert stats.dropped["prompt_mismatch"] == total - matched == exp["mismatch"]
    assert stats.dropped["identical_pair"] == identical == exp["identical"]
    assert stats.kept == exp["kept"]


@needs_shared
def test_ultrafeedback_train_counts():
    rows = load_gz(UF_TRAIN)
    assert len(rows) == 1000
    assert sum(r["chosen"] == r["rejected"] for r in rows) == 4
    empty = [
        i + 1
        for i, r in enumerate(rows)
        if not all(r[k].strip() for k in ("prompt", "chosen", "rejected"))
    ]
    records, stats = read_preference_records(str(UF_TRAIN), on_bad_record="skip")
    assert stats.read == 1000
    assert stats.dropped == {"identical_pair": 4}
    assert stats.skipped == {"empty_field": len(empty)}
    assert stats.kept == len(records) == 1000 - 4 - len(empty)
    first = records[0]
    assert first.prompt == rows[0]["prompt"] and first.messages == (("user", rows[0]["prompt"]),)
    assert (first.chosen, first.rejected) == (rows[0]["chosen"], rows[0]["rejected"])
    if empty:
        with pytest.raises(RecordError, match=rf"train\.jsonl\.gz:{empty[0]}: empty"):
            read_preference_records(str(UF_TRAIN))


# --- formats ----------------------------------------------------------------------------


def test_ultrafeedback_plain_and_message_list_variants(tmp_path):
    user = {"role": "user", "content": "Name a colour."}
    rows = [
        {**GOOD_UF, "source_index": 3, "metadata": {"score_chosen": 9.0}},
        {  # H4 ultrafeedback_binarized: prompt string, chosen/rejected = [user, assistant]
            "prompt": "Name a colour.",
            "chosen": [user, {"role": "assistant", "content": "Blue."}],
            "rejected": [user, {"role": "assistant", "content": "Seven."}],
            "score_chosen": 8.0,
        },
        {  # no prompt: taken from chosen[:-1]
            "chosen": [user, {"role": "assistant", "content": "Blue."}],
            "rejected": [user, {"role": "assistant", "content": "Seven."}],
        },
    ]
    records, stats = read_preference_records(str(write_jsonl(tmp_path / "uf.jsonl", rows)))
    assert stats.kept == 3
    for record in records:
        assert record.prompt == "Name a colour."
        assert record.messages == (("user", "Name a colour."),)
        assert (record.chosen, record.rejected) == ("Blue.", "Seven.")


def test_message_list_prompt_is_joined_and_merged():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Colour?"},
        {"role": "user", "content": "Any one."},
    ]
    record = parse_record({"prompt": prompt, "chosen": "Blue", "rejected": "No"}, "x:1")
    assert record.messages == (
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Colour?\n\nAny one."),
    )
    assert record.prompt == "Be brief.\n\nHi\n\nHello\n\nColour?\n\nAny one."


def test_hh_consecutive_assistant_turns_are_merged():
    text = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d" + MARK
    record = parse_record({"chosen": text + " yes", "rejected": text + " no"}, "x:1", "hh")
    assert record.messages == (("user", "a"), ("assistant", "b\n\nc"), ("user", "d"))
    assert (record.prompt, record.chosen, record.rejected) == (text, " yes", " no")


def test_hh_keeps_responses_verbatim():
    q = "\n\nHuman: q" + MARK
    record = parse_record({"chosen": q + "  two", "rejected": q + "none"}, "x:1", "hh")
    assert (record.chosen, record.rejected) == ("  two", "none")
    assert record.prompt + record.chosen == q + "  two"
    # Copies of HH without the leading blank line still parse.
    record = parse_record(
        {"chosen": "Human: q" + MARK + " a", "rejected": "Human: q" + MARK + " b"}, "x:1"
    )
    assert record.messages == (("user", "q"),)


@pytest.mark.parametrize(
    "prefix",
    ["", "\n\nHuman: a" + MARK + " b", "Preamble\n\nHuman: a"],
    ids=["none", "assistant", "text"],
)
def test_hh_prompt_must_be_a_dialogue_ending_with_user(prefix):
    with pytest.raises(RecordError, match="^x:1: ") as info:
        parse_record({"chosen": prefix + MARK + " c", "rejected": prefix + MARK + " d"}, "x:1")
    assert info.value.reason == "bad_dialogue"


def test_prompt_mismatch_is_dropped_not_skipped():
    rows = [
        GOOD_HH,
        {"chosen": hh("Hi", final="A"), "rejected": hh("Bye", final="B")},
        {
            "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "B"}],
        },
    ]
    records, stats = records_from_dicts(rows, "mem")  # error mode: drops never raise
    assert len(records) == 1
    assert stats.dropped == {"prompt_mismatch": 2} and not stats.skipped
    with pytest.raises(RecordError) as info:
        parse_record(rows[1], "mem:row 1")
    assert info.value.reason == "prompt_mismatch"


def test_auto_detection():
    assert parse_record(GOOD_HH, "a:1").prompt.endswith(MARK)
    assert parse_record(GOOD_UF, "a:1").prompt == "Name a colour."
    chat = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "B"}],
    }
    assert parse_record(chat, "a:1").messages == (("user", "q"),)
    with pytest.raises(RecordError, match='missing key "prompt"'):
        parse_record(GOOD_HH, "a:1", fmt="prompt")
    with pytest.raises(RecordError, match="no .*Assistant:. turn"):
        parse_record(GOOD_UF, "a:1", fmt="hh")
    with pytest.raises(ValueError, match="fmt"):
        parse_record(GOOD_UF, "a:1", fmt="alpaca")


# --- bad input --------------------------------------------------------------------------

BAD_LINES = [  # (line text, reason, text the message must contain)
    ('{"prompt": "p", "chosen": "c", ', "malformed_json", "malformed JSON"),
    ('["prompt", "chosen"]', "not_an_object", "found list"),
    (json.dumps({"prompt": "p", "chosen": "c"}), "missing_key", '"rejected"'),
    (json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"}), "bad_type", '"chosen"'),
    (json.dumps({"prompt": "p", "chosen": "c", "rejected": " \n"}), "empty_field", '"rejected"'),
    (json.dumps({"prompt": "  ", "chosen": "c", "rejected": "r"}), "empty_field", "prompt"),
    (
        json.dumps({"chosen": "no marker", "rejected": hh("a", final="b")}),
        "no_assistant_turn",
        '"chosen"',
    ),
    (
        json.dumps({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"}),
        "no_assistant_turn",
        '"chosen"',
    ),
    (
        json.dumps({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}),
        "missing_key",
        '"prompt[0].content"',
    ),
]


@pytest.mark.parametrize(("line", "reason", "needle"), BAD_LINES, ids=[b[1] for b in BAD_LINES])
def test_bad_record_error_mode(tmp_path, line, reason, needle):
    # Two good records and a blank line first, so the bad one is on line 4.
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_UF, "", GOOD_HH, line, GOOD_UF])
    with pytest.raises(RecordError) as info:
        read_preference_records(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert needle in message
    assert info.value.reason == reason


def test_bad_records_skip_mode_counts_by_reason(tmp_path, caplog):
    lines = [GOOD_UF, ""] + [b[0] for b in BAD_LINES] + ["", GOOD_HH, "nonsense"]
    lines += [BAD_LINES[0][0], {**GOOD_UF, "rejected": "Blue."}, {**GOOD_UF, "rejected": "Blue."}]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        records, stats = read_preference_records(str(path), on_bad_record="skip")
    assert [r.location for r in records] == [f"{path}:1", f"{path}:13"]
    assert stats.read == 2 + len(BAD_LINES) + 4  # blank lines are not counted
    assert stats.skipped == {
        "malformed_json": 3,
        "not_an_object": 1,
        "missing_key": 2,
        "bad_type": 1,
        "empty_field": 2,
        "no_assistant_turn": 2,
    }
    assert stats.dropped == {"identical_pair": 2}
    assert stats.read == stats.kept + sum(stats.dropped.values()) + sum(stats.skipped.values())
    messages = [r.getMessage() for r in caplog.records if r.name == "sail_lightning.data"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    for reason, count in {**stats.skipped, **stats.dropped}.items():
        hits = [m for m in messages if f"[{reason}" in m]
        assert len(hits) == 1, (reason, messages)
        assert f" {count} " in hits[0]
    malformed = next(m for m in messages if "[malformed_json]" in m)
    assert f"{path}:3:" in malformed  # the first location


def test_non_utf8_line_is_located(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "chosen": "c", "rejected": "r"}\n\xff\xfe\n')
    with pytest.raises(RecordError, match=r"x\.jsonl:2: malformed JSON"):
        read_preference_records(str(path))
    records, stats = read_preference_records(str(path), on_bad_record="skip")
    assert len(records) == 1 and stats.skipped == {"malformed_json": 1}


def test_iter_raw_records_raises_on_malformed_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_UF, "", "{nope"])
    it = iter_raw_records(str(path))
    assert next(it) == (f"{path}:1", GOOD_UF)
    with pytest.raises(RecordError, match=rf"^{path}:3: malformed JSON"):
        next(it)


# --- sources ----------------------------------------------------------------------------


def test_gzip_and_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD_UF, {**GOOD_UF, "prompt": "Name a fruit.", "chosen": "Apple."}]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from_gz, _ = read_preference_records(str(tmp_path / "a.jsonl.gz"))
    from_pq, stats = read_preference_records(str(tmp_path / "a.parquet"))
    assert stats.kept == 2
    assert [r.location for r in from_pq] == [f"{tmp_path / 'a.parquet'}:row {i}" for i in (0, 1)]
    strip = [(r.prompt, r.messages, r.chosen, r.rejected) for r in from_gz]
    assert [(r.prompt, r.messages, r.chosen, r.rejected) for r in from_pq] == strip


def test_parquet_null_field_is_missing_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([GOOD_UF, {**GOOD_UF, "rejected": None}]), tmp_path / "n.parquet"
    )
    with pytest.raises(RecordError, match=r'n\.parquet:row 1: missing key "rejected"'):
        read_preference_records(str(tmp_path / "n.parquet"))


def test_directory_source_reads_sorted_supported_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "b.jsonl", [GOOD_UF])
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(GOOD_HH) + "\n")
    pq.write_table(pa.Table.from_pylist([GOOD_UF]), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("not data")
    records, stats = read_preference_records(str(tmp_path))
    assert [r.location for r in records] == [
        f"{tmp_path / 'a.jsonl.gz'}:1",
        f"{tmp_path / 'b.jsonl'}:1",
        f"{tmp_path / 'c.parquet'}:row 0",
    ]
    assert stats.kept == 3 and stats.ignored_files == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(FileNotFoundError, match=r"empty: no .*\(it holds: pairs\.csv\)"):
        read_preference_records(str(empty))


def test_directory_source_reads_every_format_and_names_the_rest(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def uf(i: int) -> dict:
        return {**GOOD_UF, "prompt": f"Question {i}?"}

    def gz(name: str, text: str) -> None:
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(text)

    lines = "".join(json.dumps(uf(i)) + "\n" for i in range(3))
    write_jsonl(tmp_path / "a.jsonl", [uf(i) for i in range(3)])
    (tmp_path / "b.json").write_text(json.dumps([uf(i) for i in range(4)], indent=2))
    (tmp_path / "c.json").write_text(lines)  # JSON Lines named .json (datasets' to_json)
    gz("d.json.gz", json.dumps([uf(i) for i in range(2)]))
    gz("e.jsonl.gz", lines)
    pq.write_table(pa.Table.from_pylist([uf(i) for i in range(3)]), tmp_path / "f.parquet")
    # Not read: named in a warning and in the stats. Five records in the folder's data
    # files are in formats it does not read.
    gz("g.gz", lines)
    (tmp_path / "h.csv").write_text("prompt,chosen,rejected\nq,a,b\nr,c,d\n")
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "x.jsonl", [uf(0)])
    (tmp_path / ".hidden.jsonl").write_text("{broken")  # skipped unlisted, like _SUCCESS
    (tmp_path / "_SUCCESS").write_text("")
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        records, stats = read_preference_records(str(tmp_path))
    assert stats.read == stats.kept == len(records) == 3 + 4 + 3 + 2 + 3 + 3
    files = [r.location.rsplit(":", 1)[0] for r in records]
    assert sorted(set(files)) == [str(tmp_path / n) for n in
                                  ("a.jsonl", "b.json", "c.json", "d.json.gz", "e.jsonl.gz",
                                   "f.parquet")]
    assert records[3].location == f"{tmp_path / 'b.json'}:record 0"
    assert records[7].location == f"{tmp_path / 'c.json'}:1"
    assert stats.ignored_files == ["g.gz", "h.csv", "notes.txt", "sub/"]
    assert stats.summary().endswith("; ignored files: g.gz, h.csv, notes.txt, sub/")
    warning = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(warning) == 1 and "4 file(s)" in warning[0] and "h.csv" in warning[0]


def test_json_array_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([GOOD_UF, GOOD_HH, {"prompt": "p"}], indent=2))
    records, stats = read_preference_records(str(path), on_bad_record="skip")
    assert [r.location for r in records] == [f"{path}:record 0", f"{path}:record 1"]
    assert stats.skipped == {"missing_key": 1}
    with pytest.raises(RecordError, match=rf'^{path}:record 2: missing key "chosen"'):
        read_preference_records(str(path))
    # A syntax error leaves the rest of the array unreadable: an error in both modes.
    path.write_text(json.dumps([GOOD_UF, GOOD_UF], indent=2)[:-10] + "\n]")
    with pytest.raises(RecordError, match=rf"^{path}:\d+: malformed JSON array"):
        read_preference_records(str(path), on_bad_record="skip")


def test_records_from_dicts_locations_and_skip():
    rows = [GOOD_UF, {"prompt": "p"}, GOOD_HH, 7]
    with pytest.raises(RecordError, match=r'^mem:row 1: missing key "chosen"'):
        records_from_dicts(rows, "mem")
    records, stats = records_from_dicts(rows, "mem", on_bad_record="skip")
    assert [r.location for r in records] == ["mem:row 0", "mem:row 2"]
    assert stats.skipped == {"missing_key": 1, "not_an_object": 1}
    assert isinstance(records[0], PreferenceRecord) and isinstance(stats, ReadStats)


def test_limit_stops_after_kept_records(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_UF, {**GOOD_UF, "rejected": "Blue."}] * 3)
    records, stats = read_preference_records(str(path), limit=2)
    assert len(records) == 2 and stats.read == 3 and stats.dropped == {"identical_pair": 1}
    assert read_preference_records(str(path), limit=0)[1].read == 0


@pytest.mark.parametrize("source", ["/no/such/dir/x", "missing.jsonl", "data/x.parquet"])
def test_missing_path_raises_file_not_found(monkeypatch, tmp_path, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would fail the test
    with pytest.raises(FileNotFoundError, match=source.replace(".", r"\.")):
        read_preference_records(source)


def test_hub_name_goes_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [GOOD_UF, {"prompt": "p", "chosen": "c"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records, stats = read_preference_records("org/prefs", split="test", on_bad_record="skip")
    assert calls == [("org/prefs", "test")]
    assert [r.location for r in records] == ["org/prefs[test]:row 0"]
    assert stats.skipped == {"missing_key": 1}


def test_bad_options_raise_value_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_UF])
    with pytest.raises(ValueError, match="on_bad_record"):
        read_preference_records(str(path), on_bad_record="ignore")
    with pytest.raises(ValueError, match="on_bad_record"):
        records_from_dicts([GOOD_UF], "mem", on_bad_record="warn")
    with pytest.raises(ValueError, match="fmt"):
        read_preference_records(str(path), fmt="alpaca")


# --- unreadable files: always an error naming the file, whatever on_bad_record says --------


def gz_rows(n: int) -> bytes:
    rows = [{**GOOD_UF, "prompt": f"Q{i}?", "chosen": f"Answer {i} " * 20} for i in range(n)]
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_truncated_gzip_names_file_and_line(tmp_path, mode):
    path = tmp_path / "cut.jsonl.gz"
    data = gz_rows(300)
    path.write_bytes(data[: len(data) // 2])
    with gzip.open(tmp_path / "cut.jsonl.gz", "rb") as f:  # how many lines survive the cut
        complete = 0
        try:
            for _ in f:
                complete += 1
        except EOFError:
            pass
    assert 0 < complete < 300
    with pytest.raises(RecordError, match=rf"^{path}:{complete + 1}: truncated gzip") as info:
        read_preference_records(str(path), on_bad_record=mode)
    assert info.value.reason == "unreadable_file"
    assert f"after line {complete}" in str(info.value)


def test_corrupt_gzip_names_file(tmp_path):
    data = bytearray(gz_rows(50))
    data[40:100] = bytes(60)  # zeroed deflate data inside the first block
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(RecordError, match=rf"^{path}:\d+: corrupt gzip data"):
        read_preference_records(str(path), on_bad_record="skip")


def test_plain_text_named_gz_names_file(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl.gz", [GOOD_UF])
    with pytest.raises(RecordError, match=rf"^{path}: not a gzip file"):
        read_preference_records(str(path))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_broken_parquet_names_file(tmp_path, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD_UF] * 10), path)
    data = path.read_bytes()
    path.write_bytes(b"PAR1 not parquet" if damage == "garbage" else data[: len(data) - 20])
    with pytest.raises(RecordError, match=rf"^{path}: not a readable parquet file") as info:
        read_preference_records(str(path), on_bad_record="skip")
    assert info.value.reason == "unreadable_file"


# --- PKU-SafeRLHF and column mappings ----------------------------------------------------

PKU = {  # the PKU-SafeRLHF layout; the two labels disagree, as they often do there
    "prompt": "How do I pick a lock?",
    "response_0": "Insert a tension wrench, then rake the pins until they set.",
    "response_1": "I can't help with opening locks you do not own.",
    "better_response_id": 0,
    "safer_response_id": 1,
    "is_response_0_safe": False,
    "is_response_1_safe": True,
}


def test_pku_better_and_safer_preferences(tmp_path):
    rows = [PKU, {**PKU, "prompt": "Second?", "better_response_id": 1}]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    better, stats = read_preference_records(str(path))  # auto-detected
    safer, _ = read_preference_records(str(path), fmt="pku", preference="safer")
    assert stats.kept == 2
    assert better[0].messages == (("user", PKU["prompt"]),) and better[0].prompt == PKU["prompt"]
    assert (better[0].chosen, better[0].rejected) == (PKU["response_0"], PKU["response_1"])
    assert (better[1].chosen, better[1].rejected) == (PKU["response_1"], PKU["response_0"])
    assert [(r.chosen, r.rejected) for r in safer] == [(PKU["response_1"], PKU["response_0"])] * 2
    in_memory, _ = records_from_dicts(rows, "pku", preference="safer")
    assert [(r.chosen, r.rejected) for r in in_memory] == [(r.chosen, r.rejected) for r in safer]


PKU_BAD = [  # (record, reason, text the message must contain)
    ({**PKU, "better_response_id": 2}, "bad_value", '"better_response_id" must be 0 or 1, found 2'),
    ({**PKU, "better_response_id": "0"}, "bad_type", "found str"),
    ({**PKU, "better_response_id": True}, "bad_type", "found bool"),
    ({k: v for k, v in PKU.items() if k != "better_response_id"}, "missing_key",
     '"better_response_id"'),
    ({**PKU, "response_1": " "}, "empty_field", '"response_1"'),
    ({**PKU, "prompt": None}, "missing_key", '"prompt"'),
]


@pytest.mark.parametrize(("row", "reason", "needle"), PKU_BAD, ids=[b[1] for b in PKU_BAD])
def test_pku_bad_record_names_file_and_line(tmp_path, row, reason, needle):
    path = write_jsonl(tmp_path / "pku.jsonl", [PKU, row])
    with pytest.raises(RecordError, match=rf"^{path}:2: ") as info:
        read_preference_records(str(path), fmt="pku")
    assert needle in str(info.value) and info.value.reason == reason
    records, stats = read_preference_records(str(path), fmt="pku", on_bad_record="skip")
    assert len(records) == 1 and stats.skipped == {reason: 1}


def test_pku_identical_responses_dropped_and_float_labels_accepted():
    same = {**PKU, "response_1": PKU["response_0"]}
    records, stats = records_from_dicts([same, {**PKU, "safer_response_id": 1.0}], "m",
                                        preference="safer")
    assert stats.dropped == {"identical_pair": 1}
    assert records[0].chosen == PKU["response_1"]


def test_column_mapping_reads_any_layout(tmp_path):
    rows = [{"question": "Name a colour.", "good": "Blue.", "bad": "Seven.", "prompt": "x"}]
    path = write_jsonl(tmp_path / "other.jsonl", rows + [{"question": "q", "good": "a"}])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    records, stats = read_preference_records(str(path), columns=columns, on_bad_record="skip")
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("Name a colour.", "Blue.",
                                                                     "Seven.")]
    assert stats.skipped == {"missing_key": 1}
    with pytest.raises(RecordError, match=rf'^{path}:2: missing key "bad" \(columns\.rejected\)'):
        read_preference_records(str(path), columns=columns)
    # Only some fields mapped: the others keep their names; HH dialogues under other names.
    partial, _ = records_from_dicts([{"q": "Hi?", "chosen": "A", "rejected": "B"}], "m",
                                    columns={"prompt": "q"})
    assert partial[0].prompt == "Hi?"
    hh_rows = [{"win": GOOD_HH["chosen"], "lose": GOOD_HH["rejected"]}]
    hh_records, _ = records_from_dicts(hh_rows, "m", columns={"chosen": "win", "rejected": "lose"})
    assert hh_records[0].chosen == " Hello!"
    # PKU-style fields under other names.
    renamed = {"instruction": PKU["prompt"], "a": PKU["response_0"], "b": PKU["response_1"],
               "label": 1}
    pku, _ = records_from_dicts([renamed], "m", fmt="pku", columns={
        "prompt": "instruction", "response_0": "a", "response_1": "b",
        "better_response_id": "label"})
    assert pku[0].chosen == PKU["response_1"]


@pytest.mark.parametrize(("options", "needle"), [
    ({"preference": "helpful"}, "preference must be one of"),
    ({"columns": {"answer": "x"}}, "unknown field 'answer'"),
    ({"columns": {"prompt": ""}}, "columns.prompt must be a column name"),
    ({"columns": ["prompt"]}, "columns must be a mapping"),
    ({"fmt": "safe"}, "fmt must be one of"),
])
def test_bad_reading_options_raise_value_error(tmp_path, options, needle):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_UF])
    with pytest.raises(ValueError, match=needle):
        read_preference_records(str(path), **options)
    with pytest.raises(ValueError, match=needle):
        records_from_dicts([GOOD_UF], "m", **options)
