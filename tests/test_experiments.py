"""benchmarks.experiments: the comparison's fixed starting point and its statistics.

The base policy is imperfect but better than random, the learned reward model agrees with
the oracle more than chance, and the win-rate / confidence-interval helpers give hand values.
"""

import math

import pytest
import torch

from benchmarks.experiments import (
    METHODS,
    markdown_table,
    mean_ci,
    reward_model_agreement,
    sample_offline_pairs,
    train_base_policy,
    train_reward_model,
)
from benchmarks.experiments.base import fresh_causal_lm, greedy_reward, load_policy, read_pairs
from benchmarks.experiments.report import t_quantile_975
from benchmarks.experiments.runs import budget_args, cli_args, write_overlay
from sail_lightning.common import win_rate
from sail_lightning.synthetic import SyntheticTask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("experiments")
    base = train_base_policy(str(d / "base"), steps=80, max_noise=0.5, seed=0)
    offline = sample_offline_pairs(str(d / "base"), str(d / "offline.jsonl"), 1536, seed=1)
    held = sample_offline_pairs(str(d / "base"), str(d / "held.jsonl"), 256, seed=2)
    rm = train_reward_model(str(d / "offline.jsonl"), str(d / "rm"), epochs=4, seed=0)
    return {"dir": d, "base": base, "offline": offline, "held": held, "rm": rm}


def test_base_policy_is_imperfect_but_better_than_random(setup):
    task = SyntheticTask()
    prompts = task.sample_prompts(256, seed=123)
    model, tok = load_policy(setup["base"]["path"])
    _, trained = greedy_reward(model, tok, prompts, task)
    _, random_init = greedy_reward(fresh_causal_lm(tok, seed=0).eval(), tok, prompts, task)
    assert float(random_init.mean()) < float(trained.mean()) < 1.0
    assert float(trained.mean()) < 0.9  # room left to improve
    assert win_rate(trained, random_init) > 0.8


def test_offline_pairs_are_distinct_oracle_labelled_base_samples(setup):
    rows = read_pairs(setup["offline"]["path"])
    assert len(rows) == 1536
    assert all(r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"] for r in rows)
    # The Bradley-Terry draws mostly, not always, prefer the higher true reward.
    assert 0.7 < setup["offline"]["label_agreement"] < 1.0


def test_reward_model_agrees_with_oracle_more_than_chance(setup):
    agreement = reward_model_agreement(setup["rm"]["path"], read_pairs(setup["held"]["path"]))
    assert agreement["vs_true_reward"] > 0.58
    assert agreement["vs_labels"] > 0.55


def test_mean_ci_on_hand_values():
    # mean 2, sample sd 1, n 3: half-width t_{0.975,2} / sqrt(3) = 4.303 / 1.7320508
    stat = mean_ci([1.0, 2.0, 3.0])
    assert stat["mean"] == pytest.approx(2.0)
    assert stat["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert stat["n"] == 3
    assert mean_ci([0.4])["ci95"] is None
    assert mean_ci([])["mean"] is None
    two = mean_ci([0.0, 1.0])  # sd sqrt(0.5), t_{0.975,1} = 12.706
    assert two["ci95"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert t_quantile_975(4) == 2.776
    assert t_quantile_975(22) == 2.086  # between entries: the smaller df (wider interval)
    assert t_quantile_975(1000) == 1.96
    table = markdown_table({"dpo": {"win_rate": stat, "true_reward": mean_ci([0.5]),
                                    "wall_seconds": mean_ci([10.0, 12.0])}}, {"dpo": "DPO"})
    assert "| DPO | 2.000 ± 2.484 | 0.500 | 11.0 ± 12.7 | 3 |" in table


def test_budget_gives_every_method_the_same_pairs_per_epoch():
    assert budget_args("dpo", 1000) == ["--data.limit=1000"]
    assert budget_args("sail_pr", 1000) == ["--data.limit=700"]  # 700 / (1 - 0.3) = 1000
    assert budget_args("sail_pp", 1000) == ["--data.limit=700"]
    assert budget_args("sail_dp", 1000) == ["--data.limit=600"]  # 600 / (1 - 0.4) = 1000
    assert budget_args("online_dpo", 1000) == ["--data.limit=1000", "--data.online_pairs=1000"]
    assert set(METHODS) >= {"dpo", "iterative_dpo", "online_dpo", "sail_dp", "sail_pp",
                            "sail_pr", "sail_pr_released", "selm", "xpo", "spin", "sppo"}


def test_overrides_land_in_the_cli_config(tmp_path, capsys):
    from sail_lightning.cli import main

    overlay = write_overlay("sail_pr", str(tmp_path / "overlay.yaml"), rm_dir="/rm",
                            policy_out=str(tmp_path / "policy"), run_dir=str(tmp_path),
                            seed=7, epochs=2)
    args = cli_args("sail_pr_released", base_dir="/base", offline_path="/data/x.jsonl",
                    overlay=overlay, pairs_per_epoch=100)
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    out = capsys.readouterr().out
    for expected in ("model_name_or_path: /base", "tokenizer: /base", "source: /data/x.jsonl",
                     "name_or_path: /rm", "response_term: released_code", "limit: 70",
                     "seed_everything: 7", "label_seed: 7", "max_epochs: 2",
                     "sail_lightning.export.ExportPolicyCallback",
                     f"dirpath: {tmp_path / 'policy'}",
                     "enable_progress_bar: false"):
        assert expected in out, expected
    assert "EvaluationCallback" not in out  # the overlay replaces the callback list
    assert "model_config: null" in out


def test_compare_methods_script_reports_every_label_source(tmp_path, capsys):
    # The script's --quick mode on a tinier budget: one labelled and one label-free method,
    # two label sources, one epoch of 32 pairs.
    import json

    from benchmarks.compare_methods import main

    main(["--quick", "--methods", "dpo", "online_dpo", "--labels", "oracle", "rm_small",
          "--no-ablations", "--pairs-per-epoch", "32", "--epochs", "1", "--offline-pairs", "128",
          "--eval-prompts", "32", "--work-dir", str(tmp_path / "work"),
          "--results-dir", str(tmp_path / "results")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["win_rate_by_label"]) == {"oracle", "rm_small"}
    assert set(last["win_rate_by_label"]["oracle"]) == {"dpo", "online_dpo"}
    assert set(last["win_rate"]) == {"dpo", "online_dpo"}  # the default source's
    # The oracle's Bradley-Terry draws agree with the true reward far more than a reward
    # model trained on 16 pairs, a fifth of them flipped.
    assert last["label_agreement"]["oracle"] > 0.8 > last["label_agreement"]["rm_small"]
    # DPO uses no labeller: the same runs under both sources.
    by_label = last["win_rate_by_label"]
    assert by_label["oracle"]["dpo"] == by_label["rm_small"]["dpo"]
    saved = json.loads((tmp_path / "results" / "compare_methods_quick.json").read_text())
    rounds = saved["by_label"]["oracle"]["per_seed"]["online_dpo"][0]["rounds"]
    assert len(rounds) == 1 and 0.0 <= rounds[0]["label_agreement"] <= 1.0
    for name in ("compare_methods_quick.md", "compare_methods_quick_by_label.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0


@pytest.mark.parametrize("task", ["synthetic", "instructions"])
def test_quick_and_full_studies_keep_their_runs_in_different_folders(task, monkeypatch):
    """A ``--quick`` call with no ``--work-dir`` must not share the full study's folder: its
    setup (another budget's key) would overwrite the full study's offline pairs and reward
    models, on which the full study's cached runs were trained."""
    import benchmarks.compare_methods as script

    seen = []

    def record(methods, seeds, quick, work_dir, **kwargs):
        seen.append(work_dir)
        raise StopIteration

    monkeypatch.setattr(script, "compare", record)
    for extra in ([], ["--quick"]):
        with pytest.raises(StopIteration):
            script.main(["--task", task, *extra])
    assert len(set(seen)) == 2, seen
