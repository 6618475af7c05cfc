"""sampling.engine in the default environment (no vLLM): the option, the engine each name
gives, and the errors. vLLM itself is tested by tests/test_vllm_*.py (``-m vllm``)."""

import sys

import pytest
import torch

import sail_lightning.engines as engines
from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.evaluation import EvaluationCallback
from sail_lightning.generation import SamplingOptions, generate_responses
from tests.helpers import module


@pytest.fixture
def fresh_engine(monkeypatch):
    """No vLLM engine made yet in this process, and none left behind."""
    monkeypatch.setattr(engines, "_vllm_engine", None)


def test_hf_is_the_default_and_runs_generate_responses():
    options = SamplingOptions()
    assert options.engine == "hf"
    assert engines.get_engine(options).generate is generate_responses


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "sglang"}, "sampling.engine must be one of"),
    ({"engine_kwargs": {"max_model_len": 64}}, "sampling.engine_kwargs are vllm.LLM"),
])
def test_engine_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**kwargs)
    with pytest.raises(ValueError, match=message):
        PairGenerationCallback(sampling=_unvalidated(**kwargs))


def _unvalidated(**kwargs) -> SamplingOptions:
    options = SamplingOptions()
    for name, value in kwargs.items():
        setattr(options, name, value)  # as jsonargparse may leave it: the callback validates
    return options


def test_evaluation_engine_is_validated():
    with pytest.raises(ValueError, match="EvaluationCallback.engine must be one of"):
        EvaluationCallback(engine="sglang")
    assert EvaluationCallback(engine="vllm").engine == "vllm"


def test_one_vllm_engine_per_process_with_its_first_kwargs(fresh_engine):
    first = engines.get_engine(SamplingOptions(engine="vllm", engine_kwargs={"seed": 1}))
    assert engines.get_engine(SamplingOptions(engine="vllm")) is first  # no kwargs: reused
    assert first.llm is None  # built lazily, at the first generation
    with pytest.raises(ValueError, match="one engine per process"):
        engines.get_engine(SamplingOptions(engine="vllm", engine_kwargs={"seed": 2}))


def test_missing_vllm_names_the_extra(fresh_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as when it is not installed
    m = module()
    options = SamplingOptions(num_samples=1, max_new_tokens=2, engine="vllm")
    with pytest.raises(ImportError, match=r"sail-lightning\[vllm\]"):
        engines.get_engine(options).generate(m.pair.policy, [[1, 5]], options, pad_token_id=0,
                                             eos_token_id=2, seed=0)


def test_lora_weights_are_merged_under_the_base_names():
    from sail_lightning.engines.vllm import policy_weights

    m = module(lora={"r": 4, "alpha": 8, "dropout": 0.0})
    policy = m.pair.policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero: make each delta non-zero
    weights = dict(policy_weights(policy))
    base = policy.get_base_model()
    assert set(weights) == set(type(base)(base.config).state_dict())  # plain transformers keys
    q = base.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + q.get_delta_weight("default")
    torch.testing.assert_close(weights["model.layers.0.self_attn.q_proj.weight"], expected)
    assert not torch.equal(expected, q.base_layer.weight)
    # The merged model computes what the LoRA policy computes.
    plain = type(base)(base.config)
    plain.load_state_dict(weights)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, policy.eval()(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_vllm_under_fsdp1_is_refused_at_setup_before_importing_vllm(monkeypatch):
    """The colocated engine syncs the policy's full weights; FSDP1's flat shards are not
    gathered for it: setup refuses, naming the option and what works, and vllm (here made
    unimportable, as where it is not installed) is never imported."""
    import types

    from lightning.pytorch.strategies import DDPStrategy

    from sail_lightning.distributed import SAILFSDPStrategy, SAILModelParallelStrategy

    monkeypatch.setitem(sys.modules, "vllm", None)
    fsdp1 = types.SimpleNamespace(strategy=SAILFSDPStrategy(), datamodule=None)
    pair_cb = PairGenerationCallback(sampling=SamplingOptions(engine="vllm"))
    with pytest.raises(ValueError, match=r"PairGenerationCallback\.sampling\.engine=vllm is "
                       r"not supported under SAILFSDPStrategy .*FSDP1.*configs/strategy/"
                       r"fsdp2\.yaml.*sampling\.engine=hf under FSDP1"):
        pair_cb.setup(fsdp1, module(), "fit")
    with pytest.raises(ValueError, match=r"EvaluationCallback\.engine=vllm is not supported"):
        EvaluationCallback(engine="vllm").setup(fsdp1, module(), "fit")
    # hf under FSDP1, and vllm under FSDP2 or DDP, pass the check (the pair callback then
    # stops at its next one: this fake trainer has no DataModule).
    for strategy, engine in ((SAILFSDPStrategy(), "hf"), (SAILModelParallelStrategy(), "vllm"),
                             (DDPStrategy(), "vllm")):
        trainer = types.SimpleNamespace(strategy=strategy, datamodule=None)
        with pytest.raises(TypeError, match="needs a PreferenceDataModule"):
            PairGenerationCallback(sampling=SamplingOptions(engine=engine)).setup(
                trainer, module(), "fit")
        EvaluationCallback(engine=engine).setup(trainer, module(), "fit")
