"""Method comparison on the synthetic task (``benchmarks/compare_methods.py`` drives it).

Importable from notebooks::

    from benchmarks.experiments import compare
    results = compare(["dpo", "sail_pr"], seeds=[0], quick=True, work_dir="runs/cmp")
"""

from benchmarks.experiments.base import (
    reward_model_agreement,
    sample_offline_pairs,
    train_base_policy,
    train_reward_model,
)
from benchmarks.experiments.compare import FULL, QUICK, Budget, compare
from benchmarks.experiments.report import markdown_table, mean_ci
from benchmarks.experiments.runs import METHODS, evaluate_policy, run_method

__all__ = [
    "FULL", "METHODS", "QUICK", "Budget", "compare",
    "evaluate_policy", "markdown_table", "mean_ci", "reward_model_agreement", "run_method",
    "sample_offline_pairs", "train_base_policy", "train_reward_model",
]
