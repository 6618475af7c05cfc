"""build_models: BPE tokenizers, a policy and a reward model built offline from real text."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from sail_lightning.build_models import ModelSpec, main, model_config
from sail_lightning.data import samples
from sail_lightning.data.records import read_preference_records
from sail_lightning.data.tokenize import encode_prompts, encode_responses, unk_rate
from tests.conftest import SHARED_DATA, needs_shared

# Small and quick: trained on 120 of the packaged UltraFeedback pairs, with a reward model
# trained for 80 steps on inputs of 64 tokens.
ARGS = ["--limit", "120", "--vocab-size", "1024", "--max-positions", "256",
        "--reward-vocab-size", "768", "--reward-max-positions", "256", "--train-reward",
        "--reward-steps", "80", "--reward-max-length", "64"]


def build(path: Path, *extra: str) -> Path:
    assert main(["--output", str(path), *ARGS, *extra]) == 0
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("built"), "--seed", "3")


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "build.json"}


def held_out_texts() -> list[str]:
    """Real text the tokenizers were not trained on: the HH sample's dialogues."""
    records, _ = read_preference_records(samples.path("hh-rlhf"))
    return [t for r in records for t in (r.prompt, r.chosen, r.rejected)]


def check_round_trip(tokenizer, texts: list[str]) -> None:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(x) for x in ids] == texts
    assert unk_rate(tokenizer, texts) == 0.0
    # Learned merges: half a token per character or less (bytes alone would be >= 1).
    assert sum(map(len, ids)) / sum(map(len, texts)) < 0.5


@pytest.mark.parametrize("model", ["policy", "reward"])
def test_tokenizers_round_trip_unseen_real_text(built, model):
    check_round_trip(AutoTokenizer.from_pretrained(built / model), held_out_texts())


@needs_shared
def test_tokenizer_round_trips_ultrafeedback_it_was_not_trained_on(built):
    with gzip.open(SHARED_DATA / "ultrafeedback-binarized" / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f][200:]  # the sample holds the first 200
    assert len(rows) == 800
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected") if r[k]]
    check_round_trip(AutoTokenizer.from_pretrained(built / "policy"), texts)


def test_chat_templates_render_and_match_the_training_encoding(built):
    policy = AutoTokenizer.from_pretrained(built / "policy")
    reward = AutoTokenizer.from_pretrained(built / "reward")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert policy.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert reward.apply_chat_template(chat + [{"role": "assistant", "content": " Hello."}],
                                      tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")
    for tok, specials in ((policy, ["<|im_start|>", "<|im_end|>"]),
                          (reward, ["<|start_header_id|>", "<|eot_id|>"])):
        assert [len(tok(s, add_special_tokens=False)["input_ids"]) for s in specials] == [1, 1]
        assert tok.pad_token_id is not None and tok.bos_token_id is not None
    # Prompt (with generation prompt) + response + eos, as data/tokenize.py encodes a pair,
    # is the rendered conversation: eos closes the assistant turn.
    records, _ = read_preference_records(samples.path("ultrafeedback"), limit=20)
    prompts = encode_prompts(policy, records, 10_000)
    responses = encode_responses(policy, [r.chosen for r in records], 10_000)
    for record, p, r in zip(records, prompts, responses, strict=True):
        full = policy.apply_chat_template(
            [{"role": "user", "content": record.prompt},
             {"role": "assistant", "content": record.chosen}], tokenize=False)
        assert p + r == policy(full.removesuffix("\n"), add_special_tokens=False)["input_ids"]


def test_models_load_back_by_path_and_vocabularies_differ(built):
    policy_tok = AutoTokenizer.from_pretrained(built / "policy")
    reward_tok = AutoTokenizer.from_pretrained(built / "reward")
    policy = AutoModelForCausalLM.from_pretrained(built / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(built / "reward")
    assert type(policy).__name__ == "LlamaForCausalLM"
    assert type(reward).__name__ == "LlamaForSequenceClassification"
    assert (policy.config.vocab_size, reward.config.vocab_size) == (1024, 768)
    assert (len(policy_tok), len(reward_tok)) == (1024, 768)
    assert reward.config.num_labels == 1
    for model, tok in ((policy, policy_tok), (reward, reward_tok)):
        assert model.config.pad_token_id == tok.pad_token_id
        assert model.config.eos_token_id == tok.eos_token_id
    text = "How do I cook rice?"
    assert policy_tok(text)["input_ids"] != reward_tok(text)["input_ids"]
    ids = policy_tok(text, return_tensors="pt")["input_ids"]
    assert policy(ids).logits.shape == (1, ids.shape[1], 1024)
    summary = json.loads((built / "build.json").read_text())
    assert summary["records"] == 120 and summary["seed"] == 3
    assert summary["reward"]["chat_format"] == "llama3"


def test_trained_reward_model_ranks_its_pairs_through_the_labeller(built):
    from sail_lightning.labellers import RewardModelLabeller

    training = json.loads((built / "build.json").read_text())["reward"]["training"]
    assert training["last_loss"] < training["first_loss"] - 0.1
    assert training["train_accuracy"] > max(0.75, training["train_accuracy_before"] + 0.15)
    # Scored the way online training scores (labellers.RewardModelLabeller, by path):
    # the labeller's encoding is the one the model was trained on. Held-out accuracy
    # stays near chance with so few pairs, so these are mostly its training pairs.
    records, _ = read_preference_records(samples.path("ultrafeedback"), limit=120)
    labeller = RewardModelLabeller(str(built / "reward"), max_length=64, progress=False)
    messages = [r.messages for r in records]
    prompts = [r.prompt for r in records]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as build_models: a tiny model on a busy machine
    try:
        chosen = labeller.score(prompts, [r.chosen for r in records], messages=messages)
        rejected = labeller.score(prompts, [r.rejected for r in records], messages=messages)
    finally:
        torch.set_num_threads(threads)
    accuracy = (chosen > rejected).float().mean()
    assert accuracy > 0.7, (accuracy, training)


def test_same_seed_same_files_other_seed_other_weights(built, tmp_path):
    again = build(tmp_path / "again", "--seed", "3")
    assert files(again) == files(built)
    other = files(build(tmp_path / "other", "--seed", "4", "--no-reward"))
    assert other["policy/tokenizer.json"] == files(built)["policy/tokenizer.json"]
    assert other["policy/model.safetensors"] != files(built)["policy/model.safetensors"]
    assert not (tmp_path / "other" / "reward").exists()


def test_qwen2_from_hh_sample_and_help(tmp_path, capsys):
    out = build(tmp_path, "--arch", "qwen2", "--chat-format", "zephyr", "--source", "hh-rlhf",
                "--no-reward")
    model = AutoModelForCausalLM.from_pretrained(out / "policy")
    tok = AutoTokenizer.from_pretrained(out / "policy")
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.eos_token == "</s>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--arch {llama,qwen2}", "--reward-vocab-size", "--train-reward", "--source"):
        assert option in help_text


def test_bad_options_fail_with_the_option_named():
    with pytest.raises(ValueError, match="hidden_size 60 is not divisible by num_heads 8"):
        model_config(None, ModelSpec(hidden_size=60, num_heads=8))
    with pytest.raises(ValueError, match="arch must be one of"):
        model_config(None, ModelSpec(arch="gpt2"))
    with pytest.raises(SystemExit):  # argparse names the option and its choices
        main(["--output", "x", "--reward-chat-format", "alpaca"])


def test_dtype_without_from_gguf_is_refused_naming_both(tmp_path, capsys):
    # Not silently ignored: the small models are float32 whatever --dtype says.
    with pytest.raises(SystemExit) as exit_:
        main(["--output", str(tmp_path / "models"), "--dtype", "bfloat16", "--limit", "40"])
    assert exit_.value.code == 2
    assert "--dtype bfloat16 applies to --from-gguf SOURCE only" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_build_models_is_a_cli_subcommand(tmp_path, capsys):
    from sail_lightning.cli import main as cli

    with pytest.raises(SystemExit) as exit_:
        cli(["build-models", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: sail-lightning build-models" in text and "--train-reward" in text
    cli(["build-models", "--output", str(tmp_path), "--limit", "40", "--vocab-size", "512",
         "--max-positions", "128", "--no-reward"])
    assert "policy:" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "policy").config.vocab_size == len(
        AutoTokenizer.from_pretrained(tmp_path / "policy"))
    assert not (tmp_path / "reward").exists()
