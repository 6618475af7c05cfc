"""``benchmarks/compare_methods.py --task instructions``: the method comparison on a real
model's code path (configs/smollm2.yaml, LoRA, the instructions task's exact reward), run
here on a model converted from a tiny GGUF file; ``-m slow`` runs ``--quick`` on
SmolLM2-135M-Instruct itself."""

import json
import time

import pytest
import torch

from benchmarks.experiments.labels import label_agreement
from benchmarks.experiments.report import bootstrap_ci
from benchmarks.experiments.tasks import TASKS, load_policy
from tests.test_gguf import converted, texts, written  # noqa: F401  (module fixtures)


def run_script(tmp_path, capsys, *args):
    from benchmarks.compare_methods import main

    main(["--task", "instructions", "--work-dir", str(tmp_path / "work"),
          "--results-dir", str(tmp_path / "results"), *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_instructions_comparison_runs_every_route_on_a_converted_model(
        tmp_path, capsys, converted):  # noqa: F811
    last = run_script(tmp_path, capsys, "--quick", "--model-dir", str(converted),
                      "--methods", "dpo", "online_dpo", "sail_pr", "--labels", "oracle", "rm",
                      "--pairs-per-epoch", "4", "--offline-pairs", "8", "--eval-prompts", "8",
                      "--threads", "1")
    assert last["task"] == "instructions" and last["seeds"] == [0]
    assert set(last["win_rate_by_label"]) == {"oracle", "rm"}
    assert set(last["win_rate_by_label"]["rm"]) == {"dpo", "online_dpo", "sail_pr"}
    # The default ablation (SAIL-PR without its response term) runs at the default source.
    assert set(last["win_rate"]) == {"dpo", "online_dpo", "sail_pr", "sail_pr_g0"}
    for rates in (last["constraint_rate"], *last["constraint_rate_by_label"].values()):
        assert all(0.0 <= v <= 1.0 for v in rates.values())
    assert 0.0 <= last["base_constraint_rate"] <= 1.0
    # DPO reads no labeller: one run under both sources.
    assert last["win_rate_by_label"]["oracle"]["dpo"] == last["win_rate_by_label"]["rm"]["dpo"]
    assert set(last["label_agreement"]) == {"oracle", "rm"}
    saved = json.loads((tmp_path / "results" / "compare_instructions_quick.json").read_text())
    setup = saved["setup"]
    # Offline pairs: the base's own samples, labelled by the task's oracle; the reward model
    # is the base's backbone with a score head (its trainable top layers counted).
    offline = [json.loads(x) for x in open(setup["offline"]["path"])]
    assert len(offline) == 8 and all(r["chosen"] != r["rejected"] for r in offline)
    task = TASKS["instructions"].task
    assert set(r["prompt"] for r in offline) <= set(task.train_prompts)
    held = [json.loads(x) for x in open(setup["heldout"]["path"])]
    assert not set(r["prompt"] for r in held) & set(task.heldout_prompts[:8] + task.train_prompts)
    assert setup["labels"]["rm"]["trainable_layers"] == 4
    # Every run trained LoRA on the config and exported its adapter alone.
    rows = saved["by_label"]["oracle"]["per_seed"]["online_dpo"]
    assert rows[0]["policy_dir"].endswith("policy")
    assert (tmp_path / "work" / "oracle" / "runs" / "online_dpo" / "seed0" / "policy"
            / "adapter_config.json").exists()
    assert len(rows[0]["rounds"]) == 1 and rows[0]["rounds"][0]["pairs"] == 4
    # One seed: the intervals are bootstrap intervals over the prompts, and say so.
    stat = saved["summary"]["sail_pr"]["win_rate"]
    assert stat["interval"] == "bootstrap" and stat["ci95"] is not None
    report = (tmp_path / "results" / "compare_instructions_quick.md").read_text()
    assert "bootstrap" in report and "constraints met" in report
    for name in ("compare_instructions_quick.png", "compare_instructions_quick_by_label.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    # A second call reuses every run (nothing trained again).
    again = run_script(tmp_path, capsys, "--quick", "--model-dir", str(converted),
                       "--methods", "dpo", "online_dpo", "sail_pr", "--labels", "oracle",
                       "rm", "--pairs-per-epoch", "4", "--offline-pairs", "8",
                       "--eval-prompts", "8", "--threads", "1", "--cached-only")
    assert again["win_rate_by_label"] == last["win_rate_by_label"]


def test_a_policy_exported_as_an_adapter_loads_merged(tmp_path, converted):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(converted)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(converted).save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = lora(ids).logits
        model, _ = load_policy(str(tmp_path / "adapter"))
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(converted)(ids).logits,
                                  expected, atol=1e-3)


def test_the_labellers_agreement_counts_pairs_whose_true_rewards_differ():
    from sail_lightning.instructions import InstructionsOracle

    task = TASKS["instructions"].task
    prompt = "Name a colour.\n\nDo not use any commas in your response."
    pairs = [{"prompt": prompt, "chosen": "blue is a colour that many people like a lot",
              "rejected": "blue, green, red, and a few other colours people like"},
             {"prompt": prompt, "chosen": "same words here", "rejected": "same words here"}]
    assert task.score([prompt], [pairs[0]["chosen"]]) > task.score([prompt], [pairs[0]["rejected"]])
    # The argmax oracle orders the one informative pair as the true reward; the tie is left out.
    agreement = label_agreement(InstructionsOracle(sample=False), pairs, TASKS["instructions"])
    assert agreement == 1.0


def test_bootstrap_interval_on_hand_values():
    assert bootstrap_ci([0.5, 0.5, 0.5]) == 0.0
    half = bootstrap_ci([0.0, 1.0] * 200)  # a mean of 0.5 over 400 coin flips: se 0.025
    assert 0.04 < half < 0.06


@pytest.mark.slow
def test_quick_on_smollm2_finishes_within_ten_minutes(tmp_path, capsys):
    pytest.importorskip("gguf")
    start = time.perf_counter()
    last = run_script(tmp_path, capsys, "--quick")
    assert time.perf_counter() - start < 600
    assert set(last["win_rate_by_label"]["oracle"]) == {"dpo", "online_dpo", "sail_pr"}
    assert 0.0 <= last["base_constraint_rate"] <= 1.0
