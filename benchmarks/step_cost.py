"""The training step's cost per method, relative to DPO's, and the online round's per pair.

One training step is what ``lightning.Trainer`` runs per batch: ``SAILModule.training_step``
(policy forward, the loss), backward, gradient clipping and the AdamW step; generation is
not in it. Every method trains the same model (one config, one init seed) on the same
batches (the same token rows, with reference log-probs cached as the library caches them),
which differ only in what the method puts there:

- ``dpo``: every row offline DPO. ``sail_dp``: 40 % of the rows SAIL-DP (``coef_dp`` 0.2),
  ``sail_pp``: 30 % SAIL-PP (``coef_pp`` 0.2, mean baseline), ``sail_pr``: 30 % SAIL-PR
  (``coef_pr`` 0.3, mean baseline), ``sail_pr_released_code``: the same with the authors'
  gradient hook: the mixtures of ``configs/method/*.yaml``.
- ``selm`` / ``xpo``: every row online with a third, bonus response (the reference's sample),
  as ``configs/method/selm.yaml`` / ``xpo.yaml`` train: 1.5x the rows of the others.

Methods are interleaved in one process: each repetition fits every method once, in turn, for
``--steps`` timed steps after ``--warmup`` untimed ones; a method's figure is the median of
all its timed steps. Steps are timed between Lightning's ``on_train_batch_start`` and
``on_train_batch_end``. ``--cuts`` adds two variants of SAIL-PR that undo a cut, side by side:
``sail_pr_no_route_hint`` (batches without ``routes_present``: the loss asks the tensor which
routes it holds) and ``sail_pr_metrics_every_step`` (``log_every_n_steps=1``). Host syncs of
``training_step`` (a tensor read as a Python value, boolean-mask indexing, a copy to the CPU:
each a GPU stall; free on a CPU, so counted rather than timed) are counted in one separate,
untimed step per method; the optimizer's are not counted (its step counters live on the CPU).

The round: one ``PairGenerationCallback`` round of SAIL-PR through ``Trainer.fit``
(``online_round.run_ours``), its ``gen/*`` timings divided by the pairs.

    python benchmarks/step_cost.py            # a few minutes on 2 CPU cores
    python benchmarks/step_cost.py --quick    # smoke test

The last line of stdout is one JSON object with ``step_ratio_vs_dpo`` (method -> ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_utils import (  # noqa: E402
    SyncCounter,
    bench_module,
    quiet,
    report,
    versions,
)

SEED = 0
TARGET = 1.05  # every SAIL step at most 5 % above DPO's
METHODS: dict[str, tuple[dict[str, Any], int, float, bool]] = {
    # name: (SAILModule options, route of the method's rows, share of such rows, bonus rows)
    "dpo": ({}, 0, 0.0, False),
    "sail_dp": ({"coef_dp": 0.2}, 1, 0.4, False),
    "sail_pp": ({"coef_pp": 0.2, "baseline": "mean"}, 2, 0.3, False),
    "sail_pr": ({"coef_pr": 0.3, "baseline": "mean"}, 3, 0.3, False),
    "sail_pr_released_code": ({"coef_pr": 0.3, "response_term": "released_code"}, 3, 0.3,
                              False),
    "selm": ({"bonus_alpha": 1e-3, "bonus_form": "selm"}, 3, 1.0, True),
    "xpo": ({"bonus_alpha": 1e-5, "bonus_form": "xpo"}, 3, 1.0, True),
}
CUTS = {"sail_pr_no_route_hint": "sail_pr", "sail_pr_metrics_every_step": "sail_pr"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per method and repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, each fit")
    p.add_argument("--reps", type=int, default=12, help="round-robin repetitions")
    p.add_argument("--round-pairs", type=int, default=256, help="pairs of the timed round")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cuts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the SAIL-PR variants that undo a cut")
    p.add_argument("--skip-round", action="store_true", help="no round timing")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, few steps")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden_size, args.layers, args.steps, args.reps = 64, 2, 4, 2
        args.warmup, args.round_pairs = 1, 32
    return args


def model_config(hidden_size: int, layers: int) -> dict[str, Any]:
    from sail_lightning.synthetic import tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    return tiny_llama_config(build_tokenizer("synthetic"), hidden_size=hidden_size,
                             num_hidden_layers=layers)


def make_batches(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, list[dict]]:
    """Each method's batches: the same pairs, with reference log-probs cached once (by the
    initial model, as a round caches them), routes and bonus rows as the method has them."""
    from dataclasses import replace

    from sail_lightning.data.datamodule import PreferenceDataModule
    from sail_lightning.data.tokenize import PreferenceCollator
    from sail_lightning.module import SAILModule

    n = args.batch_size * (args.steps + args.warmup)
    dm = PreferenceDataModule(source="synthetic", tokenizer="synthetic",
                              num_synthetic_pairs=max(64, 2 * n), batch_size=args.batch_size,
                              max_prompt_length=16, max_response_length=16, seed=SEED)
    dm.setup("fit")
    pairs = [replace(p, bonus_ids=dm.train_pairs[(i + 1) % n].chosen_ids)
             for i, p in enumerate(dm.train_pairs[:n])]
    ref_module = SAILModule(model_config=config, tokenizer="synthetic", init_seed=SEED)
    ref_module.configure_model()
    _, ref = ref_module.pair.pair_logprobs(pairs, policy=False)
    collate = PreferenceCollator(dm.tokenizer.pad_token_id)
    out: dict[str, list[dict]] = {}
    for name, (_, route, share, bonus) in METHODS.items():
        per_batch = round(share * args.batch_size)
        batches = []
        for start in range(0, n, args.batch_size):
            examples = []
            for k in range(args.batch_size):
                i = start + k
                p = replace(pairs[i], ref_chosen=float(ref[i, 0]), ref_rejected=float(ref[i, 1]),
                            ref_bonus=float(ref[i, 2]) if bonus else None,
                            bonus_ids=pairs[i].bonus_ids if bonus else None)
                examples.append(p.example(route if k < per_batch else 0))
            batches.append(collate(examples))
        out[name] = batches
    out["sail_pr_no_route_hint"] = [{k: v for k, v in b.items() if k != "routes_present"}
                                    for b in out["sail_pr"]]
    out["sail_pr_metrics_every_step"] = out["sail_pr"]
    return out


class StepTimer:
    """Lightning callback: perf_counter around each training batch, after the warm-up."""

    def __init__(self, warmup: int) -> None:
        import lightning as L

        class _Timer(L.Callback):
            def on_train_batch_start(cb, trainer, *a) -> None:
                cb.t0 = time.perf_counter()

            def on_train_batch_end(cb, trainer, *a) -> None:
                if trainer.global_step > warmup:
                    self.seconds.append(time.perf_counter() - cb.t0)

        self.seconds: list[float] = []
        self.callback = _Timer()


def fit(module, batches: list[dict], steps: int, callbacks: list, log_every: int) -> None:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        log_every_n_steps=log_every, gradient_clip_val=1.0,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)


def time_losses(modules: dict, batches: dict[str, list[dict]], names: list[str],
                repeat: int = 300) -> dict[str, float]:
    """Seconds of the objective alone (``sail_loss`` and the bonus, forward and backward) on
    each method's first batch, given log-probs: what a method adds to a step beyond the
    model's forward and backward, which are the same for all. Best of 5 blocks."""
    from sail_lightning.objectives import LossOptions, bonus_loss, sail_loss

    out = {}
    for name in names:
        hp, batch = modules[name].hparams, batches[name][0]
        n = batch["route"].shape[0]
        rows = batch["input_ids"].shape[0]
        g = torch.Generator().manual_seed(0)
        lp0 = -20 * torch.rand(rows, generator=g) - 5
        ref = batch["ref_logps"]
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeat):
                lp = lp0.clone().requires_grad_(True)
                loss, _ = sail_loss(lp[:n], lp[n:2 * n], ref[:n], ref[n:2 * n], batch["route"],
                                    LossOptions(beta=hp.beta, coef_dp=hp.coef_dp,
                                    coef_pp=hp.coef_pp, coef_pr=hp.coef_pr,
                                    response_term=hp.response_term, baseline=hp.baseline),
                                    generator=torch.Generator().manual_seed(0), metrics=False,
                                    routes=batch.get("routes_present"))
                if "bonus_mask" in batch and hp.bonus_alpha:
                    loss = loss + bonus_loss(lp[2 * n:], ref[2 * n:], batch["bonus_mask"],
                                             alpha=hp.bonus_alpha, beta=hp.beta,
                                             form=hp.bonus_form)
                loss.backward()
            best = min(best, (time.perf_counter() - t) / repeat)
        out[name] = best
    return out


def time_steps(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    batches = make_batches(args, config)
    names = list(METHODS) + (list(CUTS) if args.cuts else [])
    modules = {}
    for name in names:
        options = METHODS[CUTS.get(name, name)][0]
        modules[name] = bench_module(model_config=config, tokenizer="synthetic", init_seed=SEED,
                                   lr=1e-4, warmup_ratio=0.0, **options)
    log_every = {n: 1 if n == "sail_pr_metrics_every_step" else 50 for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    total = args.warmup + args.steps
    for _ in range(args.reps):
        for name in names:  # interleaved: a slow spell of the machine hits every method
            timer = StepTimer(args.warmup)
            fit(modules[name], batches[name], total, [timer.callback], log_every[name])
            seconds[name] += timer.seconds
    syncs = {}
    for name in names:  # one untimed step each, the training step's own syncs counted
        modules[name].sync_counter = SyncCounter()
        fit(modules[name], batches[name][:1], 1, [], log_every[name])
        syncs[name] = modules[name].sync_counter.syncs
        modules[name].sync_counter = None
    median = {n: statistics.median(s) for n, s in seconds.items()}
    quartile = {n: statistics.quantiles(s, n=4)[0] for n, s in seconds.items()}
    return {"median_step_seconds": median,
            "step_ratio_vs_dpo": {n: median[n] / median["dpo"] for n in names},
            # Contention on a shared machine only adds time: the lower quartile is the
            # steadier figure when the medians disagree between runs.
            "step_ratio_vs_dpo_lower_quartile": {n: quartile[n] / quartile["dpo"]
                                                 for n in names},
            "loss_seconds": time_losses(modules, batches, names),
            "host_syncs_per_step": syncs,
            "steps_timed": {n: len(s) for n, s in seconds.items()},
            "parameters": sum(p.numel() for p in modules["dpo"].pair.policy.parameters())}


def time_round(args: argparse.Namespace) -> dict[str, Any]:
    """One SAIL-PR round through Trainer.fit: its gen/* timings per pair."""
    from benchmarks import online_round

    # The round benchmark's own parser: every option run_ours reads, at its defaults (the
    # synthetic task's tiny Llama, HF generation), with these three set.
    ns = online_round.parse_args(["--batch-size", str(args.batch_size), "--max-new-tokens",
                                  str(args.max_new_tokens), "--threads", str(args.threads)])
    with tempfile.TemporaryDirectory(prefix="sail_step_cost_") as root:
        policy_dir, reward_dir = online_round.build_models(root, args.hidden_size,
                                                           args.max_new_tokens)
        online_round.run_ours(ns, policy_dir, reward_dir, args.batch_size,
                              os.path.join(root, "warm"))
        ours = online_round.run_ours(ns, policy_dir, reward_dir, args.round_pairs,
                                     os.path.join(root, "ours"))
    split = {k: ours[f"{k}_seconds"] for k in
             ("generation", "label", "reference", "write", "round")}
    split["other"] = split["round"] - sum(v for k, v in split.items() if k != "round")
    return {"pairs": args.round_pairs,
            "seconds": split,
            "ms_per_pair": {k: 1000 * v / args.round_pairs for k, v in split.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    config = model_config(args.hidden_size, args.layers)
    out: dict[str, Any] = {"hidden_size": args.hidden_size, "layers": args.layers,
                           "batch_size": args.batch_size, "reps": args.reps,
                           "threads": args.threads, "quick": args.quick,
                           "versions": versions()}
    t0 = time.perf_counter()
    out.update(time_steps(args, config))
    for name, ratio in out["step_ratio_vs_dpo"].items():
        ms = 1000 * out["median_step_seconds"][name]
        loss_us = 1e6 * out["loss_seconds"][name]
        print(f"{name:28s} {ms:8.2f} ms/step  x{ratio:.3f} of DPO (lower quartile "
              f"x{out['step_ratio_vs_dpo_lower_quartile'][name]:.3f})  objective "
              f"{loss_us:7.0f} us  syncs/step {out['host_syncs_per_step'][name]}", flush=True)
    sail = [n for n in METHODS if n.startswith("sail")]
    out["target"] = TARGET
    out["target_met"] = all(out["step_ratio_vs_dpo"][n] <= TARGET for n in sail)
    # What the objective adds to DPO's step, measured apart from the model (no noise from
    # the forward and backward, which every method shares).
    dpo_step, dpo_loss = out["median_step_seconds"]["dpo"], out["loss_seconds"]["dpo"]
    out["objective_ratio_bound"] = {n: round(1 + (v - dpo_loss) / dpo_step, 4)
                                    for n, v in out["loss_seconds"].items()}
    if not args.skip_round:
        out["round"] = time_round(args)
        print("round per pair (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in out["round"]["ms_per_pair"].items()), flush=True)
    out["wall_seconds"] = time.perf_counter() - t0
    out["step_ratio_vs_dpo"] = {k: round(v, 4) for k, v in out["step_ratio_vs_dpo"].items()}
    return report(out, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
