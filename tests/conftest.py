"""Shared fixtures: tiny models and tokenizers built locally (nothing is downloaded)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = Path(os.environ.get("SAIL_SHARED_DATA", REPO.parent / "shared" / "data"))
# The real data lies beside the repo (CI clones it there); elsewhere these tests skip.
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no {SHARED_DATA}")

TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def synthetic_tokenizer():
    from sail_lightning.synthetic import build_tokenizer

    return build_tokenizer("synthetic")


def save_tiny_llama(path, tokenizer, *, hidden_size: int, seed: int):
    """A tiny Llama and its tokenizer saved to `path`: loaded back by path, as a hub name is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sail_lightning.synthetic import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(tokenizer, hidden_size=hidden_size, num_hidden_layers=2)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_reference_becomes_the_policy(module, pairs):
    """update_reference(): reference log-probs equal the policy's, the policy is unchanged."""
    import torch

    pol, ref_before = module.pair_logprobs(pairs)
    assert not torch.allclose(pol, ref_before)
    module.update_reference()
    pol_after, ref_after = module.pair_logprobs(pairs)
    torch.testing.assert_close(ref_after, pol, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pol_after, pol)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, synthetic_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), synthetic_tokenizer,
                           hidden_size=32, seed=0)
