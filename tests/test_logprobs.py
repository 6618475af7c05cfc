"""Sequence log-probs: response tokens only, one forward for chosen and rejected."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sail_lightning.data.tokenize import PreferenceCollator
from sail_lightning.logprobs import concatenated_logprobs, sequence_logprobs
from tests.conftest import TINY_CONFIG


def test_sums_only_response_tokens_against_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0]])
    sums, counts = sequence_logprobs(logits, ids, mask)
    logp = torch.log_softmax(logits, -1)
    for i in range(3):
        expected = sum(logp[i, t - 1, ids[i, t]] for t in range(1, 7) if mask[i, t])
        torch.testing.assert_close(sums[i], torch.as_tensor(expected))
    assert counts.tolist() == [3, 6, 1]
    chunked, _ = sequence_logprobs(logits, ids, mask, chunk_size=2)
    torch.testing.assert_close(chunked, sums)


def test_concatenated_forward_matches_separate_unpadded_forwards(synthetic_tokenizer):
    torch.manual_seed(0)
    cfg = {**TINY_CONFIG, "vocab_size": len(synthetic_tokenizer),
           "pad_token_id": synthetic_tokenizer.pad_token_id}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    examples = [
        {"prompt_ids": [1, 7, 6, 4], "chosen_ids": [6, 7, 2], "rejected_ids": [9, 2], "route": 0},
        {"prompt_ids": [1, 5, 4], "chosen_ids": [5, 2], "rejected_ids": [5, 5, 5, 2],
         "route": 1},
    ]
    batch = PreferenceCollator(synthetic_tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 4 and batch["route"].tolist() == [0, 1]
    with torch.no_grad():
        sums, counts = concatenated_logprobs(model, batch)
        rows = [(e, k) for k in ("chosen_ids", "rejected_ids") for e in examples]
        for row, (ex, key) in enumerate(rows):
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            logp = torch.log_softmax(model(ids).logits, -1)[0]
            p = len(ex["prompt_ids"])
            expected = sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1]))
            torch.testing.assert_close(sums[row], expected, atol=1e-5, rtol=1e-5)
            assert counts[row] == len(ex[key])
