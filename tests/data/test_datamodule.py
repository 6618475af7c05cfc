"""PreferenceDataModule: real files, seeded split, per-epoch routes, state, bad input."""

import gzip
import json
import logging

import pytest
import torch

from sail_lightning.common import Route
from sail_lightning.data.datamodule import PreferenceDataModule
from tests.conftest import SHARED_DATA, needs_shared

HH = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
UF = SHARED_DATA / "ultrafeedback-binarized" / "train.jsonl.gz"


def make(**kw):
    kw.setdefault("tokenizer", "synthetic")
    dm = PreferenceDataModule(**kw)
    dm.setup("fit")
    return dm


def test_synthetic_split_is_seeded_and_disjoint():
    a = make(num_synthetic_pairs=200, val_fraction=0.1, seed=3)
    b = make(num_synthetic_pairs=200, val_fraction=0.1, seed=3)
    c = make(num_synthetic_pairs=200, val_fraction=0.1, seed=4)
    assert len(a.train_pairs) == 180 and len(a.val_pairs) == 20
    assert a.train_pairs == b.train_pairs and a.val_pairs == b.val_pairs
    assert a.fingerprint != c.fingerprint
    train = {(tuple(p.prompt_ids), tuple(p.chosen_ids)) for p in a.train_pairs}
    assert not train & {(tuple(p.prompt_ids), tuple(p.chosen_ids)) for p in a.val_pairs}
    assert a.stats["data/train_pairs"] == 180 and a.stats["data/kept"] == 200


def test_train_dataloader_cheap_idempotent_and_routed():
    dm = make(num_synthetic_pairs=100, mix_dp=0.5, batch_size=10)
    first = [b["route"] for b in dm.train_dataloader()]
    second = [b["route"] for b in dm.train_dataloader()]  # Lightning calls it twice on resume
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=False))
    routes = torch.cat(first)
    counts = dm.epoch_counts()  # dpo_updates: every pair as DPO, plus as many DP passes
    assert counts.total == 2 * len(dm.train_pairs) and counts.dpo == len(dm.train_pairs)
    assert int((routes == Route.DP).sum()) == counts.dp == round(0.5 * counts.total)
    # Shuffled independently of the route draw: DP rows are spread over the batches.
    assert all(0 < int((r == Route.DP).sum()) < len(r) for r in first)
    val_routes = torch.cat([b["route"] for b in dm.val_dataloader()])
    assert (val_routes == Route.DPO).all()


@needs_shared
def test_hh_rlhf_real_file_with_a_gpt2_style_tokenizer(tmp_path):
    # The synthetic word-level tokenizer maps English to <unk>; the point here is the
    # reading, splitting and counting of real dialogues.
    dm = make(source=str(HH), on_bad_record="skip", val_fraction=0.05, max_prompt_length=32,
              max_response_length=8)
    # helpful-base test: 2354 records, prefixes differ in 9, 2 identical pairs (README).
    assert dm.stats["data/read"] == 2354
    assert dm.stats["data/kept"] + dm.stats["data/dropped"] + dm.stats["data/skipped"] == 2354
    assert dm.stats["data/kept"] == len(dm.train_pairs) + len(dm.val_pairs)
    assert dm.stats["data/dropped"] >= 9
    assert all(len(p.prompt_ids) <= 32 and len(p.chosen_ids) <= 8 for p in dm.train_pairs)


@needs_shared
def test_ultrafeedback_real_file_counts_identical_and_empty_pairs():
    with gzip.open(UF, "rt") as f:
        rows = [json.loads(line) for line in f]
    empty = sum(not r[k].strip() for r in rows for k in ("prompt", "chosen", "rejected"))
    identical = sum(r["chosen"] == r["rejected"] and r["chosen"].strip() != "" for r in rows)
    assert identical == 4 and empty >= 1  # line 479 has an empty rejected response
    with pytest.raises(ValueError, match=r"train.jsonl.gz:479: .*rejected"):
        make(source=str(UF))
    # The synthetic word-level tokenizer maps English words to <unk>: distinct responses
    # of as many words become identical token ids, and are dropped too.
    from sail_lightning.tokenizer import build_tokenizer

    vocab = build_tokenizer("synthetic").get_vocab()

    def ids(text):
        return ([w if w in vocab else "<unk>" for w in text.split()] + ["<eos>"])[:256]

    valid = [r for r in rows if all(r[k].strip() for k in ("prompt", "chosen", "rejected"))
             and r["chosen"] != r["rejected"]]
    same_ids = sum(ids(r["chosen"]) == ids(r["rejected"]) for r in valid)
    assert same_ids > 0
    dm = make(source=str(UF), val_fraction=0.1, on_bad_record="skip")
    assert dm.stats["data/dropped"] == identical + same_ids
    assert dm.stats["data/skipped"] == empty
    assert len(dm.train_pairs) + len(dm.val_pairs) == 1000 - identical - empty - same_ids
    assert dm.stats["data/unk_rate"] > 0.5


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_bad_record_names_file_and_line_or_is_skipped_and_counted(tmp_path, caplog):
    good = {"prompt": "b a =", "chosen": "a b", "rejected": "b a"}
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [good, good, "{not json", {"prompt": "a =", "chosen": "a"}, good])
    with pytest.raises(ValueError, match=rf"{path.name}:3"):
        make(source=str(path))
    with caplog.at_level(logging.WARNING, logger="sail_lightning"):
        dm = make(source=str(path), on_bad_record="skip", val_fraction=0.0)
    assert dm.stats["data/skipped"] == 2 and len(dm.train_pairs) == 3
    assert "pairs.jsonl" in caplog.text


def test_bad_options_fail_before_any_model_or_data_is_loaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source"):
        PreferenceDataModule(source=str(tmp_path / "missing.jsonl"), tokenizer="synthetic")
    with pytest.raises(ValueError, match="on_bad_record"):
        PreferenceDataModule(on_bad_record="ignore")
    with pytest.raises(ValueError, match="mix_dp"):
        PreferenceDataModule(mix_dp=1.5)


def test_state_dict_round_trip_and_mismatch_is_refused():
    dm = make(num_synthetic_pairs=100)
    state = dm.state_dict()
    same = make(num_synthetic_pairs=100)
    same.load_state_dict(state)  # same data: accepted
    other = make(num_synthetic_pairs=100, seed=1)
    with pytest.raises(ValueError, match="other data"):
        other.load_state_dict(state)


def test_pku_preference_and_columns_reach_the_reader(tmp_path):
    pku = tmp_path / "pku.jsonl"
    write_jsonl(pku, [{"prompt": "a b =", "response_0": "a a", "response_1": "b b",
                       "better_response_id": 0, "safer_response_id": 1}] * 4)
    better = make(source=str(pku), val_fraction=0.0)
    safer = make(source=str(pku), val_fraction=0.0, preference="safer")
    assert [r.chosen for r in better.train_records] == ["a a"] * 4
    assert [r.chosen for r in safer.train_records] == ["b b"] * 4
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"q": "a b =", "good": "a b", "bad": "b a"}] * 3)
    dm = make(source=str(other), val_fraction=0.0,
              columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(r.prompt, r.chosen) for r in dm.train_records] == [("a b =", "a b")] * 3
    with pytest.raises(ValueError, match=r"data\.preference must be one of"):
        PreferenceDataModule(preference="kind")
    with pytest.raises(ValueError, match=r"data\.columns: unknown field 'answer'"):
        PreferenceDataModule(columns={"answer": "a"})
    with pytest.raises(ValueError, match=r"data\.format must be one of"):
        PreferenceDataModule(format="pkuu")


def test_truncation_drops_and_unk_rate_are_counted(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "a b =", "chosen": "a b c", "rejected": "a b d"}] * 3
                + [{"prompt": "a =", "chosen": "c", "rejected": "d"}] * 2)
    dm = make(source=str(path), val_fraction=0.0, max_response_length=2)
    assert len(dm.train_pairs) == len(dm.train_records) == 2
    assert all(r.chosen == "c" for r in dm.train_records)  # records stay aligned with pairs
    assert dm.stats["data/dropped"] == 3 and dm.stats["data/kept"] == 2
    assert dm.stats["data/unk_rate"] == 0.0
    english = tmp_path / "english.jsonl"
    write_jsonl(english, [{"prompt": "Name a colour.", "chosen": "Blue, I think.",
                           "rejected": "Seven."}] * 4)
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        dm = make(source=str(english), val_fraction=0.0)
    assert dm.stats["data/unk_rate"] > 0.5
    assert "'synthetic'" in caplog.text and "english.jsonl" in caplog.text


def test_an_epoch_many_times_the_data_is_warned(caplog):
    # dpo_updates: 200 offline pairs as plain DPO, and 80% of the epoch on top: 5x.
    big = PreferenceDataModule(tokenizer="synthetic", num_synthetic_pairs=200, val_fraction=0,
                               mix_dp=0.4, mix_pr=0.4)
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        big.setup("fit")
    assert big.epoch_counts().total == 1000
    assert any("1000 examples, 5.0x the 200 offline pairs" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        PreferenceDataModule(tokenizer="synthetic", num_synthetic_pairs=200, val_fraction=0,
                             mix_pr=0.3).setup("fit")
    assert not [r for r in caplog.records if "offline pairs" in r.getMessage()]
