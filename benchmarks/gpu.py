"""SAIL-PR training and generation on one GPU, at Qwen2.5-0.5B's shape: a prepared benchmark.

A randomly initialised Qwen2 model with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 query
and 2 key/value heads, MLP 4864, vocabulary 151,936, tied embeddings; the config is built
here, nothing is downloaded) trains SAIL-PR steps through the real ``lightning.Trainer`` and
``SAILModule``, in ``bf16-mixed``, under each of these runs:

- ``fsdp``: Lightning's FSDPStrategy (``SAILFSDPStrategy``, as ``configs/strategy/fsdp.yaml``)
  on one device; full fine-tuning with a frozen reference copy.
- ``fsdp2``: FSDP2, ``fully_shard`` under Lightning's ModelParallelStrategy
  (``SAILModelParallelStrategy``, as ``configs/strategy/fsdp2.yaml``) on one device.
- ``lora``: LoRA (r 16, all linear layers) on one device; the reference is the policy with
  its adapters off.
- ``qlora``: 4-bit base weights under the same LoRA, when bitsandbytes imports (else
  skipped, with the reason in the JSON).

Each run measures: training tokens per second (the real tokens of chosen and rejected rows,
over the timed steps), model FLOPs utilisation (model FLOPs per token: 6 x the matmul
weights for full fine-tuning, 4 x for LoRA whose frozen weights get no weight gradients,
plus attention's 12 x layers x hidden x sequence length, 8 x for LoRA; divided by the
device's dense bf16 peak), peak GPU memory, and the generation tokens per second of a round:
``generate_responses`` inside ``generation_context`` with ``synced_gpus`` as a round runs it
(``PairGenerationCallback`` under sharding). Batches are random token ids, 30 % of the rows
SAIL-PR, with cached reference log-probs, as a round's pairs carry them.

It needs only torch, lightning, transformers and peft; bitsandbytes is optional. The last line
of stdout is one JSON object: ``device``, and ``train_tokens_per_second``, ``mfu``,
``peak_memory_bytes``, ``generation_tokens_per_second`` (each a dict run -> value).

    python benchmarks/gpu.py                   # one H100/H200: a few minutes (<= 8)
    python benchmarks/gpu.py --tiny            # the same code on CPU, a tiny model, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_utils import quiet, report, versions  # noqa: E402
from benchmarks.gpu_runs import RUNS, run_one  # noqa: E402

QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
}
TINY = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
        "max_position_embeddings": 512}
# Dense bf16 peak (no sparsity) of the SXM parts, FLOP/s; --peak-tflops for other devices.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--gen-prompts", type=int, default=64, help="prompts of the timed round")
    p.add_argument("--gen-batch-size", type=int, default=64, help="prompts per generate()")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--logprob-chunk-size", type=int, default=0,
                   help="model.logprob_chunk_size (0: full logits; MFU counts no recompute)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (default: known devices' datasheet)")
    p.add_argument("--tiny", action="store_true",
                   help="the same code on CPU: a tiny model, few short steps (the test)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    if args.tiny:
        args.batch_size, args.prompt_length, args.response_length = 2, 8, 8
        args.steps, args.warmup, args.gen_prompts, args.gen_batch_size = 2, 1, 4, 4
        args.max_new_tokens = 4
    return args


def device_info(args: argparse.Namespace) -> tuple[str, float | None]:
    """The device's name and dense bf16 peak FLOP/s (None when unknown or a CPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    if args.peak_tflops:
        return name, args.peak_tflops * 1e12
    return name, next((v for k, v in PEAKS.items() if k in name), None)


def matmul_params(config: dict[str, Any]) -> int:
    """Weights that multiply every token: the decoder's linear layers and the output layer
    (the embedding lookup does no multiplication)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i
    return layers * per_layer + config["vocab_size"] * h


def flops_per_token(config: dict[str, Any], seq_len: int, lora: bool) -> float:
    """Model FLOPs of one training token (forward and backward, no recompute): PaLM's
    ``6 N + 12 L H T``; with frozen base weights (LoRA) no weight gradients: ``4 N + 8 L H T``
    (the adapters' own FLOPs are negligible)."""
    n, layers, h = matmul_params(config), config["num_hidden_layers"], config["hidden_size"]
    if lora:
        return 4 * n + 8 * layers * h * seq_len
    return 6 * n + 12 * layers * h * seq_len


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    if args.tiny:
        torch.set_num_threads(1)
    config = TINY if args.tiny else QWEN25_05B
    device, peak = device_info(args)
    if device == "cpu" and not args.tiny:
        print("note: no CUDA device; this runs at Qwen2.5-0.5B's shape on the CPU, slowly "
              "(use --tiny for the CPU check)", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"device": device, "peak_flops": peak, "tiny": args.tiny,
                           "config": config, "batch_size": args.batch_size,
                           "sequence_length": args.prompt_length + args.response_length,
                           "versions": versions(), "runs": {}, "skipped": {}}
    t0 = time.perf_counter()
    for name in args.runs:
        result = run_one(name, config, args)
        if "skipped" in result:
            out["skipped"][name] = result["skipped"]
            print(f"{name}: skipped ({result['skipped']})", flush=True)
            continue
        seq = args.prompt_length + args.response_length
        fpt = flops_per_token(config, seq, lora=RUNS[name]["lora"] is not None)
        result["model_flops_per_token"] = fpt
        result["mfu"] = (fpt * result["train_tokens_per_second"] / peak) if peak else None
        out["runs"][name] = result
        mfu = "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f} %"
        mem = result["peak_memory_bytes"]
        print(f"{name}: {result['train_tokens_per_second']:.0f} train tokens/s, MFU {mfu}, "
              f"peak memory {'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}, generation "
              f"{result['generation_tokens_per_second']:.0f} tokens/s "
              f"({result['seconds']:.1f} s)", flush=True)
    for key in ("train_tokens_per_second", "mfu", "peak_memory_bytes",
                "generation_tokens_per_second"):
        out[key] = {name: r[key] for name, r in out["runs"].items()}
    out["wall_seconds"] = time.perf_counter() - t0
    return report(out, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
