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

SEED = 0
LR = 1e-3  # both sides; a tiny random-init model (as in configs/quickstart.yaml)
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
                 "layers", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- shared models and prompts -------------------------------------------------------------


def build_models(root: str, hidden_size: int, max_new_tokens: int, layers: int = 2
                 ) -> tuple[str, str]:
    """Saves the initial policy and the reward model (each with the synthetic tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForSequenceClassification

    from sail_lightning.synthetic import SyntheticTask, tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    tok = build_tokenizer("synthetic")
    longest = SyntheticTask().max_prompt_len + 2  # bos, symbols, "="
    config = tiny_llama_config(tok, hidden_size=hidden_size, num_hidden_layers=layers,
                               max_position_embeddings=max(64, longest + max_new_tokens + 8))
    policy_dir, reward_dir = os.path.join(root, "policy"), os.path.join(root, "reward")
    torch.manual_seed(SEED)
    policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    torch.manual_seed(SEED + 1)
    reward = LlamaForSequenceClassification(AutoConfig.for_model(**config, num_labels=1))
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)  # RewardModelLabeller loads the tokenizer from its folder
    return policy_dir, reward_dir


def _datamodule(pairs: int, batch_size: int):
    from sail_lightning.data.datamodule import PreferenceDataModule

    return PreferenceDataModule(
        source="synthetic", tokenizer="synthetic", mix_pr=1.0, online_pairs=pairs,
        batch_size=batch_size, max_prompt_length=16, max_response_length=16,
        num_synthetic_pairs=max(4000, 2 * pairs), seed=SEED)


def round_prompts(pairs: int, batch_size: int) -> list[str]:
    """The prompts of our round 0 (the DataModule's own choice), for TRL's data set."""
    dm = _datamodule(pairs, batch_size)
    dm.setup("fit")
    return [dm.train_records[i].prompt for i in dm.plan_round(0).prompt_indices]


# -- ours: lightning.Trainer + SAILModule + PairGenerationCallback ---------------------------


def run_ours(args: argparse.Namespace, policy_dir: str, reward_dir: str, pairs: int,
             root: str) -> dict[str, Any]:
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
    module = SAILModule(model_name_or_path=policy_dir, tokenizer="synthetic", beta=BETA,
                        coef_pr=0.3, lr=LR, warmup_ratio=WARMUP)
    datamodule = _datamodule(pairs, args.batch_size)
    sampling = SamplingOptions(num_samples=2, temperature=TEMPERATURE, top_p=1.0,
                               max_new_tokens=args.max_new_tokens,
                               batch_size=args.gen_batch_size)
    labeller = RewardModelLabeller(reward_dir, batch_size=args.gen_batch_size, progress=False)
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
        "prompts": [p.prompt for p in datamodule.pool.pairs],
        "threads": torch.get_num_threads(),
    }


# -- TRL: OnlineDPOTrainer ------------------------------------------------------------------


def run_trl(args: argparse.Namespace, policy_dir: str, reward_dir: str, prompts: list[str],
            root: str) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from sail_lightning.tokenizer import build_tokenizer

    class TimedOnlineDPOTrainer(OnlineDPOTrainer):
        """Adds up the time spent in generation and in reward scoring (behaviour unchanged)."""

        gen_seconds = 0.0
        label_seconds = 0.0

        def _generate(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._generate(*a, **k)
            finally:
                self.gen_seconds += time.perf_counter() - t

        def _calculate_rewards_from_functions(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._calculate_rewards_from_functions(*a, **k)
            finally:
                self.label_seconds += time.perf_counter() - t

    torch.set_num_threads(args.threads)
    # TRL tokenizes prompts without special tokens and scores ``prompt + completion`` as one
    # string: "<bos> d a c b = " gives the policy the ids ours sees ([bos, d, a, c, b, =]) and
    # the reward model the ids our RewardModelLabeller builds (prompt ids, then response ids).
    data = Dataset.from_dict({"prompt": [f"<bos> {p} " for p in prompts]})
    config = OnlineDPOConfig(
        output_dir=root, use_cpu=True, report_to=[], bf16=False, fp16=False, seed=SEED,
        per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        beta=BETA, loss_type="sigmoid", learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, max_grad_norm=GRAD_CLIP,
        # TRL's default is True, which also turns the KV cache off in generation; ours is off.
        gradient_checkpointing=False,
        logging_steps=LOG_EVERY, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    t0 = time.perf_counter()
    tokenizer = build_tokenizer("synthetic")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    trainer = TimedOnlineDPOTrainer(
        model=policy, reward_funcs=reward, args=config, train_dataset=data,
        processing_class=tokenizer, reward_processing_classes=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it prints the logs to stdout
    t_train = time.perf_counter()
    trainer.train()
    t1 = time.perf_counter()
    return {
        "seconds": t1 - t0,
        "train_seconds": t1 - t_train,
        "generation_seconds": trainer.gen_seconds,
        "label_seconds": trainer.label_seconds,
        "steps": trainer.state.global_step,
        "threads": torch.get_num_threads(),
    }


# -- main -----------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    import lightning
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "trl": trl_version}


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
                           "hidden_size": args.hidden_size, "layers": args.layers,
                           "threads": args.threads,
                           "quick": args.quick, "versions": _versions()}
    with tempfile.TemporaryDirectory(prefix="sail_bench_") as root:
        policy_dir, reward_dir = build_models(root, args.hidden_size, args.max_new_tokens,
                                              args.layers)
        prompts = round_prompts(args.pairs, args.batch_size)
        warm = prompts[: args.batch_size]

        # Warm-ups, not timed: one tiny round/step per side (batch_size prompts), so that
        # imports, lazy initialisation and first-call costs are not counted in either side.
        run_ours(args, policy_dir, reward_dir, len(warm), os.path.join(root, "warm_ours"))
        trl_error = None
        if args.skip_trl:
            trl_error = "skipped (--skip-trl)"
        else:
            try:
                run_trl(args, policy_dir, reward_dir, warm, os.path.join(root, "warm_trl"))
            except Exception as e:  # report, do not fail: our side is still measured
                trl_error = f"{type(e).__name__}: {e}"

        ours = run_ours(args, policy_dir, reward_dir, args.pairs, os.path.join(root, "ours"))
        same_prompts = sorted(ours.pop("prompts")) == sorted(prompts)
        print(f"ours ({ours['path']}, SAIL-PR): {ours['seconds']:.2f} s wall "
              f"= round {ours['round_seconds']:.2f} s (generation "
              f"{ours['generation_seconds']:.2f} s, labelling {ours['label_seconds']:.2f} s) "
              f"+ training epoch {ours['train_epoch_seconds']:.2f} s ({ours['steps']} steps) "
              f"+ Trainer overhead {ours['fit_overhead_seconds']:.2f} s", flush=True)
        trl = None
        if trl_error is None:
            try:
                trl = run_trl(args, policy_dir, reward_dir, prompts, os.path.join(root, "trl"))
            except Exception as e:
                trl_error = f"{type(e).__name__}: {e}"
        if trl is not None:
            print(f"TRL OnlineDPOTrainer: {trl['seconds']:.2f} s wall (train "
                  f"{trl['train_seconds']:.2f} s, {trl['steps']} steps; generation "
                  f"{trl['generation_seconds']:.2f} s, reward scoring "
                  f"{trl['label_seconds']:.2f} s)", flush=True)
        else:
            print(f"TRL OnlineDPOTrainer: not run ({trl_error})", flush=True)

    out.update({
        "ours_seconds": round(ours["seconds"], 3),
        "generation_share": round(ours["generation_seconds"] / ours["round_seconds"], 3),
        "ours": {k: round(v, 3) if isinstance(v, float) else v for k, v in ours.items()},
        "same_prompts": same_prompts,
    })
    if trl is not None:
        out["trl_seconds"] = round(trl["seconds"], 3)
        out["speedup_vs_trl"] = round(trl["seconds"] / ours["seconds"], 3)
        out["trl"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in trl.items()}
    else:
        out["trl_error"] = trl_error
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
