"""Labellers: reward model (padding, pooling, chat template, frozen, lazy, 4-bit), ranker,
callable, oracle, import paths and input validation."""

import copy
import random

import pytest
import torch

from sail_lightning.labellers import (
    CallableLabeller,
    Labeller,
    Labels,
    PairwiseRankerLabeller,
    RewardModelLabeller,
    resolve_callable,
)
from sail_lightning.models import QuantizationOptions
from sail_lightning.synthetic import OracleLabeller, SyntheticTask

# Mixed lengths, so a batch needs padding; the last pair is a tie for the callable tests.
PROMPTS = ["d a c b =", "b a =", "e e f c a b d g =", "c b ="]
RESP_A = ["a b c d", "a", "a b c d e e f g", "b c"]
RESP_B = ["a b", "a b", "g f e", "b c"]
RANKER_P = [0.9, 0.2, 0.5, 0.7]


def my_ranker(prompts, responses_a, responses_b):
    """Fixed P(a > b) per position (cycling), referenced by import path in the tests."""
    return [RANKER_P[i % len(RANKER_P)] for i in range(len(prompts))]


def bool_ranker(prompts, responses_a, responses_b):
    return [len(a) > len(b) for a, b in zip(responses_a, responses_b, strict=True)]


def length_score(prompts, responses):
    return [float(len(r.split())) for r in responses]


NOT_CALLABLE = 3


# -- reward model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, synthetic_tokenizer):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sail_lightning.synthetic import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    cfg = tiny_llama_config(synthetic_tokenizer, hidden_size=32, num_hidden_layers=2)
    config = AutoConfig.for_model(**cfg, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    synthetic_tokenizer.save_pretrained(path)
    return path


def direct_score(model, ids):
    """One sequence alone: batch of one, no padding."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_reward_model_scores_match_unpadded_forward(reward_model_dir):
    labeller = RewardModelLabeller(str(reward_model_dir), batch_size=3, progress=False)
    labels = labeller.label(PROMPTS, RESP_A, RESP_B)
    tok, model = labeller.tokenizer, labeller.model
    for responses, scores in ((RESP_A, labels.scores_a), (RESP_B, labels.scores_b)):
        for i, (x, y) in enumerate(zip(PROMPTS, responses, strict=True)):
            ids = tok(x)["input_ids"] + tok(y, add_special_tokens=False)["input_ids"]
            assert scores[i].item() == pytest.approx(direct_score(model, ids), abs=1e-5)
    assert labels.a_preferred.dtype == torch.bool
    assert torch.equal(labels.a_preferred, labels.scores_a >= labels.scores_b)
    assert labels.a_preferred[3]  # identical responses tie: a is chosen
    assert torch.allclose(labeller.score(PROMPTS, RESP_A), labels.scores_a, atol=1e-5)


def test_reward_model_truncates_from_the_left(reward_model_dir):
    labeller = RewardModelLabeller(str(reward_model_dir), max_length=5, progress=False)
    scores = labeller.score(PROMPTS, RESP_A)
    tok = labeller.tokenizer
    for i, (x, y) in enumerate(zip(PROMPTS, RESP_A, strict=True)):
        ids = (tok(x)["input_ids"] + tok(y, add_special_tokens=False)["input_ids"])[-5:]
        assert scores[i].item() == pytest.approx(direct_score(labeller.model, ids), abs=1e-5)


def test_reward_model_applies_its_chat_template(tmp_path, reward_model_dir, synthetic_tokenizer):
    from transformers import AutoModelForSequenceClassification

    tok = copy.deepcopy(synthetic_tokenizer)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }} "
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    tok.save_pretrained(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(reward_model_dir).save_pretrained(tmp_path)
    messages = [[("user", x)] for x in PROMPTS]

    labeller = RewardModelLabeller(str(tmp_path), batch_size=2, progress=False)
    scores = labeller.score(PROMPTS, RESP_A, messages=messages)
    for i, (x, y) in enumerate(zip(PROMPTS, RESP_A, strict=True)):
        text = f"<bos>{x} {y} <eos>"
        chat = [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
        assert labeller.tokenizer.apply_chat_template(chat, tokenize=False) == text
        ids = labeller.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1
        assert scores[i].item() == pytest.approx(direct_score(labeller.model, ids), abs=1e-5)
    # label() takes the same path (messages as JSON-like lists of lists too).
    as_lists = [[list(turn) for turn in m] for m in messages]
    labels = labeller.label(PROMPTS, RESP_A, RESP_B, messages=as_lists)
    assert torch.allclose(labels.scores_a, scores, atol=1e-5)
    # Without messages the plain prompt + response is scored: a different input, other scores.
    assert not torch.allclose(scores, labeller.score(PROMPTS, RESP_A))


def test_reward_model_is_frozen_in_eval_mode(reward_model_dir):
    labeller = RewardModelLabeller(str(reward_model_dir), progress=False)
    assert labeller.to("cpu") is labeller
    labeller.score(PROMPTS[:1], RESP_A[:1])
    assert not labeller.model.training
    assert all(not p.requires_grad for p in labeller.model.parameters())
    assert labeller.model.config.pad_token_id == labeller.tokenizer.pad_token_id


def test_reward_model_device_follows_to_unless_pinned():
    assert RewardModelLabeller("x").device == torch.device("cpu")
    assert RewardModelLabeller("x").to("meta").device == torch.device("meta")
    assert RewardModelLabeller("x", device="cpu").to("meta").device == torch.device("cpu")


def test_reward_model_loads_lazily_and_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_reward_model")
    labeller = RewardModelLabeller(missing)  # cheap: nothing is read yet
    assert labeller.model is None
    with pytest.raises(OSError, match="no_such_reward_model"):
        labeller.label(PROMPTS, RESP_A, RESP_B)


def test_reward_model_config_errors_come_first():
    with pytest.raises(ValueError, match="torch_dtype"):
        RewardModelLabeller("x", torch_dtype="float64")
    with pytest.raises(ValueError, match="batch_size"):
        RewardModelLabeller("x", batch_size=0)
    with pytest.raises(RuntimeError):
        RewardModelLabeller("x", device="nonsense")


# -- reward model in 4-bit (bitsandbytes runs Linear4bit on the CPU) --------------------------


@pytest.fixture(scope="module")
def deberta_reward_model_dir(tmp_path_factory, synthetic_tokenizer):
    """A tiny DeBERTa-v2 classifier: its head (pooler.dense, classifier with a bias) is one
    that transformers' default 4-bit skip list misses, unlike a Llama's bias-free ``score``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = synthetic_tokenizer
    path = tmp_path_factory.mktemp("tiny_deberta_rm")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "deberta-v2", vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_pairs(n=64):
    task = SyntheticTask()
    prompts = task.sample_prompts(n, seed=0)
    rng = random.Random(0)
    a = [task.corrupt(task.ideal_response(x), 0.5, rng) for x in prompts]
    b = [task.corrupt(task.ideal_response(x), 0.5, rng) for x in prompts]
    return prompts, a, b


@pytest.mark.parametrize("which,head", [("llama", {"score"}),
                                        ("deberta", {"pooler.dense", "classifier"})])
def test_reward_model_4bit_quantizes_the_body_not_the_head(request, which, head):
    import bitsandbytes as bnb

    path = request.getfixturevalue("reward_model_dir" if which == "llama"
                                   else "deberta_reward_model_dir")
    labeller = RewardModelLabeller(str(path), quantization=QuantizationOptions(), progress=False)
    assert labeller.model is None  # still lazy
    scores = labeller.score(PROMPTS, RESP_A)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    linears = {name: m for name, m in labeller.model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    four_bit = {name for name, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and four_bit == linears.keys() - head
    for name in head:
        assert type(linears[name]) is torch.nn.Linear
        assert linears[name].weight.dtype == torch.float32
    assert labeller.model.is_loaded_in_4bit
    assert all(not p.requires_grad for p in labeller.model.parameters())


def test_reward_model_4bit_scores_close_to_float(reward_model_dir):
    prompts, a, b = random_pairs()
    full = RewardModelLabeller(str(reward_model_dir), progress=False).label(prompts, a, b)
    four = RewardModelLabeller(str(reward_model_dir), progress=False,
                               quantization={"quant_type": "nf4", "compute_dtype": "float32"}
                               ).label(prompts, a, b)
    f = torch.cat([full.scores_a, full.scores_b])
    q = torch.cat([four.scores_a, four.scores_b])
    err = (f - q).abs()
    assert err.max() > 0  # really quantized
    # nf4 keeps 16 levels per block of 64 weights, about 10% error per weight, which two
    # random layers carry to the scores. Measured: max error 0.047 on scores up to 0.34
    # (std 0.12), mean 0.010; the bounds leave about 2x room.
    assert err.max() < 0.3 * f.abs().max()
    assert err.mean() < 0.2 * f.std()
    agree = four.a_preferred == full.a_preferred
    assert agree.float().mean() >= 0.8  # measured 0.91: only near-ties flip
    margin = (full.scores_a - full.scores_b).abs()
    assert agree[margin > 2 * err.max()].all()


def test_reward_model_4bit_bad_options_are_named_before_loading():
    missing = "/no/such/reward_model"  # never read: the options fail first
    with pytest.raises(ValueError, match=r"RewardModelLabeller\.quantization\.quant_type.*nf5"):
        RewardModelLabeller(missing, quantization=QuantizationOptions(quant_type="nf5"))
    with pytest.raises(ValueError, match=r"RewardModelLabeller\.quantization\.compute_dtype"):
        RewardModelLabeller(missing, quantization={"compute_dtype": "float64"})
    with pytest.raises(ValueError, match=r"RewardModelLabeller\.quantization: unknown.*bits"):
        RewardModelLabeller(missing, quantization={"bits": 4})


def yaml_labeller(init_args):
    """A RewardModelLabeller built as LightningCLI builds it from a config."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Labeller, "labeller")
    config = {"class_path": "sail_lightning.labellers.RewardModelLabeller",
              "init_args": {"name_or_path": "/not/loaded/yet", **init_args}}
    namespace = parser.parse_object({"labeller": config})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(namespace).labeller


def test_reward_model_4bit_from_yaml():
    labeller = yaml_labeller({"torch_dtype": "bfloat16",
                              "quantization": {"quant_type": "fp4", "double_quant": False}})
    assert labeller.quantization == QuantizationOptions(quant_type="fp4", double_quant=False)
    assert yaml_labeller({}).quantization is None
    with pytest.raises(ValueError, match=r"RewardModelLabeller\.quantization\.quant_type"):
        yaml_labeller({"quantization": {"quant_type": "int4"}})


def test_reward_model_from_model_scores_as_loaded_by_path(reward_model_dir):
    by_path = RewardModelLabeller(str(reward_model_dir), batch_size=3, progress=False)
    expected = by_path.label(PROMPTS, RESP_A, RESP_B)
    labeller = RewardModelLabeller.from_model(by_path.model, by_path.tokenizer, batch_size=3,
                                              progress=False)
    assert labeller.model is by_path.model and labeller.device == torch.device("cpu")
    labels = labeller.label(PROMPTS, RESP_A, RESP_B)
    assert torch.equal(labels.scores_a, expected.scores_a)
    assert torch.equal(labels.scores_b, expected.scores_b)
    assert labeller.to("meta").device == torch.device("cpu")  # stays where the model is


# -- pairwise ranker ---------------------------------------------------------------------------


def test_ranker_by_import_path_deterministic():
    for path in ("tests.test_labellers:my_ranker", "tests.test_labellers.my_ranker"):
        labels = PairwiseRankerLabeller(path).label(PROMPTS, RESP_A, RESP_B)
        assert labels.a_preferred.tolist() == [True, False, True, True]  # p >= 0.5
        assert labels.scores_a is None and labels.scores_b is None
    labels = PairwiseRankerLabeller(bool_ranker).label(PROMPTS, RESP_A, RESP_B)
    assert labels.a_preferred.tolist() == [True, False, True, False]
    assert PairwiseRankerLabeller(my_ranker).score(PROMPTS, RESP_A) is None


def test_ranker_sampled_frequency_and_seed():
    n = 4000
    prompts, a, b = PROMPTS * (n // 4), RESP_A * (n // 4), RESP_B * (n // 4)
    ranker = PairwiseRankerLabeller("tests.test_labellers:my_ranker", sample=True, seed=1)
    wins = ranker.label(prompts, a, b).a_preferred.view(-1, 4).float().mean(0)
    assert torch.allclose(wins, torch.tensor(RANKER_P), atol=0.04)

    def draws(seed):
        lab = PairwiseRankerLabeller(my_ranker, sample=True, seed=seed)
        return [lab.label(PROMPTS, RESP_A, RESP_B).a_preferred for _ in range(5)]

    first, again, other = draws(7), draws(7), draws(8)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))


def test_ranker_output_checked():
    with pytest.raises(ValueError, match="shape"):
        PairwiseRankerLabeller(lambda p, a, b: [0.5]).label(PROMPTS, RESP_A, RESP_B)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PairwiseRankerLabeller(lambda p, a, b: [2.0] * len(p)).label(PROMPTS, RESP_A, RESP_B)


# -- callable and import paths -----------------------------------------------------------------


def test_callable_labeller_by_import_path():
    labeller = CallableLabeller("tests.test_labellers:length_score")
    labels = labeller.label(PROMPTS, RESP_A, RESP_B)
    assert labels.scores_a.tolist() == [4.0, 1.0, 8.0, 2.0]
    assert labels.scores_b.tolist() == [2.0, 2.0, 3.0, 2.0]
    assert labels.a_preferred.tolist() == [True, False, True, True]  # tie -> a
    assert labeller.score(PROMPTS, RESP_B).dtype == torch.float32
    tensor_fn = CallableLabeller(lambda p, r: torch.arange(len(r), dtype=torch.float64))
    assert tensor_fn.score(PROMPTS, RESP_A).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_bad_import_paths():
    assert resolve_callable("tests.test_labellers.length_score") is length_score
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        CallableLabeller("no_such_module_xyz:fn")
    with pytest.raises(AttributeError, match="tests.test_labellers:missing_fn"):
        CallableLabeller("tests.test_labellers:missing_fn")
    with pytest.raises(AttributeError, match="missing_fn"):
        PairwiseRankerLabeller("tests.test_labellers.missing_fn")
    with pytest.raises(TypeError, match="not callable"):
        resolve_callable("tests.test_labellers:NOT_CALLABLE")
    with pytest.raises(ValueError, match="import path"):
        resolve_callable("nodots")


# -- oracle ------------------------------------------------------------------------------------


def test_oracle_scores_and_argmax():
    task = SyntheticTask()
    oracle = OracleLabeller(sample=False)
    labels = oracle.label(PROMPTS, RESP_A, RESP_B)
    assert torch.equal(labels.scores_a, task.score(PROMPTS, RESP_A))
    assert torch.equal(labels.scores_b, task.score(PROMPTS, RESP_B))
    assert torch.equal(oracle.score(PROMPTS, RESP_B), task.score(PROMPTS, RESP_B))
    assert labels.a_preferred.tolist() == [True, False, True, True]


def test_oracle_sampled_frequency_and_seed():
    task = SyntheticTask(temperature=0.5)  # soft enough that the probabilities are not 0 or 1
    n = 4000
    prompts, a, b = PROMPTS * (n // 4), RESP_A * (n // 4), RESP_B * (n // 4)
    wins = OracleLabeller(task, seed=3).label(prompts, a, b).a_preferred
    freq = wins.view(-1, 4).float().mean(0)
    assert torch.allclose(freq, task.preference_prob(PROMPTS, RESP_A, RESP_B), atol=0.04)
    # The draws are the task's own oracle with a generator seeded alike.
    expected = task.prefer(prompts, a, b, torch.Generator().manual_seed(3))
    assert torch.equal(wins, expected)
    again = OracleLabeller(task, seed=3).label(prompts, a, b).a_preferred
    assert torch.equal(wins, again)
    assert not torch.equal(wins, OracleLabeller(task, seed=4).label(prompts, a, b).a_preferred)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"class_path": "sail_lightning.labellers.RewardModelLabeller",
         "init_args": {"name_or_path": "/not/loaded/yet", "device": "cpu",
                       "torch_dtype": "bfloat16", "batch_size": 4}},
        {"class_path": "sail_lightning.labellers.PairwiseRankerLabeller",
         "init_args": {"ranker": "tests.test_labellers:my_ranker", "sample": True, "seed": 3}},
        {"class_path": "sail_lightning.labellers.CallableLabeller",
         "init_args": {"fn": "tests.test_labellers.length_score"}},
        {"class_path": "sail_lightning.synthetic.OracleLabeller",
         "init_args": {"task": {"temperature": 0.5}, "sample": False}},
    ],
    ids=lambda c: c["class_path"].rsplit(".", 1)[-1],
)
def test_built_from_yaml_primitives(config):
    """As LightningCLI does: class_path / init_args holding strings and numbers only."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Labeller, "labeller")
    namespace = parser.parse_object({"labeller": config})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    labeller = instantiate(namespace).labeller
    assert type(labeller).__name__ == config["class_path"].rsplit(".", 1)[-1]
    if not isinstance(labeller, RewardModelLabeller):  # the others label right away
        assert labeller.label(PROMPTS, RESP_A, RESP_B).a_preferred.shape == (4,)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labeller",
    [OracleLabeller(), CallableLabeller(length_score), PairwiseRankerLabeller(my_ranker),
     RewardModelLabeller("never_loaded")],
    ids=["oracle", "callable", "ranker", "reward_model"],
)
def test_length_mismatch(labeller):
    assert isinstance(labeller, Labeller)
    with pytest.raises(ValueError, match="4 prompts, 3 responses_a, 4 responses_b"):
        labeller.label(PROMPTS, RESP_A[:3], RESP_B)
    with pytest.raises(ValueError, match="2 messages"):
        labeller.label(PROMPTS, RESP_A, RESP_B, messages=[[("user", "x")]] * 2)
    with pytest.raises(TypeError, match="single string"):
        labeller.label("d a c b =", RESP_A, RESP_B)
    if not isinstance(labeller, PairwiseRankerLabeller):  # the ranker has no scores
        # Checked before anything is loaded: the reward model here does not exist.
        with pytest.raises(ValueError, match="4 prompts, 3 responses"):
            labeller.score(PROMPTS, RESP_A[:3])


def test_labels_defaults():
    labels = Labels(torch.tensor([True]))
    assert labels.scores_a is None and labels.scores_b is None


def test_reseed_restarts_the_random_draws():
    prompts, a, b = random_pairs(200)
    oracle = OracleLabeller(seed=1)
    first = oracle.label(prompts, a, b).a_preferred
    oracle.label(prompts, a, b)  # advance the stream
    oracle.reseed(1)
    assert torch.equal(oracle.label(prompts, a, b).a_preferred, first)


# -- the policy's own labels (SAIL-PP) ---------------------------------------------------------


def test_pp_labels_are_the_policys_own_bradley_terry_draws():
    from sail_lightning.data.tokenize import TokenizedPair
    from sail_lightning.labellers import PolicyLabeller
    from tests.helpers import datamodule, module

    m, dm = module(beta=1.0), datamodule(num_synthetic_pairs=120, val_fraction=0.1)
    prompts = [p.prompt_ids for p in dm.train_pairs[:40]]
    samples = [[p.chosen_ids, p.rejected_ids] for p in dm.train_pairs[:40]]

    def label(seed, bs):
        return PolicyLabeller(m.pair, 1.0, seed=seed, batch_size=bs).label_ids(
            prompts, [s[0] for s in samples], [s[1] for s in samples]).a_preferred

    labels = label(5, 16)
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in dm.train_pairs[:40]]
    pol, ref = m.pair.pair_logprobs(pairs)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    expected = torch.bernoulli(torch.sigmoid(1.0 * h.double()),
                               generator=torch.Generator().manual_seed(5)).bool()
    assert torch.equal(labels, expected)
    assert torch.equal(labels, label(5, 7))
    # The same labeller on text: tokenized like the DataModule, same draws.
    records = dm.train_records[:40]
    text = PolicyLabeller(m.pair, 1.0, dm.tokenizer, seed=5).label(
        [r.prompt for r in records], [r.chosen for r in records], [r.rejected for r in records])
    assert torch.equal(text.a_preferred, labels)


# -- cost models (lower is better) -------------------------------------------------------------


def test_cost_models_choose_the_lower_cost_and_report_negated_costs(reward_model_dir):
    cost = CallableLabeller("tests.test_labellers:length_score", lower_is_better=True)
    labels = cost.label(PROMPTS, RESP_A, RESP_B)
    assert labels.scores_a.tolist() == [-4.0, -1.0, -8.0, -2.0]  # lengths 4, 1, 8, 2
    assert labels.scores_b.tolist() == [-2.0, -2.0, -3.0, -2.0]
    assert labels.a_preferred.tolist() == [False, True, False, True]  # the shorter; tie -> a
    plain = RewardModelLabeller(str(reward_model_dir), batch_size=3, progress=False)
    costly = RewardModelLabeller(str(reward_model_dir), batch_size=3, progress=False,
                                 lower_is_better=True)
    a, b = plain.label(PROMPTS, RESP_A, RESP_B), costly.label(PROMPTS, RESP_A, RESP_B)
    assert torch.equal(b.scores_a, -a.scores_a) and torch.equal(b.scores_b, -a.scores_b)
    differ = a.scores_a != a.scores_b
    assert torch.equal(b.a_preferred[differ], ~a.a_preferred[differ])
