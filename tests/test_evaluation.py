"""Evaluation: win rates, eval reward and KL against independent computations."""

import csv

import pytest
import torch

from sail_lightning.cli import main
from sail_lightning.evaluation import EvaluationCallback, win_rate
from sail_lightning.generation import SamplingOptions, decode, generate_responses
from sail_lightning.synthetic import SyntheticTask
from tests.conftest import CONFIGS
from tests.helpers import datamodule, module


def test_win_rate_counts_ties_half():
    a, b = torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 5.0, 3.0])
    assert win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    a = torch.tensor([1.0, 0.5, 0.2, 0.0])
    b = torch.tensor([0.0, 0.5, 0.3, 0.0])
    assert win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert win_rate(b, a) == pytest.approx(1 - win_rate(a, b))


@pytest.fixture(scope="module")
def setup():
    return datamodule(num_synthetic_pairs=200, val_fraction=0.2), module()


def test_at_init_policy_ties_reference_and_kl_is_zero(setup):
    dm, m = setup
    metrics = EvaluationCallback(num_prompts=30, max_new_tokens=8).evaluate(dm, m.pair)
    assert metrics["val/win_rate_vs_ref"] == 0.5  # identical greedy responses: all ties
    assert abs(metrics["val/kl"]) < 1e-6
    # Eval reward: the true reward of the greedy responses, computed independently.
    tok = dm.tokenizer
    greedy = generate_responses(m.pair.policy, [p.prompt_ids for p in dm.val_pairs[:30]],
                                SamplingOptions(num_samples=1, greedy=True, max_new_tokens=8),
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                seed=0, progress=False)
    prompts = [r.prompt for r in dm.val_records[:30]]
    scores = SyntheticTask().score(prompts, [decode(tok, g[0]) for g in greedy])
    assert metrics["val/eval_reward"] == pytest.approx(float(scores.mean()), abs=1e-6)
    chosen = SyntheticTask().score(prompts, [r.chosen for r in dm.val_records[:30]])
    assert metrics["val/win_rate_vs_chosen"] == pytest.approx(win_rate(scores, chosen))
    assert metrics["val/mean_length"] == pytest.approx(sum(len(g[0]) for g in greedy) / 30)


def test_kl_is_positive_once_the_policy_moves(setup):
    dm, m = setup
    with torch.no_grad():
        for p in m.pair.policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    metrics = EvaluationCallback(num_prompts=30, max_new_tokens=8).evaluate(dm, m.pair)
    assert metrics["val/kl"] > 0.01


def test_validate_command_reports_the_evaluation(tmp_path):
    out = [f"--trainer.default_root_dir={tmp_path}",
           "--trainer.enable_progress_bar=false", "--data.num_synthetic_pairs=200"]
    main(["fit", "-c", str(CONFIGS / "quickstart.yaml"), *out, "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["validate", "-c", str(CONFIGS / "quickstart.yaml"), *out, f"--ckpt_path={ckpt}"])
    (path,) = sorted(tmp_path.glob("*/version_*/metrics.csv"))[-1:]
    rows = list(csv.DictReader(path.open()))
    keys = {k for r in rows for k, v in r.items() if v}
    for key in ("val/eval_reward", "val/win_rate_vs_ref", "val/win_rate_vs_chosen", "val/kl",
                "val/mean_length", "val/rewards/accuracies", "val/rewards/margins"):
        assert key in keys, key


def test_a_pairwise_judge_gives_the_win_rate_against_chosen(judge_url):
    """A JudgeLabeller behind the OpenAI chat-completions protocol (the scripted judge on
    127.0.0.1 prefers the response with more words) judges an SFT policy, which has no
    reference: the win rate and the tokens are recomputed here from the same texts."""
    from sail_lightning.labellers import JudgeLabeller
    from sail_lightning.labellers.judge import DEFAULT_TEMPLATE, render_prompt

    dm, m = datamodule(num_synthetic_pairs=200, val_fraction=0.2), module(loss_type="sft")
    judge = JudgeLabeller("scripted", base_url=judge_url, require_api_key=False, timeout=10,
                          max_retries=0)
    judge.compare(["warm-up"], ["a b"], ["a"])  # counters the evaluation must not report
    metrics = EvaluationCallback(judge=judge, num_prompts=12, max_new_tokens=8).evaluate(dm,
                                                                                      m.pair)
    tok, records = dm.tokenizer, dm.val_records[:12]
    greedy = generate_responses(m.pair.policy, [p.prompt_ids for p in dm.val_pairs[:12]],
                                SamplingOptions(num_samples=1, greedy=True, max_new_tokens=8),
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                seed=0, progress=False)
    ours = [decode(tok, g[0]) for g in greedy]
    words = [(len(a.split()), len(r.chosen.split())) for a, r in zip(ours, records, strict=True)]
    outcome = [1.0 if a > c else 0.0 if a < c else 0.5 for a, c in words]
    assert metrics["val/judge_win_rate"] == pytest.approx(sum(outcome) / 12)
    assert metrics["val/judge_ties"] == pytest.approx(outcome.count(0.5) / 12)
    shown = [(render_prompt(r.prompt, r.messages), a, r.chosen)
             for a, r in zip(ours, records, strict=True)]
    prompt_words = sum(len(DEFAULT_TEMPLATE.format(prompt=p, response_a=x, response_b=y).split())
                       + len(DEFAULT_TEMPLATE.format(prompt=p, response_a=y, response_b=x).split())
                       for p, x, y in shown)
    assert metrics["gen/judge_requests"] == 24  # both orders
    assert metrics["gen/judge_prompt_tokens"] == prompt_words  # the server counts words
    assert metrics["gen/judge_tokens"] == (metrics["gen/judge_prompt_tokens"]
                                           + metrics["gen/judge_completion_tokens"])
    assert metrics["gen/judge_unparsed"] == 0
    assert "val/kl" not in metrics and "val/win_rate_vs_ref" not in metrics  # no reference
    assert len(set(outcome)) > 1  # wins and losses: the outcome is not a constant


def test_the_judge_from_yaml_logs_its_win_rate_and_tokens(judge_url, tmp_path):
    """EvaluationCallback's judge named in YAML, as docs/real_text.md shows it."""
    import yaml

    judge = {"class_path": "sail_lightning.labellers.JudgeLabeller",
             "init_args": {"model": "scripted", "base_url": judge_url, "require_api_key": False,
                           "max_retries": 0, "timeout": 10}}
    overlay = tmp_path / "judge.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "sail_lightning.evaluation.EvaluationCallback",
        "init_args": {"num_prompts": 6, "max_new_tokens": 6, "judge": judge}}]}}))
    main(["fit", "-c", str(CONFIGS / "quickstart.yaml"), "-c", str(CONFIGS / "method" / "sft.yaml"),
          "-c", str(overlay), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--data.num_synthetic_pairs=200"])
    (path,) = tmp_path.glob("sft/version_0/metrics.csv")
    (row,) = [r for r in csv.DictReader(path.open()) if r.get("val/judge_win_rate")]
    assert 0.0 <= float(row["val/judge_win_rate"]) <= 1.0
    assert float(row["gen/judge_requests"]) == 12 and float(row["gen/judge_tokens"]) > 0
