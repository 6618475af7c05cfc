"""Tests for the embedded synthetic preference task (hand-computed values throughout)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sail_lightning.synthetic import SyntheticTask, tiny_llama_config
from sail_lightning.tokenizer import SYNTHETIC_TOKENIZER, build_tokenizer

TASK = SyntheticTask()
PROMPT = "d a c b ="  # ideal "a b c d", length 4


def reference_reward(prompt: str, response: str, length_penalty: float = 0.5) -> float:
    """Independent re-implementation of r* used to cross-check the oracle statistics."""
    ideal = sorted(prompt.split()[:-1])
    tokens = response.split()
    matches = sum(1 for i in range(min(len(tokens), len(ideal))) if tokens[i] == ideal[i])
    return matches / len(ideal) - length_penalty * abs(len(tokens) - len(ideal)) / len(ideal)


@pytest.fixture(scope="module")
def pairs() -> list[dict[str, str]]:
    return TASK.make_pairs(2000, seed=0)


# --- task and reward -------------------------------------------------------------------------


def test_symbols_and_prompts():
    assert TASK.symbols() == list("abcdefghijkl")
    prompts = TASK.sample_prompts(200, seed=3)
    assert prompts == TASK.sample_prompts(200, seed=3)
    assert prompts != TASK.sample_prompts(200, seed=4)
    for p in prompts:
        tokens = p.split()
        assert tokens[-1] == "=" and 4 <= len(tokens) - 1 <= 8
        assert set(tokens[:-1]) <= set(TASK.symbols())
        assert p == " ".join(tokens)  # single spaces


def test_ideal_response():
    assert TASK.ideal_response(PROMPT) == "a b c d"
    assert TASK.ideal_response("b b a =") == "a b b"
    with pytest.raises(ValueError):
        TASK.ideal_response("d a c b")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("a b c d", 1.0),  # ideal
        ("a b x d", 0.75),  # one wrong symbol (unknown token) out of 4
        ("a b e d", 0.75),  # one wrong symbol (known token) out of 4
        ("a b c d e", 0.875),  # one extra: 1 - 0.5 * 1/4
        ("a b c", 0.75 - 0.125),  # one missing: 3/4 - 0.5 * 1/4
        ("", -0.5),  # 0 matches, 0.5 * |0 - 4| / 4
        ("d c b a", -0.0),
    ],
)
def test_score_hand_computed(response, expected):
    r = TASK.score([PROMPT], [response])
    assert r.dtype == torch.float32 and r.shape == (1,)
    assert r.item() == pytest.approx(expected, abs=1e-6)


def test_score_depends_on_prompt():
    r = TASK.score(["d a c b =", "e a c b ="], ["a b c d", "a b c d"])
    assert r.tolist() == pytest.approx([1.0, 0.75])
    with pytest.raises(ValueError):
        TASK.score([PROMPT], ["a", "b"])


def test_length_penalty_parameter():
    task = SyntheticTask(length_penalty=1.0)
    assert task.score([PROMPT], ["a b c d e"]).item() == pytest.approx(0.75)


# --- Bradley-Terry oracle --------------------------------------------------------------------


def test_preference_prob():
    p = TASK.preference_prob([PROMPT] * 2, ["a b c d", "a b x d"], ["a b c d", "a b c d"])
    assert p[0].item() == 0.5
    assert p[1].item() == pytest.approx(1 / (1 + math.exp(-(0.75 - 1.0) / 0.1)), rel=1e-5)
    hot = SyntheticTask(temperature=1.0)
    assert hot.preference_prob([PROMPT], ["a b c"], ["a b c d"]).item() == pytest.approx(
        1 / (1 + math.exp(0.375)), rel=1e-5
    )


def test_prefer_frequency_and_reproducibility():
    n = 20_000
    prompt = "h g f e d c b a ="  # length 8: one wrong symbol costs 1/8
    a, b = "a b c d e f g x", "a b c d e f g h"
    expected = 1 / (1 + math.exp(0.125 / 0.1))
    prompts, ra, rb = [prompt] * n, [a] * n, [b] * n
    draws = TASK.prefer(prompts, ra, rb, generator=torch.Generator().manual_seed(7))
    assert draws.dtype == torch.bool and draws.shape == (n,)
    assert draws.float().mean().item() == pytest.approx(expected, abs=0.01)
    again = TASK.prefer(prompts, ra, rb, generator=torch.Generator().manual_seed(7))
    assert torch.equal(draws, again)
    other = TASK.prefer(prompts, ra, rb, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(draws, other)


def test_corrupt():
    rng = random.Random(0)
    assert TASK.corrupt("a b c d", 0.0, rng) == "a b c d"
    for _ in range(500):
        out = TASK.corrupt("a", 1.0, rng).split()
        assert 1 <= len(out) <= 2 and set(out) <= set(TASK.symbols())
    assert TASK.corrupt("a b c d", 0.7, random.Random(5)) == TASK.corrupt(
        "a b c d", 0.7, random.Random(5)
    )


# --- offline pairs ---------------------------------------------------------------------------


def test_make_pairs_deterministic(pairs):
    assert TASK.make_pairs(50, seed=0) == pairs[:50]
    assert TASK.make_pairs(50, seed=1) != pairs[:50]
    assert [p["prompt"] for p in pairs] == TASK.sample_prompts(2000, seed=0)


def test_make_pairs_format(pairs):
    assert len(pairs) == 2000
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["chosen"] != p["rejected"]
        for response in (p["chosen"], p["rejected"]):
            tokens = response.split()
            assert tokens and set(tokens) <= set(TASK.symbols())
            assert response == " ".join(tokens)


def test_make_pairs_follow_oracle(pairs):
    prompts = [p["prompt"] for p in pairs]
    r_c = [reference_reward(x, p["chosen"]) for x, p in zip(prompts, pairs, strict=True)]
    r_r = [reference_reward(x, p["rejected"]) for x, p in zip(prompts, pairs, strict=True)]
    assert TASK.score(prompts, [p["chosen"] for p in pairs]).tolist() == pytest.approx(r_c)
    assert sum(r_c) / len(r_c) > sum(r_r) / len(r_r) + 0.1

    # Under BT, the higher-reward response wins with prob sigmoid(|margin| / T).
    untied = [(c, r) for c, r in zip(r_c, r_r, strict=True) if abs(c - r) > 1e-9]
    observed = sum(c > r for c, r in untied) / len(untied)
    expected = sum(1 / (1 + math.exp(-abs(c - r) / 0.1)) for c, r in untied) / len(untied)
    assert 0.6 < observed < 1.0
    assert observed == pytest.approx(expected, abs=0.04)


# --- tokenizer and model ---------------------------------------------------------------------


def test_tokenizer_ids_and_specials():
    tok = TASK.build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("=") == 4
    assert tok.convert_tokens_to_ids(TASK.symbols()) == list(range(5, 17))
    assert len(tok) == 17
    assert tok.padding_side == "right"
    assert tok.chat_template is None

    ids = tok("d a c b =")["input_ids"]
    assert ids == [1, 8, 5, 7, 6, 4]
    assert tok("a b", add_special_tokens=False)["input_ids"] == [5, 6]
    assert tok.decode([*tok("a  b c")["input_ids"], 2, 0], skip_special_tokens=True) == "a b c"

    batch = tok(["a b", PROMPT], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [1, 5, 6, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_decoded_response_is_scored():
    tok = TASK.build_tokenizer()
    generated = tok("a b c d", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = tok.decode(generated, skip_special_tokens=True)
    assert text == "a b c d"
    assert TASK.score([PROMPT], [text]).item() == 1.0


def test_tokenizer_round_trip(tmp_path):
    tok = TASK.build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [PROMPT, "l k =", "a b c"]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.pad_token == "<pad>" and loaded.padding_side == "right"
    assert loaded.chat_template is None


def test_tiny_llama_forward():
    tok = build_tokenizer(SYNTHETIC_TOKENIZER)
    cfg_dict = tiny_llama_config(tok)
    assert cfg_dict["model_type"] == "llama" and cfg_dict["vocab_size"] == 17
    assert (cfg_dict["pad_token_id"], cfg_dict["bos_token_id"], cfg_dict["eos_token_id"]) == (
        0,
        1,
        2,
    )
    config = AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    batch = tok(TASK.sample_prompts(3, seed=0), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (3, batch["input_ids"].shape[1], 17)
    assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError):
        tiny_llama_config(tok, hidden_size=30, num_attention_heads=4)
