"""Sequence log-probs: response tokens only, one forward for chosen and rejected."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
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


def _tiny_lm(model_type="llama", tie=False, **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4,
                               intermediate_size=64, vocab_size=97, tie_word_embeddings=tie,
                               head_dim=8, **extra)
    return AutoModelForCausalLM.from_config(cfg).train()


def _padded_batch(length=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (4, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # left padding, as the collator pads prompts
    response = torch.zeros_like(ids)
    response[:, length - 5:] = 1
    response[2, length - 2:] = 0  # right padding of a short response
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_output_layer_matches_full_logits_in_values_and_gradients(tie, chunk):
    model, batch = _tiny_lm(tie=tie), _padded_batch()
    full, counts = concatenated_logprobs(model, batch)
    full.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked, chunked_counts = concatenated_logprobs(model, batch, chunk_size=chunk)
    chunked.square().sum().backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert chunked_counts.tolist() == counts.tolist() == [5, 5, 3, 5]
    for name, param in model.named_parameters():
        # float32 sums in another order: absolute error relative to the gradient's scale
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)
    with torch.no_grad():  # the reference's path: no checkpointing, same values
        torch.testing.assert_close(concatenated_logprobs(model, batch, chunk)[0], full.detach(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained_head", "frozen_head"])
def test_chunked_output_layer_never_builds_logits_for_every_position(frozen_head):
    """The point of chunking: no (N, T, V) tensor in forward or backward, only chunks. Nor an
    (N, H, V) one: given a strided (N, 1, H) slice, matmul batches a frozen (LoRA) output
    layer's weight N times, which bf16 CPU kernels then copy (94 MiB per forward, measured)."""
    model, batch = _tiny_lm(), _padded_batch(length=40)
    model.get_output_embeddings().requires_grad_(not frozen_head)
    n, t = batch["input_ids"].shape
    vocab = model.config.vocab_size
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(x.numel() for x in tree_flatten(out)[0]
                         if isinstance(x, torch.Tensor) and vocab in x.shape)
            return out

    with Sizes():
        concatenated_logprobs(model, batch, chunk_size=4)[0].sum().backward()
    # Of the tensors with a vocabulary axis, the largest are the output layer's weight and
    # gradient (V x hidden): chunks of logits are smaller, and no tensor spans every position.
    assert max(sizes) == vocab * model.config.hidden_size < n * (t - 1) * vocab / 4
    sizes.clear()
    with Sizes():  # the check works: the full path does build them
        concatenated_logprobs(model, batch)[0].sum().backward()
    assert max(sizes) >= n * t * vocab


def test_chunked_output_layer_refuses_models_that_change_logits_after_it():
    # Gemma-2 soft-caps its logits after the output layer; chunking would skip that.
    model = _tiny_lm("gemma2", final_logit_softcapping=0.5)
    with pytest.raises(ValueError, match="logprob_chunk_size.*soft capping"):
        concatenated_logprobs(model, _padded_batch(), chunk_size=4)
