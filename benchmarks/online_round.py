"""One online round of SAIL-PR against TRL's OnlineDPOTrainer, on the synthetic task, on CPU.

Both sides start from the same tiny Llama policy (same config, same initial weights, saved
once to a temporary folder), score with the same tiny ``LlamaForSequenceClassification``
reward model (built from config over the synthetic tokenizer, saved, loaded from disk), sample
two responses per prompt at temperature 0.9 with the same ``max_new_tokens``, and train one
epoch over the same prompts with the same batch size:

- ours: the real library path, a ``lightning.Trainer`` fit (``max_epochs=1``) of ``SAILModule``
  (SAIL-PR, ``coef_pr=0.3``) on ``PreferenceDataModule(source="synthetic", mix_pr=1.0,
  online_pairs=N)`` with ``PairGenerationCallback(labeller=RewardModelLabeller(path),
  pair_mode="two_samples")``: round 0 (generate all N prompts in large batches, label, cache
  reference log-probs) is built in ``on_fit_start``, then one epoch trains on it.
- TRL: ``trl.experimental.online_dpo.OnlineDPOTrainer`` for one epoch over the same N
  prompts; by design it generates, scores and trains per step (``batch_size`` prompts each).

``--engine hf,vllm`` runs our fit once per generation engine (``sampling.engine``), beside
the one TRL run; ``--model-dir`` puts a pretrained model with LoRA on both sides, on the
instructions task (``round_setup.py``).

Both run in this one process, one after the other, with ``torch.set_num_threads`` fixed to the
same value. The last line of stdout is one JSON object (``speedup_vs_trl`` = TRL wall seconds /
our wall seconds). See benchmarks/README.md.

    pip install -e ".[bench]"
    python benchmarks/online_round.py            # 1024 pairs, a few minutes on 2 CPU cores
    python benchmarks/online_round.py --quick    # smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

# The checkout this script is in, first: its sail_lightning and benchmarks package are the
# ones measured, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_utils import quiet  # noqa: E402
from benchmarks.round_setup import (  # noqa: E402
    LORA,
    SEED,
    attempt,
    build_models,
    check_args,
    round_prompts,
    rounded,
    trl_inputs,
    versions,
)
from benchmarks.round_setup import datamodule as make_datamodule  # noqa: E402

LR = 1e-3  # both sides; a tiny random-init model (as in configs/quickstart.yaml)
LORA_LR = 5e-4  # both sides with --model-dir (configs/smollm2.yaml's LoRA rate)
BETA = 0.1
TEMPERATURE = 0.9  # the SAIL authors' value, and TRL's default
WARMUP = 0.1
GRAD_CLIP = 1.0  # TRL's default max_grad_norm
LOG_EVERY = 10  # both sides log every 10 optimizer steps
QUICK_PAIRS = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", type=int, default=None,
                   help=f"online pairs = prompts of the round (default 1024; {QUICK_PAIRS} "
                        "with --quick)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8,
                   help="training batch size of both sides (TRL: prompts per step)")
    p.add_argument("--gen-batch-size", type=int, default=128,
                   help="ours: prompts per generate() call and sequences per scoring forward "
                        "(configs/method/sail_pr.yaml uses 128)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of both models")
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads of both models (vLLM's CPU build needs a head size "
                        "hidden / heads of 32 or more)")
    p.add_argument("--model-dir", default=None,
                   help="a pretrained causal LM folder (with its tokenizer) instead of the "
                        "tiny synthetic models: LoRA r 8 on all linear layers, the "
                        "instructions task's prompts and exact reward (round_setup.py)")
    p.add_argument("--engine", default="hf",
                   help="comma list of our generation engines (sampling.engine), each run "
                        "side by side with TRL in this one process: hf, vllm or hf,vllm")
    p.add_argument("--grid-sizes", default=None,
                   help="with --grid: comma list of the sizes to run (round_grid.SIZES: "
                        "tiny,25m); default all")
    p.add_argument("--trl-vllm", action="store_true",
                   help="also run TRL with its own colocated vLLM (use_vllm=True); its error "
                        "is reported where it does not run")
    p.add_argument("--grid", action="store_true",
                   help="the grid of benchmarks/round_grid.py (model size x max_new_tokens), "
                        "one run per point; writes results/online_round_grid.{json,md}")
    # One thread by default: these models are too small for intra-op parallelism to pay,
    # and on a shared machine a second thread that waits for a busy core slows every op.
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads, the same for both sides")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_PAIRS} pairs unless --pairs is given")
    p.add_argument("--skip-trl", action="store_true", help="run our side only")
    args = p.parse_args(argv)
    if args.pairs is None:
        args.pairs = QUICK_PAIRS if args.quick else 1024
    for name in ("pairs", "max_new_tokens", "batch_size", "gen_batch_size", "hidden_size",
                 "layers", "heads", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    check_args(p, args)
    return args


# -- ours: lightning.Trainer + SAILModule + PairGenerationCallback ---------------------------


def run_ours(args: argparse.Namespace, policy_dir: str, reward_dir: str | None, pairs: int,
             root: str, engine: str = "hf") -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from sail_lightning.callbacks import PairGenerationCallback
    from sail_lightning.generation import SamplingOptions
    from sail_lightning.labellers import RewardModelLabeller
    from sail_lightning.module import SAILModule

    class MemoryLogger(Logger):
        """Keeps the logged metrics (the round's ``gen/*``) in memory; writes nothing."""

        def __init__(self) -> None:
            super().__init__()
            self.metrics: dict[str, float] = {}

        name, version = "memory", 0

        def log_hyperparams(self, params, *a, **k) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.metrics.update({k: float(v) for k, v in metrics.items()})

    class Stopwatch(L.Callback):
        """Records perf_counter marks at hooks; placed around PairGenerationCallback."""

        def __init__(self, marks: dict[str, float], fit_start_key: str) -> None:
            self.marks, self.key = marks, fit_start_key

        def on_fit_start(self, trainer, pl_module) -> None:
            self.marks[self.key] = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.marks.setdefault("epoch_start", time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.marks["epoch_end"] = time.perf_counter()

    torch.set_num_threads(args.threads)
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.model_dir:  # LoRA on the pretrained model; the labeller is data.oracle
        module = SAILModule(model_name_or_path=args.model_dir, tokenizer=args.model_dir,
                            beta=BETA, coef_pr=0.3, lr=LORA_LR, warmup_ratio=WARMUP, lora=LORA)
        labeller = None
    else:
        module = SAILModule(model_name_or_path=policy_dir, tokenizer="synthetic", beta=BETA,
                            coef_pr=0.3, lr=LR, warmup_ratio=WARMUP)
        labeller = RewardModelLabeller(reward_dir, batch_size=args.gen_batch_size,
                                       progress=False)
    datamodule = make_datamodule(args, pairs)
    sampling = SamplingOptions(num_samples=2, temperature=TEMPERATURE, top_p=1.0,
                               max_new_tokens=args.max_new_tokens,
                               batch_size=args.gen_batch_size, engine=engine)
    generation = PairGenerationCallback(labeller=labeller, sampling=sampling,
                                        pair_mode="two_samples", seed=SEED, progress=False,
                                        score_batch_size=args.gen_batch_size)
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_epochs=1,
        reload_dataloaders_every_n_epochs=1, gradient_clip_val=GRAD_CLIP,
        log_every_n_steps=LOG_EVERY, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=root,
        callbacks=[Stopwatch(marks, "round_start"), generation, Stopwatch(marks, "round_end")],
    )
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    t1 = time.perf_counter()
    m = logger.metrics
    round_s = marks["round_end"] - marks["round_start"]
    return {
        "path": "lightning.Trainer.fit",
        "engine": engine,
        "seconds": t1 - t0,
        "fit_seconds": t1 - t_fit,
        "round_seconds": round_s,
        "generation_seconds": m["gen/generation_seconds"],
        "label_seconds": m["gen/labelling_seconds"],
        "reference_seconds": m["gen/reference_seconds"],
        "write_seconds": m["gen/write_seconds"],
        "train_epoch_seconds": marks["epoch_end"] - marks["epoch_start"],
        # Trainer setup (model load, data, optimizer) and teardown: what the fit adds.
        "fit_overhead_seconds": (t1 - t_fit) - round_s
        - (marks["epoch_end"] - marks["epoch_start"]),
        "steps": trainer.global_step,
        "pairs_trained": datamodule.epoch_counts().total,
        "generated_tokens_per_second": m["gen/tokens_per_second"],
        "mean_response_length": m["gen/mean_length"],
        "generated_tokens": m["gen/tokens_per_second"] * m["gen/generation_seconds"],
        "prompts": [p.prompt for p in datamodule.pool.pairs],
        "threads": torch.get_num_threads(),
    }


# -- TRL: OnlineDPOTrainer ------------------------------------------------------------------


def run_trl(args: argparse.Namespace, policy_dir: str, reward_dir: str | None,
            prompts: list[dict[str, Any]], root: str, use_vllm: bool = False
            ) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    class TimedOnlineDPOTrainer(OnlineDPOTrainer):
        """Adds up the time spent in generation and in reward scoring, and the tokens
        generated (behaviour unchanged)."""

        gen_seconds = 0.0
        label_seconds = 0.0
        gen_tokens = 0

        def _generate(self, *a, **k):
            t = time.perf_counter()
            try:
                out = super()._generate(*a, **k)
                self.gen_tokens += int(out[3].sum())  # the completion mask
                return out
            finally:
                self.gen_seconds += time.perf_counter() - t

        def _calculate_rewards_from_functions(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._calculate_rewards_from_functions(*a, **k)
            finally:
                self.label_seconds += time.perf_counter() - t

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    inputs = trl_inputs(args, prompts, reward_dir)
    data = Dataset.from_dict({"prompt": inputs["texts"]})
    longest = max(len(p["ids"]) for p in prompts)
    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False,
            "vllm_gpu_memory_utilization": 0.3} if use_vllm else {}
    config = OnlineDPOConfig(
        output_dir=root, use_cpu=True, report_to=[], bf16=False, fp16=False, seed=SEED,
        per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        max_length=longest + args.max_new_tokens + 1,  # no prompt is truncated
        beta=BETA, loss_type="sigmoid", learning_rate=LORA_LR if args.model_dir else LR,
        lr_scheduler_type="cosine", warmup_steps=WARMUP, max_grad_norm=GRAD_CLIP,
        # TRL's default is True, which also turns the KV cache off in generation; ours is off.
        gradient_checkpointing=False,
        logging_steps=LOG_EVERY, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **vllm,
    )
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir or policy_dir)
    trainer = TimedOnlineDPOTrainer(
        model=policy, reward_funcs=inputs["reward_funcs"], args=config, train_dataset=data,
        processing_class=inputs["tokenizer"],
        reward_processing_classes=inputs["reward_processing_classes"],
        peft_config=inputs["peft_config"])
    trainer.remove_callback(PrinterCallback)  # it prints the logs to stdout
    t_train = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    if use_vllm:  # free the engine before the next run builds its own
        del trainer.llm
    return {
        "seconds": t1 - t0,
        "train_seconds": t1 - t_train,
        "generation_seconds": trainer.gen_seconds,
        "label_seconds": trainer.label_seconds,
        "generated_tokens": trainer.gen_tokens,
        "generated_tokens_per_second": trainer.gen_tokens / max(trainer.gen_seconds, 1e-9),
        "steps": trainer.state.global_step,
        "same_prompt_ids": inputs["same_prompt_ids"],
        "threads": torch.get_num_threads(),
    }


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.grid:
        from benchmarks.round_grid import run_grid

        return run_grid(args, main)
    quiet()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"speedup_vs_trl": None, "generation_share": None,
                           "ours_seconds": None, "trl_seconds": None, "pairs": args.pairs,
                           "max_new_tokens": args.max_new_tokens,
                           "batch_size": args.batch_size, "gen_batch_size": args.gen_batch_size,
                           "model_dir": args.model_dir, "lora": LORA if args.model_dir else None,
                           "hidden_size": args.hidden_size, "layers": args.layers,
                           "heads": args.heads, "engines": args.engines,
                           "threads": args.threads, "quick": args.quick,
                           "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="sail_bench_") as root:
        policy_dir, reward_dir = None, None
        if not args.model_dir:
            policy_dir, reward_dir = build_models(root, args.hidden_size, args.max_new_tokens,
                                                  args.layers, args.heads)
        prompts = round_prompts(args, args.pairs)
        warm = prompts[: args.batch_size]

        # Warm-ups, not timed: one tiny round/step per side (batch_size prompts), so that
        # imports, lazy initialisation and first-call costs (vLLM: building the process's
        # engine, reported as warmup_seconds) are not counted in either side.
        warmup = {}
        for engine in args.engines:
            t = time.perf_counter()
            run_ours(args, policy_dir, reward_dir, len(warm), os.path.join(root, "warm_ours"),
                     engine)
            warmup[engine] = time.perf_counter() - t
        trl_error = "skipped (--skip-trl)" if args.skip_trl else None
        if trl_error is None:
            trl_error = attempt(run_trl, args, policy_dir, reward_dir, warm,
                                 os.path.join(root, "warm_trl"))[1]

        ours = {}
        for engine in args.engines:
            o = run_ours(args, policy_dir, reward_dir, args.pairs,
                         os.path.join(root, f"ours_{engine}"), engine)
            o["same_prompts"] = sorted(o.pop("prompts")) == sorted(p["prompt"] for p in prompts)
            o["warmup_seconds"] = warmup[engine]
            ours[engine] = o
            print(f"ours ({o['path']}, SAIL-PR, engine {engine}): {o['seconds']:.2f} s wall "
                  f"= round {o['round_seconds']:.2f} s (generation "
                  f"{o['generation_seconds']:.2f} s, labelling {o['label_seconds']:.2f} s, "
                  f"reference {o['reference_seconds']:.2f} s) + training epoch "
                  f"{o['train_epoch_seconds']:.2f} s ({o['steps']} steps) + Trainer overhead "
                  f"{o['fit_overhead_seconds']:.2f} s", flush=True)
        trl = None
        if trl_error is None:
            trl, trl_error = attempt(run_trl, args, policy_dir, reward_dir, prompts,
                                      os.path.join(root, "trl"))
        if trl is not None:
            print(f"TRL OnlineDPOTrainer: {trl['seconds']:.2f} s wall (train "
                  f"{trl['train_seconds']:.2f} s, {trl['steps']} steps; generation "
                  f"{trl['generation_seconds']:.2f} s, reward scoring "
                  f"{trl['label_seconds']:.2f} s)", flush=True)
        else:
            print(f"TRL OnlineDPOTrainer: not run ({trl_error})", flush=True)
        if args.trl_vllm:  # no warm-up: it fails at its first step where it does not run
            trl_vllm, error = attempt(run_trl, args, policy_dir, reward_dir, prompts,
                                       os.path.join(root, "trl_vllm"), True)
            out["trl_vllm"] = trl_vllm and rounded(trl_vllm)
            out["trl_vllm_error"] = error
            print(f"TRL OnlineDPOTrainer with vLLM: {error or trl_vllm}", flush=True)

    out["by_engine"] = {}
    for engine, o in ours.items():
        o = rounded(o)
        out["by_engine"][engine] = {
            "ours_seconds": o["seconds"], "ours": o,
            "generation_share": round(o["generation_seconds"] / o["round_seconds"], 3),
            "speedup_vs_trl": None if trl is None else round(trl["seconds"] / o["seconds"], 3)}
    first = out["by_engine"][args.engines[0]]  # the top-level figures: the first engine's
    out.update({k: first[k] for k in ("ours_seconds", "generation_share", "speedup_vs_trl")})
    out["ours"] = first["ours"]
    out["same_prompts"] = first["ours"]["same_prompts"]
    if trl is not None:
        out["trl_seconds"] = round(trl["seconds"], 3)
        out["trl"] = rounded(trl)
    else:
        out["trl_error"] = trl_error
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
