"""Memory on by default where it helps: chunked log-probs from a 16k vocabulary (the choice,
and the same log-probs as full logits), and the CLI's fixed glibc mmap threshold."""

import platform

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sail_lightning.heap import fix_mmap_threshold
from sail_lightning.logprobs import concatenated_logprobs
from sail_lightning.policy_pair import AUTO_CHUNK_SIZE, AUTO_CHUNK_VOCAB, auto_chunk_size


def llama(vocab: int):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64))


def test_chunked_from_a_real_vocabulary_up():
    assert auto_chunk_size(llama(AUTO_CHUNK_VOCAB - 1)) == 0
    big = llama(AUTO_CHUNK_VOCAB)
    assert auto_chunk_size(big) == AUTO_CHUNK_SIZE
    ids = torch.randint(0, AUTO_CHUNK_VOCAB, (4, 40))
    mask = torch.zeros_like(ids)
    mask[:, 10:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask}
    full, chunked = (concatenated_logprobs(big, batch, n)[0] for n in (0, AUTO_CHUNK_SIZE))
    assert torch.allclose(full, chunked, atol=1e-4)


def test_the_module_resolves_the_default(tiny_model_dir):
    from sail_lightning.module import SAILModule

    module = SAILModule(model_name_or_path=str(tiny_model_dir))
    assert module.hparams.logprob_chunk_size is None
    module.configure_model()
    assert module.pair.logprob_chunk_size == 0  # the synthetic vocabulary is tiny
    with pytest.raises(ValueError, match="logprob_chunk_size must be >= 0"):
        SAILModule(model_name_or_path=str(tiny_model_dir), logprob_chunk_size=-1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_mmap_threshold_fixed_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_mmap_threshold() == 2**20
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is None
