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
from benchmarks.experiments.labels import LABEL_SOURCES
from benchmarks.experiments.report import label_plot, label_table, save_charts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAIN = [m for m, spec in METHODS.items() if not spec.ablation]
ABLATIONS = [m for m, spec in METHODS.items() if spec.ablation]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, a small budget")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="default: 0 1 2 (0 with --quick)")
    p.add_argument("--methods", nargs="+", default=MAIN, choices=list(METHODS))
    p.add_argument("--labels", nargs="+", default=list(LABEL_SOURCES),
                   choices=list(LABEL_SOURCES), help="label sources of the online pairs")
    p.add_argument("--no-ablations", action="store_true",
                   help=f"leave out the ablations ({', '.join(ABLATIONS)})")
    p.add_argument("--pairs-per-epoch", type=int, default=None,
                   help=f"default {FULL.pairs_per_epoch} ({QUICK.pairs_per_epoch} with --quick)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {FULL.epochs} ({QUICK.epochs} with --quick)")
    p.add_argument("--offline-pairs", type=int, default=None,
                   help=f"default {FULL.offline_pairs} ({QUICK.offline_pairs} with --quick)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help=f"default {FULL.eval_prompts} ({QUICK.eval_prompts} with --quick)")
    p.add_argument("--work-dir", default="runs/compare_methods",
                   help="runs are kept here and reused by a later call with the same settings")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--name", default=None,
                   help="results file stem (default compare_methods[_quick])")
    p.add_argument("--cached-only", action="store_true",
                   help="report the runs left in --work-dir by a former call, run nothing new")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is robust on a shared 2-core machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    for opt, field in (("pairs_per_epoch", "pairs_per_epoch"), ("epochs", "epochs"),
                       ("offline_pairs", "offline_pairs"), ("eval_prompts", "eval_prompts")):
        if getattr(args, opt):
            budget = replace(budget, **{field: getattr(args, opt)})
    if args.eval_prompts:
        budget = replace(budget, rm_heldout_pairs=args.eval_prompts)
    methods = list(dict.fromkeys(args.methods + ([] if args.no_ablations else ABLATIONS)))
    results = compare(methods, args.seeds, args.quick, args.work_dir, budget=budget,
                      threads=args.threads, labels=args.labels, cached_only=args.cached_only,
                      log=lambda s: print(s, flush=True))
    stem = args.name or ("compare_methods_quick" if args.quick else "compare_methods")
    os.makedirs(args.results_dir, exist_ok=True)
    json_path = os.path.join(args.results_dir, f"{stem}.json")
    png_path = os.path.join(args.results_dir, f"{stem}.png")
    md_path = os.path.join(args.results_dir, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    b = results["budget"]
    title = (f"synthetic task, {b['total_pairs']} training pairs per method "
             f"({b['epochs']} x {b['pairs_per_epoch']}), seeds {results['seeds']}, 95% CI")
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
    keys = ("win_rate", "win_rate_by_label", "label_agreement", "true_reward", "wall_seconds",
            "seeds", "quick", "budget", "total_seconds", "fallbacks")
    print(json.dumps({k: results[k] for k in keys}))
    return results


def render(results: dict) -> str:
    """The markdown report: setup, the method x label-source table, the default source's
    full table (ablations included) and the online labels' agreement per round."""
    b, setup = results["budget"], results["setup"]
    out = [f"Budget: {b['total_pairs']} training pairs per method ({b['epochs']} epochs x "
           f"{b['pairs_per_epoch']}); base policy true reward "
           f"{setup['base']['eval_true_reward']:.3f} on {b['eval_prompts']} held-out prompts; "
           f"offline pairs' oracle labels agree with the true reward on "
           f"{setup['offline']['label_agreement']:.3f}; mean ± 95% t-interval over seeds "
           f"{results['seeds']}.", "",
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
