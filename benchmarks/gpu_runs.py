"""One run of ``benchmarks/gpu.py``: a strategy, SAIL-PR steps through ``lightning.Trainer``,
then a round's generation through the library's sharded generation path."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.bench_utils import bench_module

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
RUNS: dict[str, dict[str, Any]] = {
    "fsdp": {"strategy": "fsdp", "lora": None, "quantization": None},
    "fsdp2": {"strategy": "fsdp2", "lora": None, "quantization": None},
    "lora": {"strategy": None, "lora": LORA, "quantization": None},
    "qlora": {"strategy": None, "lora": LORA,
              "quantization": {"quant_type": "nf4", "double_quant": True,
                               "compute_dtype": "bfloat16"}},
}
SHARE_PR = 0.3  # SAIL-PR rows per batch, as configs/method/sail_pr.yaml's mix_pr


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def missing_requirement(name: str, engine: str = "hf") -> str | None:
    """Why a run cannot run here (or with this generation engine), or None."""
    if engine == "vllm" and RUNS[name]["quantization"] is not None:
        return "sampling.engine=vllm syncs full-precision weights: QLoRA is not supported"
    if engine == "vllm" and RUNS[name]["strategy"] == "fsdp":
        from sail_lightning.engines import check_engine_strategy

        try:  # the refusal a fit gives at setup, as the reason
            check_engine_strategy(strategy_for(name), engine, "--engine")
        except ValueError as e:
            return str(e)
    if RUNS[name]["quantization"] is not None:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # missing, or no kernels for this machine
            return f"bitsandbytes does not import ({type(e).__name__}: {e})"
    return None


def strategy_for(name: str):
    """The strategy a run's config would give (configs/strategy/*.yaml), on one device."""
    kind = RUNS[name]["strategy"]
    if kind == "fsdp":
        from sail_lightning.distributed import SAILFSDPStrategy

        return SAILFSDPStrategy()
    if kind == "fsdp2":
        from sail_lightning.distributed import SAILModelParallelStrategy

        return SAILModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    return "auto"


def random_batches(args: argparse.Namespace, vocab: int, pad: int, count: int) -> list[dict]:
    """Collated batches of random token ids (prompt and responses of fixed lengths), 30 % of
    the rows SAIL-PR, with cached reference log-probs as a round's pairs carry them."""
    from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair

    g = torch.Generator().manual_seed(0)
    collate = PreferenceCollator(pad)
    pr_rows = round(SHARE_PR * args.batch_size)

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    batches = []
    for _ in range(count):
        examples = []
        for k in range(args.batch_size):
            ref = -float(args.response_length) * torch.rand(2, generator=g) - 5.0
            pair = TokenizedPair(ids(args.prompt_length), ids(args.response_length),
                                 ids(args.response_length), float(ref[0]), float(ref[1]))
            examples.append(pair.example(3 if k < pr_rows else 0))
        batches.append(collate(examples))
    return batches


def _callbacks(args: argparse.Namespace, record: dict[str, Any], vocab: int):
    import lightning as L

    from sail_lightning.distributed import generation_context, synced_generation
    from sail_lightning.engines import get_engine
    from sail_lightning.generation import SamplingOptions

    class Measure(L.Callback):
        """Times the steps after the warm-up, then one round's generation at the end."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup:
                _synchronize()
                record["t0"] = time.perf_counter()
            if trainer.global_step >= args.warmup:
                record["tokens"] = record.get("tokens", 0) + int(batch["attention_mask"].sum())

        def on_train_end(self, trainer, pl_module) -> None:
            _synchronize()
            record["train_seconds"] = time.perf_counter() - record["t0"]
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(10, vocab, (args.prompt_length,), generator=g).tolist()
                       for _ in range(args.gen_prompts)]
            sampling = SamplingOptions(num_samples=2, temperature=0.9,
                                       max_new_tokens=args.max_new_tokens,
                                       batch_size=args.gen_batch_size, engine=args.engine)
            engine = get_engine(sampling)  # hf: generate_responses, as a round runs it
            tok = pl_module.pair.policy.config
            ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
                   "seed": 0, "progress": False}
            with generation_context(trainer):
                if args.engine == "vllm":  # built (at the first run) and synced, untimed
                    _synchronize()
                    t = time.perf_counter()
                    engine.generate(pl_module.pair.policy, prompts[:1],
                                    dataclasses.replace(sampling, max_new_tokens=2), **ids)
                    _synchronize()
                    record["engine_warmup_seconds"] = time.perf_counter() - t
                _synchronize()
                t = time.perf_counter()
                samples = engine.generate(pl_module.pair.policy, prompts, sampling, **ids,
                                          synced_gpus=synced_generation(trainer))
                _synchronize()
            record["generation_seconds"] = time.perf_counter() - t
            record["generated_tokens"] = sum(len(s) for group in samples for s in group)

    return [Measure()]


def run_one(name: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Trains ``args.warmup + args.steps`` SAIL-PR steps under the run's strategy, then
    generates a round; returns the measurements (or ``{"skipped": reason}``)."""
    import lightning as L

    from sail_lightning.tokenizer import build_tokenizer

    reason = missing_requirement(name, args.engine)
    if reason:
        return {"skipped": reason}
    spec = RUNS[name]
    cuda = torch.cuda.is_available()
    tok = build_tokenizer("synthetic")  # special-token ids only: the batches are random ids
    record: dict[str, Any] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sail_gpu_") as root:
        model: dict[str, Any] = {"model_config": config}
        if spec["quantization"] is not None:
            # 4-bit weights are quantized as they load: save the random model first.
            from sail_lightning.models import build_causal_lm

            build_causal_lm(None, config, tok, torch.bfloat16).save_pretrained(
                os.path.join(root, "model"))
            model = {"model_name_or_path": os.path.join(root, "model"),
                     "torch_dtype": "bfloat16", "quantization": spec["quantization"]}
        module = bench_module(**model, tokenizer="synthetic", coef_pr=0.3, baseline="mean",
                              lr=1e-5, warmup_ratio=0.0, lora=spec["lora"],
                              logprob_chunk_size=args.logprob_chunk_size)
        batches = random_batches(args, config["vocab_size"], tok.pad_token_id,
                                 args.warmup + args.steps)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy_for(name),
            precision="bf16-mixed", max_steps=args.warmup + args.steps, logger=False,
            gradient_clip_val=1.0, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            log_every_n_steps=50, default_root_dir=root,
            callbacks=_callbacks(args, record, config["vocab_size"]))
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
        try:
            trainer.fit(module, train_dataloaders=loader)
        except Exception as e:  # one run's failure is a result, not the end of the benchmark
            return {"skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        peak = torch.cuda.max_memory_allocated() if cuda else None
        del trainer, module, batches
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {
        "strategy": spec["strategy"] or "single_device",
        "train_tokens_per_second": record["tokens"] / record["train_seconds"],
        "steps_timed": args.steps,
        "train_seconds": record["train_seconds"],
        "peak_memory_bytes": peak,
        "generation_tokens_per_second": record["generated_tokens"]
        / record["generation_seconds"],
        "generated_tokens": record["generated_tokens"],
        "engine": args.engine,
        # vLLM only: building (first run) or waking the engine, a sync and 2 tokens, untimed.
        "engine_warmup_seconds": record.get("engine_warmup_seconds"),
        "seconds": time.perf_counter() - t_start,
    }
