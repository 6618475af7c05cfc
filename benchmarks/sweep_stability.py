"""Measures the stable region of each shipped sweep: its corners, run as the agent runs them.

For every ``configs/sweeps/*.yaml``, the corners of its parameter ranges (each numeric range
or list at its minimum and maximum, each categorical list at every value; sweeps with more
than 16 corners: all at the minimum, all at the maximum, and each parameter alone at its
maximum) are trained on the quickstart task exactly as the sweep's command runs them
(its ``-c`` configs and extra options, then the corner's options), minus the W&B logger,
validation and checkpoints. A corner is stable when the run ends with a finite loss.

    python benchmarks/sweep_stability.py            # every sweep (about 20 min, 2 cores)
    python benchmarks/sweep_stability.py sail_pr    # one sweep

Writes ``benchmarks/results/sweep_stability.json``: sweep -> list of ``{"params",
"finite", "error", "final_loss", "seconds"}``. ``tests/test_sweeps.py`` runs the same
corners on a small budget (a few steps).
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import os
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(REPO, "configs", "sweeps")
RESULTS = os.path.join(REPO, "benchmarks", "results", "sweep_stability.json")
MAX_FULL = 16


def load(name: str) -> dict:
    with open(os.path.join(SWEEPS, f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def extremes(spec: dict) -> list:
    """A parameter's extreme values: min and max of a range or of numeric values; every value
    of a categorical list."""
    if "values" in spec:
        values = spec["values"]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return sorted({min(values), max(values)})
        return list(values)
    return [spec["min"], spec["max"]]


def corners(sweep: dict) -> list[dict]:
    """The corners of a sweep (see the module docstring)."""
    params = sweep["parameters"]
    axes = {k: extremes(v) for k, v in params.items()}
    total = 1
    for values in axes.values():
        total *= len(values)
    if total <= MAX_FULL:
        return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    low = {k: v[0] for k, v in axes.items()}
    high = {k: v[-1] for k, v in axes.items()}
    out = [low, high] + [{**low, k: axes[k][-1]} for k in axes if len(axes[k]) > 1]
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def command_args(sweep: dict) -> list[str]:
    """The sweep command's CLI arguments after ``fit``, W&B logger and its options left out."""
    cmd = [str(c) for c in sweep["command"]]
    args = cmd[cmd.index("fit") + 1 : cmd.index("${args}")]
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "-c" and args[i + 1].endswith("logger/wandb.yaml"):
            skip = True
            continue
        if a.startswith("--trainer.logger") or "wandb_samples" in a:
            continue
        out.append(a)
    return out


def run_corner(sweep: dict, params: dict, work: str, extra: tuple[str, ...] = ()) -> dict:
    """Trains one corner in ``work``; ``extra`` CLI options come last (tests shrink the run)."""
    from sail_lightning.cli import main

    args = ["fit", *command_args(sweep), *(f"--{k}={v}" for k, v in params.items()),
            f"--trainer.default_root_dir={work}", "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
            "--trainer.log_every_n_steps=10",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={work}", *extra]
    t0 = time.perf_counter()
    error = None
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # the sweep's -c paths are relative to the repo root
        main(args)
    except FloatingPointError as e:
        error = str(e).split(".")[0]
    finally:
        os.chdir(cwd)
    losses = []
    for path in glob.glob(os.path.join(work, "**", "metrics.csv"), recursive=True):
        with open(path) as f:
            losses += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    final = losses[-1] if losses else None
    finite = error is None and final is not None and final == final and abs(final) != float("inf")
    return {"params": params, "finite": finite, "error": error, "final_loss": final,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="*", help="sweep names (default: every configs/sweeps/*.yaml)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    from benchmarks.experiments.runs import quiet

    quiet()
    names = args.sweeps or sorted(os.path.basename(x)[:-5]
                                  for x in glob.glob(os.path.join(SWEEPS, "*.yaml")))
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    for name in names:
        sweep = load(name)
        rows = []
        for params in corners(sweep):
            with tempfile.TemporaryDirectory() as work:
                row = run_corner(sweep, params, work)
            rows.append(row)
            print(f"{name} {params}: {'finite' if row['finite'] else 'DIVERGED'} "
                  f"(final loss {row['final_loss']}, {row['seconds']:.0f}s)", flush=True)
        results[name] = rows
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
