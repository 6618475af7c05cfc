"""``online_round.py --grid``: one online round, ours vs TRL's OnlineDPOTrainer, over model
size x ``max_new_tokens``, each point one run of ``online_round.main`` (both sides in one
process, side by side). Writes ``results/online_round_grid.json`` and ``.md``.

Points: the tiny model of the default run (hidden 64, 2 layers, 0.1M parameters) with 1024
pairs, and a 25M-parameter one (hidden 512, 6 layers) with 128 pairs (its TRL side trains
at a few seconds per step on one CPU thread), each with 12 and 64 new tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

# (name, hidden size, layers, pairs)
SIZES = [("tiny", 64, 2, 1024), ("25m", 512, 6, 128)]
NEW_TOKENS = [12, 64]
TARGET = 2.0
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def point_argv(args: argparse.Namespace, hidden: int, layers: int, pairs: int,
               new_tokens: int) -> list[str]:
    argv = ["--hidden-size", str(hidden), "--layers", str(layers), "--pairs", str(pairs),
            "--max-new-tokens", str(new_tokens), "--batch-size", str(args.batch_size),
            "--gen-batch-size", str(args.gen_batch_size), "--threads", str(args.threads)]
    return argv + (["--skip-trl"] if args.skip_trl else [])


def parameters(hidden: int, layers: int) -> int:
    """Weights of the policy (tiny_llama_config: MLP 4 x hidden, the synthetic vocabulary)."""
    from sail_lightning.synthetic import tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    config = tiny_llama_config(build_tokenizer("synthetic"), hidden_size=hidden,
                               num_hidden_layers=layers)
    v, h, i = config["vocab_size"], hidden, config["intermediate_size"]
    return layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def run_grid(args: argparse.Namespace, run_point: Callable[[list[str]], dict]) -> dict[str, Any]:
    t0 = time.perf_counter()
    grid, default = [], None
    quick = [SIZES[0][:3] + (64,)] if args.quick else SIZES
    for name, hidden, layers, pairs in quick:
        for new_tokens in NEW_TOKENS:
            out = run_point(point_argv(args, hidden, layers, pairs, new_tokens))
            ours, trl = out["ours"], out.get("trl") or {}
            row = {"size": name, "hidden_size": hidden, "layers": layers,
                   "parameters": parameters(hidden, layers), "pairs": pairs,
                   "max_new_tokens": new_tokens, "speedup_vs_trl": out["speedup_vs_trl"],
                   "generation_share": out["generation_share"],
                   "ours_seconds": out["ours_seconds"], "trl_seconds": out["trl_seconds"],
                   "ours": {k: ours[k] for k in (
                       "round_seconds", "generation_seconds", "label_seconds",
                       "reference_seconds", "write_seconds", "train_epoch_seconds",
                       "fit_overhead_seconds", "steps")},
                   "trl": {k: trl.get(k) for k in ("generation_seconds", "label_seconds",
                                                    "train_seconds", "steps")}}
            grid.append(row)
            if name == "tiny" and new_tokens == 12:
                default = row
    result = {"speedup_vs_trl": default and default["speedup_vs_trl"],
              "generation_share": default and default["generation_share"],
              "target": TARGET,
              "target_met": all((r["speedup_vs_trl"] or 0) >= TARGET for r in grid),
              "grid": grid, "batch_size": args.batch_size, "threads": args.threads,
              "wall_seconds": time.perf_counter() - t0}
    if not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "online_round_grid.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(RESULTS, "online_round_grid.md"), "w") as f:
            f.write(markdown(result))
    print(markdown(result), flush=True)
    print(json.dumps(result), flush=True)
    return result


def markdown(result: dict[str, Any]) -> str:
    head = ("| model | params | pairs | new tokens | ours (s) | round: gen / label / ref / "
            "write (s) | epoch (s) | TRL (s): gen / score | speedup | generation share |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in result["grid"]:
        o, t = r["ours"], r["trl"]
        trl = "n/a" if r["trl_seconds"] is None else (
            f"{r['trl_seconds']:.1f}: {t['generation_seconds']:.1f} / {t['label_seconds']:.1f}")
        speed = "n/a" if r["speedup_vs_trl"] is None else f"**{r['speedup_vs_trl']:.2f}**"
        rows.append(
            f"| {r['size']} (h {r['hidden_size']}, {r['layers']} layers) | "
            f"{r['parameters'] / 1e6:.1f}M | {r['pairs']} | {r['max_new_tokens']} | "
            f"{r['ours_seconds']:.1f} | {o['round_seconds']:.2f}: {o['generation_seconds']:.2f} / "
            f"{o['label_seconds']:.2f} / {o['reference_seconds']:.2f} / "
            f"{o['write_seconds']:.2f} | {o['train_epoch_seconds']:.1f} | {trl} | {speed} | "
            f"{r['generation_share']:.2f} |")
    return head + "\n".join(rows) + "\n"
