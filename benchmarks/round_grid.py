"""``online_round.py --grid``: one online round, ours vs TRL's OnlineDPOTrainer, over model
size x ``max_new_tokens``, each point one run of ``online_round.main`` (all sides in one
process, side by side). With ``--engine hf`` alone writes ``results/online_round_grid.json``
and ``.md``; with another engine or ``--model-dir``, ``results/online_round_grid_engines.*``.

Points: the tiny model of the default run (hidden 64, 2 layers, 0.1M parameters) with 1024
pairs, and a 25M-parameter one (hidden 512, 6 layers) with 128 pairs (its TRL side trains
at a few seconds per step on one CPU thread), each with 12 and 64 new tokens. The tiny model
has 2 attention heads (head size 32: vLLM's CPU attention takes no smaller one; the first
saved grid had 4, which changes no weight count). ``--model-dir`` adds one point: that model
with LoRA, ``MODEL_DIR_POINT``'s pairs and new tokens (``configs/smollm2.yaml``'s round).
``--grid-sizes`` keeps some sizes only (to cut the grid's time).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

# (name, hidden size, layers, attention heads, pairs)
SIZES = [("tiny", 64, 2, 2, 1024), ("25m", 512, 6, 4, 128)]
NEW_TOKENS = [12, 64]
MODEL_DIR_POINT = {"pairs": 32, "max_new_tokens": 64, "gen_batch_size": 32}
QUICK_MODEL_DIR_POINT = {"pairs": 8, "max_new_tokens": 8, "gen_batch_size": 8}
TARGET = 2.0
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def point_argv(args: argparse.Namespace, hidden: int, layers: int, heads: int, pairs: int,
               new_tokens: int, model_dir: str | None = None,
               gen_batch_size: int | None = None) -> list[str]:
    argv = ["--hidden-size", str(hidden), "--layers", str(layers), "--heads", str(heads),
            "--pairs", str(pairs), "--max-new-tokens", str(new_tokens),
            "--batch-size", str(args.batch_size),
            "--gen-batch-size", str(gen_batch_size or args.gen_batch_size),
            "--threads", str(args.threads), "--engine", ",".join(args.engines)]
    if model_dir:
        argv += ["--model-dir", model_dir]
    return argv + (["--skip-trl"] if args.skip_trl else []) + (
        ["--trl-vllm"] if args.trl_vllm else [])


def parameters(hidden: int, layers: int) -> int:
    """Weights of the policy (tiny_llama_config: MLP 4 x hidden, the synthetic vocabulary)."""
    from sail_lightning.synthetic import tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    config = tiny_llama_config(build_tokenizer("synthetic"), hidden_size=hidden,
                               num_hidden_layers=layers)
    v, h, i = config["vocab_size"], hidden, config["intermediate_size"]
    return layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def folder_parameters(model_dir: str) -> int:
    """Weights of the model in ``model_dir`` (built on the meta device: nothing is read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid's points, each ``{size, hidden_size, layers, heads, pairs, max_new_tokens,
    argv, ...}``."""
    sizes = [s for s in SIZES if not args.grid_sizes or s[0] in args.grid_sizes]
    if args.quick:
        sizes = [SIZES[0][:4] + (64,)] if sizes else []
    out = []
    for name, hidden, layers, heads, pairs in sizes:
        for new_tokens in NEW_TOKENS:
            out.append({"size": name, "hidden_size": hidden, "layers": layers, "heads": heads,
                        "parameters": parameters(hidden, layers), "pairs": pairs,
                        "max_new_tokens": new_tokens,
                        "argv": point_argv(args, hidden, layers, heads, pairs, new_tokens)})
    if args.model_dir:
        p = QUICK_MODEL_DIR_POINT if args.quick else MODEL_DIR_POINT
        out.append({"size": os.path.basename(os.path.normpath(args.model_dir)) + " LoRA",
                    "hidden_size": None, "layers": None, "heads": None,
                    "parameters": folder_parameters(args.model_dir), "pairs": p["pairs"],
                    "max_new_tokens": p["max_new_tokens"],
                    "argv": point_argv(args, args.hidden_size, args.layers, args.heads,
                                       p["pairs"], p["max_new_tokens"], args.model_dir,
                                       p["gen_batch_size"])})
    return out


OURS_KEYS = ("round_seconds", "generation_seconds", "label_seconds", "reference_seconds",
             "write_seconds", "train_epoch_seconds", "fit_overhead_seconds", "steps",
             "generated_tokens_per_second", "warmup_seconds")
TRL_KEYS = ("generation_seconds", "label_seconds", "train_seconds", "steps",
            "generated_tokens_per_second")


def run_grid(args: argparse.Namespace, run_point: Callable[[list[str]], dict]) -> dict[str, Any]:
    t0 = time.perf_counter()
    grid = []
    for point in points(args):
        argv = point.pop("argv")
        out = run_point(argv)
        trl = out.get("trl") or {}
        for engine, e in out["by_engine"].items():
            grid.append({**point, "engine": engine, "speedup_vs_trl": e["speedup_vs_trl"],
                         "generation_share": e["generation_share"],
                         "ours_seconds": e["ours_seconds"], "trl_seconds": out["trl_seconds"],
                         "ours": {k: e["ours"].get(k) for k in OURS_KEYS},
                         "trl": {k: trl.get(k) for k in TRL_KEYS},
                         "trl_error": out.get("trl_error"),
                         "trl_vllm_error": out.get("trl_vllm_error"),
                         "trl_vllm_seconds": (out.get("trl_vllm") or {}).get("seconds")})
    default = next((r for r in grid if r["size"] == "tiny" and r["max_new_tokens"] == 12), None)
    result = {"speedup_vs_trl": default and default["speedup_vs_trl"],
              "generation_share": default and default["generation_share"],
              "target": TARGET,
              "target_met": all((r["speedup_vs_trl"] or 0) >= TARGET for r in grid),
              "target_met_by_engine": {
                  e: all((r["speedup_vs_trl"] or 0) >= TARGET for r in grid
                         if r["engine"] == e) for e in args.engines},
              "engines": args.engines, "grid": grid, "batch_size": args.batch_size,
              "threads": args.threads, "wall_seconds": time.perf_counter() - t0}
    if not args.quick:
        name = ("online_round_grid" if args.engines == ["hf"] and not args.model_dir
                else "online_round_grid_engines")
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, name + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(RESULTS, name + ".md"), "w") as f:
            f.write(markdown(result))
    print(markdown(result), flush=True)
    print(json.dumps(result), flush=True)
    return result


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    head = ("| model | params | pairs | new tokens | engine | ours (s) | round: gen / label / "
            "ref / write (s) | epoch (s) | gen tok/s | TRL (s): gen / score | TRL gen tok/s "
            "| speedup | generation share |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in result["grid"]:
        o, t = r["ours"], r["trl"]
        trl = "n/a" if r["trl_seconds"] is None else (
            f"{r['trl_seconds']:.1f}: {t['generation_seconds']:.1f} / {t['label_seconds']:.1f}")
        speed = "n/a" if r["speedup_vs_trl"] is None else f"**{r['speedup_vs_trl']:.2f}**"
        model = r["size"] if r["hidden_size"] is None else (
            f"{r['size']} (h {r['hidden_size']}, {r['layers']} layers)")
        rows.append(
            f"| {model} | {r['parameters'] / 1e6:.1f}M | {r['pairs']} | {r['max_new_tokens']} | "
            f"{r.get('engine', 'hf')} | {r['ours_seconds']:.1f} | {o['round_seconds']:.2f}: "
            f"{o['generation_seconds']:.2f} / {o['label_seconds']:.2f} / "
            f"{o['reference_seconds']:.2f} / {o['write_seconds']:.2f} | "
            f"{o['train_epoch_seconds']:.1f} | {_f(o.get('generated_tokens_per_second'), 0)} | "
            f"{trl} | {_f(t.get('generated_tokens_per_second'), 0)} | {speed} | "
            f"{r['generation_share']:.2f} |")
    return head + "\n".join(rows) + "\n"
