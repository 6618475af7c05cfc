"""Peak CPU memory of one SAIL / DPO training step: LoRA, policy-only, QLoRA, full fine-tuning.

A Llama of about 100M parameters (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab
32000, output layer tied to the input embeddings: 109.5M) is built from a config with a fixed
seed and saved once in float32 with ``save_pretrained`` to a temporary folder; every variant
loads those weights by path. Tied, because the embeddings are then 22% of the parameters, as
in the models the library targets (Qwen2.5-0.5B: 27%, tied; Llama-3-8B: 13%, untied); an
untied 32000 x 768 pair would be 46% (``--no-tie-embeddings --layers 8`` is that model).

The batch is one pair of 192 prompt + 192 response tokens (``--pairs`` changes the count):
per parameter, as many activations (tokens x hidden x layers) as the 8B QLoRA config's batch
of 2 pairs x 1,024 tokens (0.065 vs 0.067). Token ids are drawn uniformly from the vocabulary
with a fixed seed (random ids, not a tokenizer: the synthetic task's tokenizer has 17 tokens,
and a real-size vocabulary is what sizes the output layer). ``tokenizer="synthetic"`` is
passed to ``SAILModule`` only because it needs one.

Variants (identical in everything but the variant; LoRA = ``LoraOptions()``, the defaults:
r 16, alpha 32, dropout 0.05, all linear layers; weights float32 except in ``qlora``; every
variant with gradient checkpointing and ``logprob_chunk_size=128``, as the QLoRA config runs,
unless ``--no-gradient-checkpointing`` / ``--logprob-chunk-size 0``):

- ``lora_ref``: fp32 LoRA; the reference is the policy with its adapters disabled (a second,
  no-grad forward in the step).
- ``policy_only``: the same fp32 LoRA model, with the reference log-probs given as constants
  (``batch["ref_logps"]``, the cached-reference path): no reference forward.
- ``qlora``: QLoRA as ``configs/model/llama-3-8b-qlora.yaml`` runs it: ``QuantizationOptions()``
  (nf4, double quantization) + the same LoRA, ``torch_dtype="bfloat16"`` (4-bit storage and
  compute dtype bf16), the forward under bf16 autocast (Lightning's ``bf16-mixed``; backward
  and optimizer outside it, as Lightning runs them). The adapters and norms are float32, the
  embeddings bf16 (``models.prepare_quantized``).
- ``qlora_fp32``: the same QLoRA with float32 storage and compute and no autocast: the
  embeddings are then float32 too. Not a target; it shows what the bf16 embeddings are worth
  (``qlora_fp32_vs_lora_fp32``).
- ``full``: full fine-tuning, ``SAILModule(model_name_or_path=path)``: the reference is a
  frozen deep copy of the policy.

The step is the real training path without a ``lightning.Trainer`` (same for every variant):
``module.configure_model()``, then ``SAILModule.logprobs`` + ``sail_loss`` (sigmoid DPO,
beta 0.1) + ``backward`` + one ``torch.optim.AdamW`` step over the trainable parameters (as
``configure_optimizers`` builds it; the LR scheduler holds no tensors) + ``zero_grad``.

Each variant runs in its own process, and so does a baseline process that only imports the
same libraries (torch, transformers, peft, bitsandbytes, lightning, sail_lightning): by default
(``--launch exec``) a fresh Python interpreter each; with ``--quick`` (``--launch fork``) a
child forked from a driver that has imported the libraries and allocated nothing else, which
saves six imports (a smoke test under a minute). Memory is resident set size (RSS), in MiB
(2**20 bytes), read from ``/proc/self/status``. Two steps make RSS count what the step holds:

- glibc's mmap threshold is fixed at 1 MiB in every process
  (``sail_lightning.heap.fix_mmap_threshold``, as the CLI does), so
  freed activations go back to the OS instead of staying in its heap by amounts that differ
  between variants (up to 1 GiB here without it);
- after loading, every weight is copied into the process's own memory and the heap trimmed
  (``_own_weights``): float weights loaded on CPU are otherwise memory-mapped from the file,
  entering RSS only when first read, and a 4-bit load keeps the file's pages that it read to
  quantize mapped.

Measured:

- ``rss_before_step``: VmRSS after the module, batch and optimizer are built (weights
  resident).
- the peak RSS (VmHWM) is reset (``echo 5 > /proc/self/clear_refs``) right before the step,
  and again between its phases: ``forward`` (``logprobs``, i.e. policy and reference
  log-probs, + ``sail_loss``), ``backward``, ``optimizer`` (AdamW step + ``zero_grad``). Each
  phase's peak (``phase_peaks``) is the larger of VmHWM at its end (``phase_vmhwm``) and the
  maximum of VmRSS sampled every millisecond by a thread (the kernel updates VmHWM only at
  some events, e.g. ``munmap``); ``step_peak`` = their maximum = the highest RSS *during the
  step*. Model loading's own transient peak (e.g. QLoRA reading float32 weights before
  quantizing) is excluded and reported apart as ``load_peak``.
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` reads the same, reset, high-water mark; it
  is reported as a check. If the reset is not permitted, VmHWM is the lifetime peak and
  ``peak_reset`` is false.
- ``step_increment`` = ``step_peak`` - ``rss_before_step``.
- ``total`` = ``step_peak`` - the baseline process's RSS after its imports: model + step,
  without the libraries. The targets compare ``total``:
  ``ref_adapter_vs_policy_only`` = total(lora_ref) / total(policy_only) (target <= 1.15),
  ``qlora_vs_lora_fp32`` = total(qlora) / total(lora_ref) (target <= 0.5).

The last line of stdout is one JSON object. See benchmarks/README.md.

    python benchmarks/memory.py            # ~110M model; about 3 minutes on 2 CPU cores
    python benchmarks/memory.py --quick    # ~11M model, smoke test (< 60 s)
    python benchmarks/memory.py --pairs 4 --no-gradient-checkpointing --logprob-chunk-size 0
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from sail_lightning.heap import fix_mmap_threshold

try:
    import sail_lightning  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("lora_ref", "policy_only", "qlora", "qlora_fp32", "full")
# The QLoRA variants run their forward under bf16 autocast where their weights are bf16, as
# Lightning's precision="bf16-mixed" (the QLoRA config's) runs training_step.
AUTOCAST = {"qlora": True}
TARGETS = {"ref_adapter_vs_policy_only": 1.15, "qlora_vs_lora_fp32": 0.5}
MODEL = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 2048, "vocab_size": 32000, "tie_word_embeddings": True}
QUICK_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 688, "vocab_size": 16000, "tie_word_embeddings": False}
BATCH = {"pairs": 1, "prompt_tokens": 192, "response_tokens": 192}
QUICK_BATCH = {"pairs": 2, "prompt_tokens": 32, "response_tokens": 32}
SEED = 0
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="~10M-parameter model, 2 pairs x 64 tokens: a smoke test")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per variant")
    p.add_argument("--logprob-chunk-size", type=int, default=128,
                   help="SAILModule(logprob_chunk_size=...) for every variant (0: off)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=True, help="SAILModule(gradient_checkpointing=...), every variant")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help="LoraOptions(dropout=...) of the LoRA variants (default: LoraOptions' "
                        "0.05); dropout keeps a copy of each adapted layer's input")
    p.add_argument("--launch", choices=("exec", "fork"), default=None,
                   help="how each measurement gets its own process: exec = a fresh Python "
                        "interpreter (default); fork = a child forked from a driver that has "
                        "only imported the libraries (default with --quick: imports once)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: MODEL's)")
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="tie the output layer to the input embeddings (default: MODEL's)")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: BATCH's)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS))
    # Internal: one measurement in this (fresh) process; prints one JSON line.
    p.add_argument("--worker", choices=("baseline", *VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.launch is None:
        args.launch = "fork" if args.quick else "exec"
    bad = set(args.variants.split(",")) - set(VARIANTS)
    if bad:
        p.error(f"unknown variants {sorted(bad)}; choose from {VARIANTS}")
    if args.threads < 1 or args.logprob_chunk_size < 0:
        p.error("--threads must be >= 1 and --logprob-chunk-size >= 0")
    return args


def model_sizes(args: argparse.Namespace) -> dict[str, Any]:
    sizes = dict(QUICK_MODEL if args.quick else MODEL)
    if args.layers is not None:
        sizes["num_hidden_layers"] = args.layers
    if args.tie_embeddings is not None:
        sizes["tie_word_embeddings"] = args.tie_embeddings
    return sizes


def batch_shape(args: argparse.Namespace) -> dict[str, int]:
    shape = dict(QUICK_BATCH if args.quick else BATCH)
    if args.pairs is not None:
        shape["pairs"] = args.pairs
    return shape


# -- measurement (worker side) -----------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mib() -> float:
    return _status_kb("VmRSS") / 1024


def _peak_mib() -> float:
    return _status_kb("VmHWM") / 1024


def _reset_peak() -> bool:
    """Resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler:
    """Samples VmRSS every ``interval`` seconds in a thread (big torch ops release the GIL).

    The kernel updates VmHWM only at some events (e.g. ``munmap``); memory freed back to the
    allocator without one (glibc's heap) can leave a peak unrecorded, so the step's peak is the
    larger of VmHWM and the sampled maximum.
    """

    def __init__(self, interval: float = 0.001) -> None:
        import threading

        self.interval, self.max_kb = interval, 0
        self._page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.max_kb = max(self.max_kb, int(f.read().split()[1]) * self._page_kb)
                self._stop.wait(self.interval)

    def take(self) -> float:
        """The sampled maximum since the last take, in MiB; restarts from the current RSS."""
        peak, self.max_kb = self.max_kb / 1024, 0
        return max(peak, _rss_mib())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _import_libraries() -> None:
    """The same imports in the baseline and in every variant."""
    import bitsandbytes  # noqa: F401
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import sail_lightning.module  # noqa: F401
    import sail_lightning.objectives  # noqa: F401


def _batch(vocab: int, shape: dict[str, int], cached_reference: bool) -> dict[str, Any]:
    """Random token ids in the training batch layout (``PreferenceCollator``): one shared
    prompt per pair; with ``cached_reference`` constant reference log-probs, as cached once
    per pool (their values do not change the memory)."""
    import torch

    from sail_lightning.common import Route
    from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair

    b, tp, tr = shape["pairs"], shape["prompt_tokens"], shape["response_tokens"]
    g = torch.Generator().manual_seed(SEED)
    prompts = torch.randint(3, vocab, (b, tp), generator=g).tolist()
    responses = torch.randint(3, vocab, (2 * b, tr), generator=g).tolist()
    ref = -float(tr) * math.log(vocab) if cached_reference else None
    pairs = [TokenizedPair(prompts[i], responses[i], responses[b + i], ref, ref)
             for i in range(b)]
    return PreferenceCollator(0)([p.example(Route.DPO) for p in pairs])


def _module(variant: str, path: str, args: argparse.Namespace):
    from sail_lightning.models import LoraOptions, QuantizationOptions
    from sail_lightning.module import SAILModule

    common = {"model_name_or_path": path, "tokenizer": "synthetic", "torch_dtype": "float32",
              "beta": 0.1, "lr": 1e-5, "logprob_chunk_size": args.logprob_chunk_size,
              "gradient_checkpointing": args.gradient_checkpointing}
    if variant == "full":
        return SAILModule(**common)
    if variant == "qlora":  # as configs/model/llama-3-8b-qlora.yaml: bf16 storage and compute
        common["torch_dtype"] = "bfloat16"
    quant = QuantizationOptions() if variant.startswith("qlora") else None
    lora = LoraOptions() if args.lora_dropout is None else LoraOptions(dropout=args.lora_dropout)
    return SAILModule(lora=lora, quantization=quant, **common)


def _own_weights(module) -> None:
    """Copies every weight into the process's own memory.

    On CPU, float weights loaded from safetensors stay memory-mapped from the file: they
    enter RSS only when the step first reads them. A 4-bit load keeps that mapping open (its
    float embeddings point into it), so the file pages it read to quantize stay in RSS too.
    A copy counts every variant's weights once, as resident memory, whatever the loader does.
    """
    import ctypes

    for param in module.parameters():
        param.data = param.data.clone()
    gc.collect()
    try:  # loading's freed blocks back to the OS (below the mmap threshold they stay)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    mmap_threshold = fix_mmap_threshold()
    _import_libraries()
    import torch

    torch.set_num_threads(args.threads)
    after_imports = _rss_mib()
    if args.worker == "baseline":
        return {"variant": "baseline", "rss_after_imports": after_imports,
                "peak": _peak_mib(), "mmap_threshold": mmap_threshold}

    from sail_lightning.objectives import LossOptions, sail_loss

    torch.manual_seed(SEED)
    module = _module(args.worker, args.model_dir, args)
    t0 = time.perf_counter()
    module.configure_model()
    _own_weights(module)
    load_seconds = time.perf_counter() - t0
    vocab = module.pair.policy.get_input_embeddings().weight.shape[0]
    shape = batch_shape(args)
    batch = _batch(vocab, shape, cached_reference=args.worker == "policy_only")
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=module.hparams.lr,
                                  weight_decay=module.hparams.weight_decay)
    gc.collect()
    load_peak = _peak_mib()
    before = _rss_mib()

    # The peak is read and reset between the phases, so each phase's own peak is known too.
    phases, hwm = {}, {}

    def phase_end(name: str) -> bool:
        hwm[name] = _peak_mib()
        phases[name] = max(hwm[name], sampler.take())
        return _reset_peak()

    with _RssSampler() as sampler:
        reset = _reset_peak()
        sampler.take()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST.get(args.worker, False)):
            lp, ref = module.logprobs(batch)
            n = batch["route"].shape[0]
            loss, _ = sail_loss(lp[:n], lp[n:], ref[:n], ref[n:], batch["route"],
                                LossOptions(beta=module.hparams.beta))
        reset = phase_end("forward") and reset
        loss.backward()
        reset = phase_end("backward") and reset
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        phase_end("optimizer")
        step_seconds = time.perf_counter() - t0
    # Without the resets, VmHWM is already the lifetime peak: the max is then the same.
    step_peak = max(phases.values())
    return {
        "variant": args.worker, "rss_after_imports": after_imports, "load_peak": load_peak,
        "rss_before_step": before, "step_peak": step_peak, "ru_maxrss": ru_maxrss,
        "rss_after_step": _rss_mib(), "step_increment": step_peak - before,
        "phase_peaks": phases, "phase_vmhwm": hwm,
        "peak_reset": reset, "loss": float(loss.detach()), "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "params": sum(p.numel() for p in module.pair.policy.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "reference_forward": "ref_logps" not in batch, "mmap_threshold": mmap_threshold,
    }


# -- driver ------------------------------------------------------------------------------------


def save_model(path: str, args: argparse.Namespace) -> int:
    """The float32 Llama every variant loads; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", **model_sizes(args), max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_subprocess(worker: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    # The driver's own flags, so every option reaches the workers (they ignore the driver's).
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--worker", worker,
           "--model-dir", path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{worker} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _forked_child(send, worker: str, path: str, args: argparse.Namespace) -> None:
    import traceback

    try:
        if worker == "save":
            result: Any = save_model(path, args)
        else:
            result = run_worker(argparse.Namespace(**{**vars(args), "worker": worker,
                                                      "model_dir": path}))
        send.send(("ok", result))
    except BaseException:  # noqa: B036 - reported to the driver, which raises
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


def run_forked(worker: str, path: str, args: argparse.Namespace) -> Any:
    """``worker`` in a child forked from this process, which has only imported libraries."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_forked_child, args=(send, worker, path, args))
    proc.start()
    send.close()
    try:
        status, result = recv.recv()
    except EOFError:
        status, result = "error", "the child died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{worker} failed (exit {proc.exitcode}):\n{result}")
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name)
            for name in ("torch", "transformers", "peft", "bitsandbytes", "lightning")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sail_lightning.models import LoraOptions

    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return {}
    variants = args.variants.split(",")
    shape = batch_shape(args)
    if args.launch == "fork":
        _import_libraries()  # once, here; nothing else is allocated before the forks
        import torch

        torch.set_num_threads(args.threads)
        measure = run_forked
    else:
        measure = run_subprocess
    with tempfile.TemporaryDirectory(prefix="sail_memory_") as tmp:
        params = run_forked("save", tmp, args) if args.launch == "fork" else save_model(tmp, args)
        print(f"model: {params / 1e6:.1f}M parameters, float32, saved to {tmp}", flush=True)
        baseline = measure("baseline", tmp, args)
        print(f"baseline (imports only): RSS {baseline['rss_after_imports']:.0f} MiB",
              flush=True)
        results = {}
        for variant in variants:
            r = measure(variant, tmp, args)
            r["total"] = r["step_peak"] - baseline["rss_after_imports"]
            results[variant] = r
            print(f"{variant:12s} before step {r['rss_before_step']:7.0f}  step peak "
                  f"{r['step_peak']:7.0f}  increment {r['step_increment']:7.0f}  total "
                  f"{r['total']:7.0f} MiB  (load peak {r['load_peak']:.0f}, step "
                  f"{r['step_seconds']:.1f} s)", flush=True)

    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results:
            return results[a]["total"] / results[b]["total"]
        return None

    ratios = {"ref_adapter_vs_policy_only": ratio("lora_ref", "policy_only"),
              "qlora_vs_lora_fp32": ratio("qlora", "lora_ref")}
    # Not a target: QLoRA in float32 throughout, to show what the bf16 embeddings are worth.
    extra = {"qlora_fp32_vs_lora_fp32": ratio("qlora_fp32", "lora_ref")}
    met = {k: (None if v is None else v <= TARGETS[k]) for k, v in ratios.items()}
    for k, v in {**ratios, **extra}.items():
        if v is not None and k in extra:
            print(f"{k}: {v:.3f} (no target)")
        elif v is not None:
            print(f"{k}: {v:.3f} (target <= {TARGETS[k]}): {'met' if met[k] else 'MISSED'}")
    summary = {
        **ratios,
        **extra,
        "targets": TARGETS,
        "targets_met": met,
        "total_peak_mib": {k: round(r["total"], 1) for k, r in results.items()},
        "step_peak_rss_mib": {k: round(r["step_peak"], 1) for k, r in results.items()},
        "step_increment_mib": {k: round(r["step_increment"], 1) for k, r in results.items()},
        "rss_before_step_mib": {k: round(r["rss_before_step"], 1) for k, r in results.items()},
        "load_peak_rss_mib": {k: round(r["load_peak"], 1) for k, r in results.items()},
        "phase_peak_rss_mib": {k: {p: round(v, 1) for p, v in r["phase_peaks"].items()}
                               for k, r in results.items()},
        "baseline_rss_mib": round(baseline["rss_after_imports"], 1),
        "peak_reset": all(r["peak_reset"] for r in results.values()),
        "step_seconds": {k: round(r["step_seconds"], 2) for k, r in results.items()},
        "trainable_params": {k: r["trainable_params"] for k, r in results.items()},
        "model_params": params,
        "model": model_sizes(args),
        "batch": {**shape, "rows": 2 * shape["pairs"],
                  "seq_len": shape["prompt_tokens"] + shape["response_tokens"]},
        "autocast_bf16": sorted(v for v in results if AUTOCAST.get(v, False)),
        "logprob_chunk_size": args.logprob_chunk_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_dropout": LoraOptions().dropout if args.lora_dropout is None else args.lora_dropout,
        "threads": args.threads,
        "launch": args.launch,
        "quick": args.quick,
        "versions": versions(),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
