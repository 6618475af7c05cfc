"""Shared fixtures: tiny models and tokenizers built locally (nothing is downloaded)."""

import logging
import os
from pathlib import Path

# One thread per process unless the caller says otherwise: the tests' models are tiny, the
# distributed tests run two processes on two cores, and torch's default of one thread per
# core made them up to ten times slower when anything else ran beside them. Set before torch
# is imported, so the processes the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# Loggers whose level the benchmarks' quiet() raises; a test that runs a benchmark must not
# silence the warnings that later tests read (caplog saw nothing after one did).
_QUIETED = ("sail_lightning", "lightning", "lightning.pytorch", "lightning.fabric",
            "transformers", "accelerate", "trl", "datasets")


@pytest.fixture(autouse=True)
def _restore_log_levels():
    levels = {name: logging.getLogger(name).level for name in _QUIETED}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def synthetic_tokenizer():
    from sail_lightning.tokenizer import build_tokenizer

    return build_tokenizer("synthetic")


def save_tiny_llama(path, tokenizer, *, hidden_size: int, seed: int, **config):
    """A tiny Llama and its tokenizer saved to `path`: loaded back by path, as a hub name is.
    ``config`` overrides the config's fields (e.g. ``tie_word_embeddings``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sail_lightning.synthetic import tiny_llama_config

    torch.manual_seed(seed)
    cfg = {**tiny_llama_config(tokenizer, hidden_size=hidden_size, num_hidden_layers=2),
           **config}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_reference_becomes_the_policy(module, pairs):
    """update_reference(): reference log-probs equal the policy's, the policy is unchanged."""
    import torch

    pol, ref_before = module.pair.pair_logprobs(pairs)
    assert not torch.allclose(pol, ref_before)
    module.pair.update_reference()
    pol_after, ref_after = module.pair.pair_logprobs(pairs)
    torch.testing.assert_close(ref_after, pol, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pol_after, pol)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, synthetic_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), synthetic_tokenizer,
                           hidden_size=32, seed=0)


@pytest.fixture(scope="session")
def one_process_dpo(tmp_path_factory):
    """Offline DPO in one process on 8-pair batches (``tests.helpers.run_cli``): the
    baseline that the 2-process DDP and FSDP2 runs on 2 x 4 pairs must reproduce."""
    from tests.helpers import run_cli

    return run_cli(tmp_path_factory.mktemp("one_process"), "one", "dpo",
                   "--data.batch_size=8", "--trainer.enable_checkpointing=false")


@pytest.fixture(scope="session")
def judge_url(tmp_path_factory):
    """The scripted OpenAI-protocol judge (tests/judge_server.py) on 127.0.0.1, for the
    tests' session; stopped at its end."""
    from tests.servers import free_port, running

    port = free_port()
    with running(["-m", "tests.judge_server", "--port", str(port)], port,
                 tmp_path_factory.mktemp("logs") / "judge_server.log"):
        yield f"http://127.0.0.1:{port}/v1"
