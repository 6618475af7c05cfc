"""Wall time and results of the real-text example, as documented (docs/real_text.md).

Runs the commands between the ``<!-- real-text-command -->`` markers of docs/real_text.md
(the README's "Real text on CPU" block is the same) in a shell, from a fresh folder laid out
as a clone's root (``configs/`` and ``sail_lightning/`` linked), with ``OMP_NUM_THREADS``
threads (default 1: the machine's 2 cores are shared). Writes each command's wall time and
the figures the doc quotes to ``benchmarks/results/real_text.json``::

    python benchmarks/real_text.py [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The checkout this script is in, first: its sail_lightning and benchmarks package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_utils  # noqa: E402
from benchmarks.bench_utils import REPO, clone_like, command_env  # noqa: E402

MARKER = "real-text-command"
MARKED = bench_utils.marked_block(MARKER)


def documented_commands(text: str | None = None) -> list[str]:
    """The commands of the marked block of docs/real_text.md (or of ``text``)."""
    text = (REPO / "docs" / "real_text.md").read_text() if text is None else text
    return bench_utils.documented_commands(MARKER, text)


def metrics(folder: Path, method: str) -> list[dict]:
    (path,) = folder.glob(f"runs/real_text/{method}/version_0/metrics.csv")
    return list(csv.DictReader(path.open()))


def column(rows: list[dict], key: str) -> list[float]:
    return [round(float(r[key]), 4) for r in rows if r.get(key)]


def run(folder: Path, threads: int = 1) -> dict:
    """Runs the documented commands in ``folder`` (made clone-like); returns the results."""
    clone_like(folder)
    env = command_env(threads)
    steps = []
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    for command in documented_commands():
        start, cpu = time.perf_counter(), os.times()
        out = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True,
                             text=True)
        if out.returncode:
            raise RuntimeError(f"{command} failed ({out.returncode}):\n{out.stderr[-4000:]}")
        after = os.times()
        steps.append({"command": command, "wall_s": round(time.perf_counter() - start, 1),
                      "cpu_s": round(after.children_user + after.children_system
                                     - cpu.children_user - cpu.children_system, 1)})
    results = summarize(folder, steps, threads)
    results["load_average_1min"] = {"before": round(load_before, 2),
                                    "after": round(os.getloadavg()[0], 2)}
    return results


def summarize(folder: Path, steps: list[dict], threads: int) -> dict:
    """The results of a run in ``folder`` whose commands took ``steps`` (see ``run``)."""
    sft, sail = metrics(folder, "sft"), metrics(folder, "sail_pr")
    build = json.loads((folder / "models" / "tiny" / "build.json").read_text())
    return {
        "threads": threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "steps": steps, "total_wall_s": round(sum(s["wall_s"] for s in steps), 1),
        "total_cpu_s": round(sum(s["cpu_s"] for s in steps), 1),
        "reward_model": build["reward"]["training"],
        "sft": {key: column(sft, key) for key in (
            "val/loss", "val/eval_reward", "val/win_rate_vs_chosen", "val/mean_length")},
        "sail_pr": {key: column(sail, key) for key in (
            "gen/reward_mean", "gen/mean_length", "gen/eos_rate", "val/eval_reward",
            "val/win_rate_vs_ref", "val/win_rate_vs_chosen", "val/kl", "val/rewards/accuracies",
            "val/mean_length")},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="run in this (new) folder and keep it")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_text.json"))
    args = parser.parse_args(argv)
    if args.keep:
        Path(args.keep).mkdir(parents=True)
        results = run(Path(args.keep), args.threads)
    else:
        with tempfile.TemporaryDirectory() as folder:
            results = run(Path(folder), args.threads)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
