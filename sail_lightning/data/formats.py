"""Preference-data layouts: one raw record in, one validated :class:`PreferenceRecord` out.

Layouts: HH-RLHF whole dialogues, prompt/chosen/rejected records (text or chat messages),
PKU-SafeRLHF's two labelled responses (``preference`` picks "better" or "safer"), and any
other through a ``columns`` mapping. Every error is a located ``RecordError``. HH responses
are kept verbatim, leading space included (``prompt + chosen`` rebuilds the raw dialogue,
and BPE tokenizers see " reply" as in pre-training); "prompt"-format responses too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sail_lightning.data.sources import fail as _fail

FORMATS = ("auto", "hh", "prompt", "pku")
# PKU-SafeRLHF labels each pair twice; the SAIL paper trains on either preference.
PREFERENCES = ("better", "safer")
# The fields a ``columns`` mapping may read from other columns.
COLUMN_FIELDS = ("prompt", "chosen", "rejected", "response_0", "response_1",
                 "better_response_id", "safer_response_id")
ROLES = ("user", "assistant", "system")
HH_ASSISTANT = "\n\nAssistant:"
# "^" too, so copies of HH whose leading "\n\n" was stripped still parse.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferenceRecord:
    """One validated preference pair.

    Attributes:
        prompt: Plain text; for HH the dialogue prefix through the last "\\n\\nAssistant:".
        messages: ``((role, content), ...)`` with roles user/assistant/system, consecutive
            turns of one role merged; always ends with a user turn.
        chosen: The chosen response text only.
        rejected: The rejected response text only.
        location: "path:line" (1-based) for JSON Lines, "path:row N" (0-based) for parquet,
            "path:record N" (0-based) for a JSON array, "name[split]:row N" for hub datasets,
            "name:row N" for records_from_dicts.
    """

    prompt: str
    messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    location: str


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _prompt_turns(raw_turns: list[tuple[str, str]], location: str) -> tuple[tuple[str, str], ...]:
    # Some HH dialogues hold two Assistant turns in a row; chat templates reject
    # non-alternating roles, so join such turns instead of losing text.
    turns: list[tuple[str, str]] = []
    for role, content in raw_turns:
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + content)
        else:
            turns.append((role, content))
    if not turns or turns[-1][0] != "user":
        last = turns[-1][0] if turns else "nothing"
        raise _fail(location, "bad_dialogue", f"prompt must end with a user turn, ends with {last}")
    if not "".join(content for _, content in turns).strip():
        raise _fail(location, "empty_field", "empty prompt")
    return tuple(turns)


def _get(raw: dict, key: str, location: str, label: str | None = None) -> object:
    # A null counts as missing: parquet and hub rows encode an absent field as None.
    if raw.get(key) is None:
        raise _fail(location, "missing_key", f'missing key "{label or key}"')
    return raw[key]


def _str(raw: dict, key: str, location: str, label: str | None = None) -> str:
    value = _get(raw, key, location, label)
    if not isinstance(value, str):
        found = _type(value)
        raise _fail(location, "bad_type", f'key "{label or key}" must be a string, found {found}')
    return value


def _split_hh(raw: dict, key: str, location: str) -> tuple[str, str]:
    text = _str(raw, key, location)
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _fail(location, "no_assistant_turn", f'"{key}" has no "\\n\\nAssistant:" turn')
    cut += len(HH_ASSISTANT)
    # Verbatim: "Assistant: reply" keeps its space, which BPE tokenizers fold into the
    # first word's token; chat-template tokenization strips it (data/tokenize.py).
    return text[:cut], text[cut:]


def _parse_hh(raw: dict, location: str) -> PreferenceRecord:
    prefix, chosen = _split_hh(raw, "chosen", location)
    rejected_prefix, rejected = _split_hh(raw, "rejected", location)
    if prefix != rejected_prefix:
        raise _fail(location, "prompt_mismatch", "chosen and rejected have different dialogues")
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise _fail(location, "empty_field", f'empty "{key}" response')
    parts = _HH_TURN.split(prefix[: -len(HH_ASSISTANT)])
    if parts[0].strip():
        raise _fail(location, "bad_dialogue", 'text before the first "Human:" turn')
    turns = [(_HH_ROLES[r], c.strip()) for r, c in zip(parts[1::2], parts[2::2], strict=True)]
    messages = _prompt_turns(turns, location)
    return PreferenceRecord(prefix, messages, chosen, rejected, location)


def _parse_messages(value: list, key: str, location: str) -> list[tuple[str, str]]:
    turns = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            found = _type(message)
            raise _fail(location, "bad_type", f'"{where}" must be an object, found {found}')
        role, content = (_str(message, k, location, f"{where}.{k}") for k in ("role", "content"))
        if role not in ROLES:
            raise _fail(location, "bad_dialogue", f'"{where}.role" is {role!r}, not one of {ROLES}')
        turns.append((role, content))
    return turns


def _response(raw: dict, key: str, location: str) -> tuple[str, list[tuple[str, str]] | None]:
    value = _get(raw, key, location)
    if isinstance(value, str):
        text, turns = value, None
    elif isinstance(value, list):
        turns = _parse_messages(value, key, location)
        if not turns or turns[-1][0] != "assistant":
            raise _fail(location, "no_assistant_turn", f'last message of "{key}" is not assistant')
        text = turns[-1][1]
    else:
        found = _type(value)
        raise _fail(location, "bad_type", f'key "{key}" must be a string or a list, found {found}')
    if not text.strip():
        raise _fail(location, "empty_field", f'empty "{key}" response')
    return text, turns


def _parse_prompt_format(raw: dict, location: str) -> PreferenceRecord:
    chosen, chosen_turns = _response(raw, "chosen", location)
    rejected, rejected_turns = _response(raw, "rejected", location)
    prompt = raw.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return PreferenceRecord(prompt, (("user", prompt),), chosen, rejected, location)
    if isinstance(prompt, list) and prompt:
        turns = _parse_messages(prompt, "prompt", location)
    elif prompt is not None and not isinstance(prompt, str | list):
        found = _type(prompt)
        raise _fail(location, "bad_type", f'key "prompt" must be a string or a list, found {found}')
    elif chosen_turns is not None:
        # H4 ultrafeedback_binarized style: the conversation so far is chosen[:-1].
        turns = chosen_turns[:-1]
        if rejected_turns is not None and rejected_turns[:-1] != turns:
            raise _fail(location, "prompt_mismatch", "chosen and rejected have different prompts")
    elif prompt is None:
        raise _fail(location, "missing_key", 'missing key "prompt"')
    else:
        raise _fail(location, "empty_field", "empty prompt")
    messages = _prompt_turns(turns, location)
    text = "\n\n".join(content for _, content in messages)
    return PreferenceRecord(text, messages, chosen, rejected, location)


def _parse_pku(raw: dict, location: str, preference: str) -> PreferenceRecord:
    prompt = _str(raw, "prompt", location)
    if not prompt.strip():
        raise _fail(location, "empty_field", "empty prompt")
    key = f"{preference}_response_id"
    choice = _get(raw, key, location)
    if isinstance(choice, float) and choice.is_integer():
        choice = int(choice)  # pandas turns an integer column with a gap into floats
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise _fail(location, "bad_type", f'key "{key}" must be 0 or 1, found {_type(choice)}')
    if choice not in (0, 1):
        raise _fail(location, "bad_value", f'key "{key}" must be 0 or 1, found {choice}')
    responses = [_str(raw, f"response_{i}", location) for i in (0, 1)]
    for i, response in enumerate(responses):
        if not response.strip():
            raise _fail(location, "empty_field", f'empty "response_{i}" response')
    chosen, rejected = responses[choice], responses[1 - choice]
    return PreferenceRecord(prompt, (("user", prompt),), chosen, rejected, location)


def check_reading_options(
    fmt: str = "auto",
    preference: str = "better",
    columns: dict[str, str] | None = None,
    *,
    prefix: str = "",
) -> None:
    """Raise a ValueError naming the option (``prefix`` + name) if one is invalid.

    Args:
        fmt: One of :data:`FORMATS`.
        preference: One of :data:`PREFERENCES`.
        columns: ``None`` or a mapping from fields of :data:`COLUMN_FIELDS` to column names.
        prefix: Put before option names in messages (``"data."`` for the DataModule).
    """
    if fmt not in FORMATS:
        raise ValueError(f"{prefix}{'format' if prefix else 'fmt'} must be one of {FORMATS}, "
                         f"got {fmt!r}")
    if preference not in PREFERENCES:
        raise ValueError(f"{prefix}preference must be one of {PREFERENCES}, got {preference!r}")
    if columns is None:
        return
    if not isinstance(columns, dict):
        raise ValueError(f"{prefix}columns must be a mapping such as {{prompt: question, "
                         f"chosen: good, rejected: bad}}, got {_type(columns)}")
    for key, column in columns.items():
        if key not in COLUMN_FIELDS:
            raise ValueError(f"{prefix}columns: unknown field {key!r}, expected some of "
                             f"{COLUMN_FIELDS}")
        if not isinstance(column, str) or not column:
            raise ValueError(f"{prefix}columns.{key} must be a column name, got {column!r}")


def _rename(raw: dict, columns: dict[str, str], location: str) -> dict:
    renamed = dict(raw)
    for key, column in columns.items():
        if raw.get(column) is None:
            raise _fail(location, "missing_key", f'missing key "{column}" (columns.{key})')
        renamed[key] = raw[column]
    return renamed


def parse_record(
    raw: object,
    location: str,
    fmt: str = "auto",
    *,
    preference: str = "better",
    columns: dict[str, str] | None = None,
) -> PreferenceRecord:
    """Validate one raw record and normalise it.

    Args:
        raw: A decoded record (normally a dict).
        location: Where it came from; every error message starts with it.
        fmt: ``"hh"`` (whole-dialogue ``chosen``/``rejected``), ``"prompt"`` (``prompt``,
            ``chosen``, ``rejected`` as text or chat-message lists), ``"pku"``
            (PKU-SafeRLHF: ``prompt``, ``response_0``, ``response_1`` and the 0/1 ids
            ``better_response_id``, ``safer_response_id``) or ``"auto"``: ``pku`` if the
            record has ``response_0`` and ``response_1``, else ``prompt`` if it has a
            ``prompt`` key or message-list responses, else ``hh``.
        preference: For ``pku``: ``"better"`` (helpfulness) or ``"safer"`` (harmlessness)
            chooses which label makes the chosen response.
        columns: Read each field from another column, e.g. ``{"prompt": "question",
            "chosen": "good", "rejected": "bad"}``; fields are those of :data:`COLUMN_FIELDS`,
            the others keep their own names. Applied before the format is detected.

    Returns:
        The record. A pair with ``chosen == rejected`` is returned as is; the readers drop it.

    Raises:
        RecordError: The record is bad, or (``reason == "prompt_mismatch"``) valid but its
            two responses answer different prompts.
        ValueError: An invalid option (see :func:`check_reading_options`).
    """
    check_reading_options(fmt, preference, columns)
    if not isinstance(raw, dict):
        raise _fail(location, "not_an_object", f"expected a JSON object, found {_type(raw)}")
    if columns:
        raw = _rename(raw, columns, location)
    if fmt == "auto":
        is_chat = isinstance(raw.get("chosen"), list) or isinstance(raw.get("rejected"), list)
        if "response_0" in raw and "response_1" in raw:
            fmt = "pku"
        else:
            fmt = "prompt" if "prompt" in raw or is_chat else "hh"
    if fmt == "pku":
        return _parse_pku(raw, location, preference)
    return _parse_hh(raw, location) if fmt == "hh" else _parse_prompt_format(raw, location)
