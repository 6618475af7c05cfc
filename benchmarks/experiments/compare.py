"""``compare()``: every method from one base policy, at one budget of training pairs."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.experiments.base import (
    greedy_reward,
    load_policy,
    read_pairs,
    reward_model_agreement,
    sample_offline_pairs,
    train_base_policy,
    train_reward_model,
)
from benchmarks.experiments.report import mean_ci
from benchmarks.experiments.runs import METHODS, evaluate_policy, quiet, run_method
from sail_lightning.synthetic import SyntheticTask


@dataclass(frozen=True)
class Budget:
    """Sizes of one comparison.

    Attributes:
        pairs_per_epoch: training pairs per epoch, the same for every method (see
            ``runs.budget_args``).
        offline_pairs: pairs in the offline file (>= ``pairs_per_epoch``); the reward model
            trains on all of them, each method reads the first ones it needs.
        epochs: epochs (= online rounds) per method; total pairs = the product.
        sft_steps: SFT batches (of 64) of the base policy.
        sft_noise: demonstrations are corrupted at a level drawn from ``U(0, sft_noise)``.
        rm_epochs: reward-model epochs over the offline pairs.
        lr: peak learning rate of every method (``model.lr``; None keeps the quickstart's
            1e-3, which is meant for a random-init model and degrades the SFT base here).
        eval_prompts: held-out prompts for the win rate and the true reward.
        rm_heldout_pairs: held-out oracle-labelled pairs to measure the reward model on.
    """

    pairs_per_epoch: int = 2048
    epochs: int = 3
    offline_pairs: int = 4096
    sft_steps: int = 80
    sft_noise: float = 0.5
    rm_epochs: int = 6
    lr: float | None = 1e-4
    eval_prompts: int = 512
    rm_heldout_pairs: int = 512

    @property
    def total_pairs(self) -> int:
        return self.pairs_per_epoch * self.epochs


FULL = Budget()
QUICK = Budget(pairs_per_epoch=256, epochs=2, offline_pairs=2048, rm_epochs=5,
               eval_prompts=256, rm_heldout_pairs=256)
EVAL_SEED = 424_242  # held-out prompts: another stream than training / offline prompts


def prepare(work_dir: str, budget: Budget, *, seed: int = 0, log=print) -> dict:
    """Base policy, offline pairs and reward model, shared by every method and seed."""
    task = SyntheticTask()
    base_dir = os.path.join(work_dir, "base_policy")
    rm_dir = os.path.join(work_dir, "reward_model")
    offline = os.path.join(work_dir, "offline_pairs.jsonl")
    heldout = os.path.join(work_dir, "heldout_pairs.jsonl")
    base = train_base_policy(base_dir, steps=budget.sft_steps, max_noise=budget.sft_noise,
                             seed=seed, task=task)
    log(f"base policy: {budget.sft_steps} SFT steps in {base['seconds']:.1f}s, "
        f"greedy true reward {base['true_reward']:.3f}")
    data = sample_offline_pairs(base_dir, offline, max(budget.offline_pairs,
                                                          budget.pairs_per_epoch), seed=seed + 1,
                                task=task)
    held = sample_offline_pairs(base_dir, heldout, budget.rm_heldout_pairs, seed=seed + 2,
                                task=task)
    log(f"offline pairs: {data['pairs']} (oracle labels agree with r* on "
        f"{data['label_agreement']:.3f})")
    rm = train_reward_model(offline, rm_dir, epochs=budget.rm_epochs, seed=seed, task=task)
    rm["heldout_agreement"] = reward_model_agreement(rm_dir, read_pairs(heldout), task)
    log(f"reward model: {rm['seconds']:.1f}s, train accuracy {rm['train_accuracy']:.3f}, "
        f"held-out agreement with oracle labels {rm['heldout_agreement']['vs_labels']:.3f}, "
        f"with r* order {rm['heldout_agreement']['vs_true_reward']:.3f}")
    return {"base": base, "offline": data, "heldout": held, "reward_model": rm}


def compare(methods: list[str] | None = None, seeds: list[int] | None = None,
            quick: bool = False, work_dir: str = "runs/compare_methods", *,
            budget: Budget | None = None, threads: int | None = 1, log=print) -> dict:
    """Trains every method from one base policy for each seed and evaluates it.

    The base policy, offline data and reward model are built once (seed 0) and shared, so
    the seeds vary the method runs (``seed_everything``, ``data.seed``, the callback's and the
    labels' seeds), not the starting point. Evaluation: greedy responses on held-out prompts,
    scored by the true reward; win rate against the base policy's greedy responses.

    Args:
        methods: keys of ``runs.METHODS`` (default: all).
        seeds: default ``[0]`` with ``quick``, else ``[0, 1, 2]``.
        quick: the small ``QUICK`` budget.
        work_dir: models, data, overlays and logs go here.
        budget: overrides the budget that ``quick`` selects.
        threads: ``torch.set_num_threads`` (1 is the robust choice on a shared 2-core box).

    Returns:
        A JSON-ready dict: ``setup``, ``budget``, ``per_seed``, ``summary`` (mean and 95% CI
        per method and metric), and ``win_rate`` / ``true_reward`` / ``wall_seconds`` as
        method -> mean.
    """
    t_start = time.perf_counter()
    quiet()
    if threads:
        torch.set_num_threads(threads)
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    seeds = list(seeds if seeds is not None else ([0] if quick else [0, 1, 2]))
    budget = budget or (QUICK if quick else FULL)
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    task = SyntheticTask()
    setup = prepare(work_dir, budget, log=log)
    base_dir, rm_dir = setup["base"]["path"], setup["reward_model"]["path"]
    prompts = task.sample_prompts(budget.eval_prompts, seed=EVAL_SEED)
    base_model, base_tok = load_policy(base_dir)
    _, base_rewards = greedy_reward(base_model, base_tok, prompts, task)
    setup["base"]["eval_true_reward"] = float(base_rewards.mean())
    per_seed: dict[str, list[dict]] = {m: [] for m in methods}
    lr_args = (f"--model.lr={budget.lr}",) if budget.lr is not None else ()
    fallback: dict[str, tuple[str, ...]] = {}
    for seed in seeds:
        for m in methods:
            run = run_method(m, base_dir=base_dir, rm_dir=rm_dir,
                             offline_path=setup["offline"]["path"], work_dir=work_dir,
                             seed=seed, epochs=budget.epochs,
                             pairs_per_epoch=budget.pairs_per_epoch,
                             extra=(*lr_args, *fallback.get(m, ())))
            if run["args"]:  # a fallback was needed: later seeds start from it
                fallback[m] = (*fallback.get(m, ()), *run["args"])
            row = {"seed": seed, **run}
            if run["policy_dir"] is not None:
                row.update(evaluate_policy(run["policy_dir"], prompts, base_rewards, task))
            else:
                row.update(win_rate=None, true_reward=None)
            per_seed[m].append(row)
            agreement = "/".join(f"{r['label_agreement']:.2f}" for r in run["rounds"])
            log(f"seed {seed} {METHODS[m].label:<24} win rate {_num(row['win_rate'])}  "
                f"true reward {_num(row['true_reward'])}  {run['wall_seconds']:.1f}s"
                + (f"  label agreement per round {agreement}" if agreement else "")
                + (f"  (fallback {' '.join(fallback[m])})" if m in fallback else ""))
    summary = {m: {k: mean_ci([r[k] for r in rows if r[k] is not None])
                   for k in ("win_rate", "true_reward", "wall_seconds")}
               for m, rows in per_seed.items()}
    for m, rows in per_seed.items():
        agreements = [[r["label_agreement"] for r in row["rounds"]] for row in rows]
        if any(agreements):
            # Online labels vs r*, per round, mean over seeds (offline oracle labels: see setup).
            summary[m]["online_label_agreement"] = [
                sum(a[k] for a in agreements) / len(agreements)
                for k in range(min(len(a) for a in agreements))]
    return {
        "quick": quick,
        "seeds": seeds,
        "methods": {m: METHODS[m].label for m in methods},
        "budget": {**asdict(budget), "total_pairs": budget.total_pairs},
        "setup": setup,
        "fallbacks": {m: list(v) for m, v in fallback.items()},
        "per_seed": per_seed,
        "summary": summary,
        "win_rate": {m: s["win_rate"]["mean"] for m, s in summary.items()},
        "true_reward": {m: s["true_reward"]["mean"] for m, s in summary.items()},
        "wall_seconds": {m: s["wall_seconds"]["mean"] for m, s in summary.items()},
        "total_seconds": time.perf_counter() - t_start,
    }


def _num(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"
