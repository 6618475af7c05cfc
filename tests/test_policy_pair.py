"""PolicyPair: the reference (copy, disabled adapter, updated adapter), log-probs of pairs,
and which weights a checkpoint must keep."""

import pytest
import torch

from sail_lightning.models import LoraOptions
from sail_lightning.policy_pair import PolicyPair, build_policy_pair
from tests.conftest import assert_reference_becomes_the_policy
from tests.helpers import collate, datamodule, module

LORA = LoraOptions(r=4, alpha=8, dropout=0.0)


def nudge(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def test_cached_reference_logps_equal_the_reference_forward():
    m = module()
    pairs = datamodule().train_pairs[:12]
    nudge(m.pair.policy, 0.01)  # move the policy away from the reference
    _, ref = m.pair.pair_logprobs(pairs, policy=False, batch_size=5)
    batch = collate(pairs)
    direct, _ = m.pair.reference_logprobs(batch)
    torch.testing.assert_close(ref.T.reshape(-1), direct, atol=1e-5, rtol=1e-5)
    from sail_lightning.data.tokenize import TokenizedPair

    cached = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, float(r[0]), float(r[1]))
              for p, r in zip(pairs, ref, strict=True)]
    with_cache = collate(cached)
    assert "ref_logps" in with_cache and "ref_logps" not in batch
    torch.testing.assert_close(m.pair.logprobs(with_cache)[1], m.pair.logprobs(batch)[1],
                               atol=1e-5, rtol=1e-5)


def test_pair_logprobs_are_the_batch_forward_in_eval_mode_whatever_the_batch_size():
    m = module()
    pairs = datamodule().train_pairs[:10]
    pol, ref = m.pair.pair_logprobs(pairs, batch_size=3)
    assert pol.shape == ref.shape == (10, 2) and m.pair.policy.training
    m.pair.policy.eval()
    with torch.no_grad():
        lp, ref_lp, counts = m.pair.logprobs(collate(pairs))
    torch.testing.assert_close(pol, lp.view(2, -1).T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, ref_lp.view(2, -1).T, atol=1e-5, rtol=1e-5)
    assert counts.shape == (20,) and (counts > 0).all()


def test_chosen_only_log_probs_are_the_chosen_column_with_half_the_rows(monkeypatch):
    import sail_lightning.policy_pair as policy_pair

    m = module()
    pairs = datamodule().train_pairs[:10]
    nudge(m.pair.policy, 0.01)
    pol, ref = m.pair.pair_logprobs(pairs, batch_size=4)
    rows = []
    forward = policy_pair.concatenated_logprobs
    monkeypatch.setattr(policy_pair, "concatenated_logprobs",
                        lambda model, batch, chunk: rows.append(batch["input_ids"].shape[0])
                        or forward(model, batch, chunk))
    pol_c, ref_c = m.pair.pair_logprobs(pairs, batch_size=4, chosen_only=True)
    assert pol_c.shape == ref_c.shape == (10, 1)
    torch.testing.assert_close(pol_c[:, 0], pol[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_c[:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)
    assert rows == [4, 4, 4, 4, 2, 2]  # policy and reference per batch: chosen rows alone


def test_pair_logprobs_by_length_keep_the_order_and_cut_padding():
    """Sorted by length, the batches hold less padding; the values come back in the pairs'
    order, equal to the unsorted ones up to rounding."""
    from sail_lightning.data.tokenize import TokenizedPair

    m = module()
    base = datamodule().train_pairs[:12]
    # Lengths that vary a lot, interleaved so that unsorted batches mix short and long rows.
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids[: 1 + (i % 2) * 20],
                           p.rejected_ids[: 1 + (i % 2) * 20]) for i, p in enumerate(base)]
    widths: list[int] = []
    original = m.pair.reference_logprobs

    def spy(batch):
        widths.append(batch["input_ids"].shape[1])
        return original(batch)

    m.pair.reference_logprobs = spy
    pol_a, ref_a = m.pair.pair_logprobs(pairs, batch_size=6, by_length=False)
    unsorted_width = sum(widths)
    widths.clear()
    pol_b, ref_b = m.pair.pair_logprobs(pairs, batch_size=6, by_length=True)
    assert sum(widths) < unsorted_width
    torch.testing.assert_close(pol_a, pol_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_a, ref_b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ref_b[0], ref_b[1])  # distinct rows, so the order is checked


@pytest.mark.parametrize("lora", [False, True])
def test_update_reference_copies_the_policy(lora, tiny_model_dir):
    m = module(model_name_or_path=str(tiny_model_dir), **({"lora": LORA} if lora else {}))
    nudge(m.pair.policy)
    assert_reference_becomes_the_policy(m, datamodule().train_pairs[:6])
    assert m.pair.reference_updated
    trainable = [n for n, p in m.pair.policy.named_parameters() if p.requires_grad]
    if lora:  # a second, frozen adapter; the policy's own adapter is still the trained one
        assert trainable and all(".default." in n for n in trainable)
        assert m.pair.has_reference_adapter
    else:
        assert not any(p.requires_grad for p in m.pair.reference.parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_rebuildable_weights_are_the_frozen_ones_until_the_reference_is_updated(lora,
                                                                                tiny_model_dir):
    m = module(model_name_or_path=str(tiny_model_dir), **({"lora": LORA} if lora else {}))
    pair = m.pair
    keys = pair.state_keys()
    trainable = {n for n, p in pair.named_parameters() if p.requires_grad}
    kept = {k for k in keys if not pair.rebuildable(k)}
    assert kept == trainable  # the frozen reference / base rebuilds from the options
    pair.update_reference()
    kept = {k for k in pair.state_keys() if not pair.rebuildable(k)}
    expected = trainable | ({k for k in pair.state_keys() if ".reference." in k} if lora else
                            {k for k in keys if k.startswith("reference.")})
    assert kept == expected
    # Loading: the flag restores the adapter before the weights come; missing keys are named.
    fresh = module(model_name_or_path=str(tiny_model_dir), **({"lora": LORA} if lora else {}))
    assert fresh.pair.check_saved(expected, reference_updated=True) == []
    assert fresh.pair.state_keys() == pair.state_keys()
    with pytest.raises(RuntimeError, match="lacks 1 weight"):
        module(model_name_or_path=str(tiny_model_dir), **({"lora": LORA} if lora else {})
               ).pair.check_saved(sorted(expected)[1:], reference_updated=True)


def test_a_pair_needs_a_reference_or_adapters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="LoRA"):
        PolicyPair(AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def test_build_policy_pair_reads_the_module_options(tiny_model_dir):
    m = module(model_name_or_path=str(tiny_model_dir), lora=LORA, logprob_chunk_size=4)
    from sail_lightning.tokenizer import build_tokenizer

    pair = build_policy_pair(m.hparams, build_tokenizer(str(tiny_model_dir)))
    assert pair.lora and pair.reference is None and pair.logprob_chunk_size == 4
    assert pair.policy.training  # from_pretrained returns eval mode; training needs dropout
