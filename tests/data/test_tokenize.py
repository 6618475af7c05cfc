"""Tokenization: truncation sides, eos, chat templates, batch layout."""

from sail_lightning.data.records import PreferenceRecord
from sail_lightning.data.tokenize import (
    PreferenceCollator,
    encode_prompt,
    encode_response,
    tokenize_records,
)


def record(prompt="d a c b =", chosen="a b c d", rejected="a b"):
    return PreferenceRecord(prompt=prompt, messages=(("user", prompt),), chosen=chosen,
                            rejected=rejected, location="x:1")


def test_prompt_truncated_from_left_response_from_right(synthetic_tokenizer):
    tok = synthetic_tokenizer
    full = encode_prompt(tok, record(), 100)
    assert full[0] == tok.bos_token_id and tok.convert_ids_to_tokens(full[-1]) == "="
    assert encode_prompt(tok, record(), 3) == full[-3:]
    resp = encode_response(tok, "a b c d", 100)
    assert resp[-1] == tok.eos_token_id and len(resp) == 5
    assert encode_response(tok, "a b c d", 2) == resp[:2]  # truncated: no eos


def test_chat_template_is_applied_when_the_tokenizer_has_one(synthetic_tokenizer):
    import copy

    tok = copy.deepcopy(synthetic_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    rec = PreferenceRecord(prompt="ignored", messages=(("user", "b a"), ("assistant", "a b"),
                                                       ("user", "c")),
                           chosen="c", rejected="a", location="x:1")
    ids = encode_prompt(tok, rec, 100)
    assert tok.convert_ids_to_tokens(ids) == ["b", "a", "a", "b", "c", "="]


def test_collator_layout(synthetic_tokenizer):
    pairs = tokenize_records(synthetic_tokenizer, [record(), record(prompt="b a =")], 16, 16)
    examples = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                 "rejected_ids": p.rejected_ids, "route": i} for i, p in enumerate(pairs)]
    batch = PreferenceCollator(synthetic_tokenizer.pad_token_id)(examples)
    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    assert ids.shape[0] == 4
    assert batch["route"].tolist() == [0, 1] and batch["routes_present"] == (0, 1)
    for row, (p, key) in enumerate([(p, k) for k in ("chosen_ids", "rejected_ids") for p in pairs]):
        n_p, n_r = len(p.prompt_ids), len(getattr(p, key))
        assert ids[row, : n_p + n_r].tolist() == p.prompt_ids + getattr(p, key)
        assert att[row].sum() == n_p + n_r
        assert resp[row].tolist() == [0] * n_p + [1] * n_r + [0] * (ids.shape[1] - n_p - n_r)
        assert (ids[row, n_p + n_r:] == synthetic_tokenizer.pad_token_id).all()


def test_batched_tokenization_equals_one_call_per_text(synthetic_tokenizer):
    import copy

    from sail_lightning.synthetic import SyntheticTask

    rows = SyntheticTask().make_pairs(30, seed=1)
    records = [record(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    templated = copy.deepcopy(synthetic_tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    for tok in (synthetic_tokenizer, templated):
        batched = tokenize_records(tok, records, 6, 5)
        single = [(encode_prompt(tok, r, 6), encode_response(tok, r.chosen, 5),
                   encode_response(tok, r.rejected, 5)) for r in records]
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in batched] == single


def test_pairs_identical_after_truncation_are_dropped_counted_and_logged(synthetic_tokenizer,
                                                                         caplog):
    import logging

    from sail_lightning.data.records import ReadStats
    from sail_lightning.data.tokenize import tokenize_and_filter

    records = [record(chosen="a b c d", rejected="a b d c"),  # same first 2 tokens
               record(chosen="a b", rejected="b a"),
               record(chosen="c c c", rejected="c c c d")]
    for r, loc in zip(records, ("x:1", "x:2", "x:3"), strict=True):
        object.__setattr__(r, "location", loc)
    stats = ReadStats(read=3, kept=3)
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        kept, pairs = tokenize_and_filter(synthetic_tokenizer, records, 16, 2, stats=stats)
    assert kept == [records[1]] and len(pairs) == 1
    assert pairs[0].chosen_ids != pairs[0].rejected_ids
    assert stats.kept == 1 and stats.dropped == {"identical_tokens": 2}
    assert stats.read == stats.kept + sum(stats.dropped.values())
    [message] = [r.getMessage() for r in caplog.records]
    assert "dropped 2 pair(s) [identical_tokens" in message and "first at x:1" in message
    # Long enough to tell them apart: nothing dropped, the same pairs as tokenize_records.
    kept, pairs = tokenize_and_filter(synthetic_tokenizer, records, 16, 16)
    assert kept == records and pairs == tokenize_records(synthetic_tokenizer, records, 16, 16)


def test_unk_rate_catches_a_tokenizer_that_does_not_cover_the_text(synthetic_tokenizer, caplog):
    import logging

    from sail_lightning.data.tokenize import check_unk_rate, unk_rate

    assert unk_rate(synthetic_tokenizer, ["a b c", "d a"]) == 0.0
    assert unk_rate(synthetic_tokenizer, ["a b Hello world"]) == 0.5
    assert unk_rate(synthetic_tokenizer, []) == 0.0
    english = ["How do I cook rice?", "Rinse it, then simmer with water."]
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        rate = check_unk_rate(synthetic_tokenizer, english, tokenizer_name="synthetic",
                              source="uf.jsonl")
        assert check_unk_rate(synthetic_tokenizer, ["a b"], tokenizer_name="synthetic",
                              source="ok.jsonl") == 0.0
    assert rate == 1.0
    [message] = [r.getMessage() for r in caplog.records]
    assert "'synthetic'" in message and "uf.jsonl" in message and "100.0%" in message
