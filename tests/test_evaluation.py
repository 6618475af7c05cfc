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
