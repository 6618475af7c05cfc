"""Batched sampling: prompt/response attachment, truncation, modes, seeding and validation."""

import dataclasses
import random

import pytest
import torch
from torch import nn

from sail_lightning.generation import SamplingOptions, decode, generate_responses, generation_mode

PAD, BOS, EOS = 0, 1, 2
# The tests call the deprecated (transformers 5) alias that the rest of the package uses.
pytestmark = pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing.*:FutureWarning")
GREEDY = SamplingOptions(num_samples=1, greedy=True, max_new_tokens=8, batch_size=4)


class FakeLM(nn.Module):
    """"Generates" ``continuation(prompt, sample)`` for each row, as HF generate lays it out.

    The prompt is read back from the left-padded row through its attention mask, so the output
    depends on each prompt's own content only; rows are right-filled with pad to a common width.
    """

    def __init__(self, continuation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        # Default: sample j of prompt p is [100 + j, *reversed(p)] + eos.
        self.continuation = continuation or (lambda p, j: [100 + j, *p[::-1], EOS])
        self.calls = []

    def generate(self, input_ids, attention_mask, num_return_sequences, pad_token_id, **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask,
                           "training": self.training, **kwargs})
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            # Left padding: zeros then ones in the mask, pads exactly where the mask is 0.
            pairs = list(zip(ids, mask, strict=True))
            assert mask == sorted(mask) and all((m == 0) == (t == pad_token_id) for t, m in pairs)
            prompt = [t for t, m in pairs if m]
            for j in range(num_return_sequences):
                rows.append(ids + self.continuation(prompt, j))
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def _generate(model, prompts, options, seed=0, **kwargs):
    return generate_responses(model, prompts, options, pad_token_id=PAD, eos_token_id=EOS,
                              seed=seed, progress=False, **kwargs)


def _random_prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[BOS, *(rng.randint(5, 16) for _ in range(n - 1))] for n in lengths]


def _checkpointing(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matmuls: threads only add contention on a shared CI box. Restored for other modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


# -- attachment and stripping -----------------------------------------------------------------


@pytest.mark.parametrize("lengths", [[2, 3, 4, 5, 6, 7, 8], [6, 2, 8, 3, 7, 4, 5, 3]])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 100])
def test_fake_model_exact_attachment_and_stripping(lengths, batch_size):
    prompts = _random_prompts(lengths, seed=len(lengths))
    model = FakeLM()
    options = SamplingOptions(num_samples=2, batch_size=batch_size)
    result = _generate(model, prompts, options)
    assert result == [[[100, *p[::-1], EOS], [101, *p[::-1], EOS]] for p in prompts]
    assert len(model.calls) == -(-len(prompts) // batch_size)
    # Sorted longest first: each batch is as narrow as possible and widths never increase.
    widths = [c["input_ids"].shape[1] for c in model.calls]
    assert widths == sorted(widths, reverse=True)
    assert widths[0] == max(lengths)


def test_tiny_llama_greedy_batched_equals_alone(tiny_llama):
    prompts = _random_prompts([3, 7, 2, 5, 4, 6, 2, 8, 5], seed=1)  # shuffled lengths
    batched = _generate(tiny_llama, prompts, GREEDY)
    alone = [_generate(tiny_llama, [p], dataclasses.replace(GREEDY, batch_size=1))[0]
             for p in prompts]
    assert batched == alone
    # Not vacuous: different prompts get different responses, so a swap would show.
    assert len({tuple(r[0]) for r in alone}) >= len(prompts) - 2
    assert all(len(r) == 1 and 1 <= len(r[0]) <= GREEDY.max_new_tokens for r in batched)


def test_generate_kwargs_and_left_padding():
    model = FakeLM()
    prompts = [[BOS, 5], [BOS, 6, 7, 8]]
    _generate(model, prompts, SamplingOptions(temperature=0.7, top_p=0.9, max_new_tokens=5),
              synced_gpus=True)
    call = model.calls[0]
    assert call["input_ids"].tolist() == [[BOS, 6, 7, 8], [PAD, PAD, BOS, 5]]
    assert call["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert call["do_sample"] and call["temperature"] == 0.7 and call["top_p"] == 0.9
    assert call["top_k"] == 0 and call["max_new_tokens"] == 5 and call["use_cache"]
    assert call["eos_token_id"] == EOS and call["synced_gpus"]
    _generate(model, prompts, GREEDY)
    assert not model.calls[1]["do_sample"] and "temperature" not in model.calls[1]


# -- truncation -------------------------------------------------------------------------------


def test_truncated_after_first_eos_and_pads_removed():
    script = {
        5: [7, 8, EOS, 9, 9, EOS],  # junk after the first eos is cut, eos kept
        6: [7, EOS],  # right-filled with pads by the fake: removed
        7: [EOS],  # an empty response is just eos
        8: [7, 8, 9, 10, 11, 12],  # hit max_new_tokens: kept as generated
        9: [7, PAD, 8, PAD, PAD, PAD],  # no eos: trailing pads dropped, inner pad kept
    }
    model = FakeLM(lambda p, j: script[p[-1]])
    result = _generate(model, [[BOS, k] for k in script], SamplingOptions(num_samples=1))
    assert [r[0] for r in result] == [[7, 8, EOS], [7, EOS], [EOS], [7, 8, 9, 10, 11, 12],
                                      [7, PAD, 8]]


def test_pad_equal_to_eos():
    model = FakeLM(lambda p, j: [p[-1], EOS] if p[-1] == 5 else [p[-1], p[-1], p[-1], EOS])
    result = generate_responses(model, [[BOS, 5], [BOS, 6]], SamplingOptions(num_samples=1),
                                pad_token_id=EOS, eos_token_id=EOS, seed=0, progress=False)
    assert result == [[[5, EOS]], [[6, 6, 6, EOS]]]


# -- modes, checkpointing and weights ---------------------------------------------------------


def _spy(model):
    seen = []
    generate = model.generate

    def wrapper(*args, **kwargs):
        seen.append((model.training, _checkpointing(model)))
        return generate(*args, **kwargs)

    model.generate = wrapper
    return seen


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_eval_and_no_checkpointing_during_then_restored(tiny_llama):
    tiny_llama.train()
    tiny_llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    # transformers keeps each layer's checkpoint function in this private attribute only.
    funcs = {n: m._gradient_checkpointing_func for n, m in tiny_llama.named_modules()
             if hasattr(m, "_gradient_checkpointing_func")}
    tiny_llama.model.norm.eval()  # kept in eval on purpose: must stay so
    before = _state(tiny_llama)
    seen = _spy(tiny_llama)
    _generate(tiny_llama, _random_prompts([3, 5, 4]), SamplingOptions(batch_size=2))
    assert seen == [(False, False), (False, False)]
    assert tiny_llama.training and _checkpointing(tiny_llama)
    assert not tiny_llama.model.norm.training and tiny_llama.model.layers[0].training
    # The caller's checkpoint function (and its kwargs) is the very same object.
    assert funcs == {n: m._gradient_checkpointing_func for n, m in tiny_llama.named_modules()
                     if hasattr(m, "_gradient_checkpointing_func")}
    after = _state(tiny_llama)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_eval_model_stays_eval_without_checkpointing(tiny_llama):
    tiny_llama.eval()
    seen = _spy(tiny_llama)
    _generate(tiny_llama, _random_prompts([3]), GREEDY)
    assert seen == [(False, False)]
    assert not any(m.training for m in tiny_llama.modules()) and not _checkpointing(tiny_llama)


def test_peft_lora_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    tiny_llama.gradient_checkpointing_enable()
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "v_proj"]))
    model.train()
    before = _state(model)
    seen = _spy(model)
    prompts = _random_prompts([4, 2, 6])
    result = _generate(model, prompts, SamplingOptions(batch_size=2))
    assert seen == [(False, False), (False, False)]
    assert model.training and _checkpointing(model)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(result) == 3 and all(len(r) == 2 for r in result)


def test_restored_on_error():
    model = FakeLM(lambda p, j: 1 / 0)
    model.gradient_checkpointing = True  # what gradient_checkpointing_enable sets
    model.train()
    with pytest.raises(ZeroDivisionError):
        _generate(model, [[BOS]], SamplingOptions())
    assert model.training and model.gradient_checkpointing
    with generation_mode(model) as inside:
        assert inside is model and not model.training and not model.gradient_checkpointing


# -- seeding ----------------------------------------------------------------------------------


def test_same_seed_same_responses_and_global_rng_untouched(tiny_llama):
    prompts = _random_prompts([3, 5, 4, 6])
    options = SamplingOptions(num_samples=2, max_new_tokens=8, batch_size=3)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = _generate(tiny_llama, prompts, options, seed=7)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(999)  # a different global state must not matter
    assert _generate(tiny_llama, prompts, options, seed=7) == first
    assert _generate(tiny_llama, prompts, options, seed=8) != first
    # Sampling really samples: the two responses to a prompt are not all equal.
    assert any(r[0] != r[1] for r in first)


def test_num_samples_in_order(tiny_llama):
    prompts = _random_prompts([5, 3])
    result = _generate(FakeLM(), prompts, SamplingOptions(num_samples=3, batch_size=1))
    assert [[r[0] for r in rs] for rs in result] == [[100, 101, 102]] * 2
    result = _generate(tiny_llama, prompts, SamplingOptions(num_samples=3, max_new_tokens=4))
    assert [len(rs) for rs in result] == [3, 3]


# -- validation and helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_samples": 0}, "sampling.num_samples"),
        ({"greedy": True}, "sampling.num_samples"),  # default num_samples=2
        ({"temperature": 0.0}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"batch_size": 0}, "sampling.batch_size"),
    ],
)
def test_option_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingOptions(**kwargs)
    options = SamplingOptions()
    for key, value in kwargs.items():
        setattr(options, key, value)  # mutated after construction: caught when generating
    with pytest.raises(ValueError, match=name):
        _generate(FakeLM(), [[BOS]], options)


def test_empty_inputs():
    model = FakeLM()
    assert _generate(model, [], SamplingOptions()) == [] and model.calls == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        _generate(model, [[BOS], []], SamplingOptions())


def test_decode_and_progress(synthetic_tokenizer, capsys):
    ids = synthetic_tokenizer("d a =")["input_ids"]
    assert decode(synthetic_tokenizer, [*ids, EOS, PAD]) == "d a ="
    generate_responses(FakeLM(), [ids], SamplingOptions(), pad_token_id=PAD, eos_token_id=EOS,
                       seed=0, desc="round 3")
    assert "round 3" in capsys.readouterr().err
