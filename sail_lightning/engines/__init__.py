"""Generation engines: what samples the policy's responses in rounds and evaluation.

Both engines keep ``generation.generate_responses``'s contract, so labelling, pair selection,
reference log-probs, round files and resume do not know which one ran:

- ``hf``: transformers ``generate`` on the policy itself (``generation.generate_responses``).
- ``vllm``: one vLLM engine per process, colocated with training and built at the first call;
  its weights are synced from the policy before every call (``engines.vllm``; vLLM is the
  optional ``[vllm]`` extra, imported there only).

The reference never goes through an engine: it is sampled (SELM, XPO, evaluation) with HF.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import nn

from sail_lightning.generation import SamplingOptions, generate_responses


class GenerationEngine(Protocol):
    """Samples ``options.num_samples`` responses per prompt from ``model``.

    ``result[i][j]`` is sample ``j`` of ``prompt_ids[i]``: generated token ids only, cut right
    after the first eos (kept), without trailing pads (``generation.generate_responses``).
    """

    def generate(self, model: nn.Module, prompt_ids: Sequence[list[int]],
                 options: SamplingOptions, *, pad_token_id: int, eos_token_id: int, seed: int,
                 progress: bool = True, desc: str = "generate",
                 synced_gpus: bool = False) -> list[list[list[int]]]: ...


class HFEngine:
    """transformers ``generate`` on the model itself (the default engine)."""

    generate = staticmethod(generate_responses)


def check_engine_strategy(strategy: Any, engine: str, option: str) -> None:
    """Refuses ``engine: vllm`` under Lightning's ``FSDPStrategy`` (FSDP1) at setup, before
    vLLM is imported or anything trains: the colocated engine is synced with the policy's
    full weights, and FSDP1 leaves each parameter a flat shard of this rank outside forward
    (nothing here gathers them; FSDP2's DTensors are gathered with ``full_tensor``).

    ``option`` names the setting in the error (``PairGenerationCallback.sampling.engine``).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if engine == "vllm" and isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"{option}=vllm is not supported under {type(strategy).__name__} (Lightning's "
            "FSDPStrategy, FSDP1, as configs/strategy/fsdp.yaml): the vLLM engine is synced "
            "with the policy's full weights and FSDP1's flat parameter shards are not "
            "gathered for it; use FSDP2 (configs/strategy/fsdp2.yaml, "
            f"SAILModelParallelStrategy) or DDP with vllm, or {option}=hf under FSDP1")


HF = HFEngine()
_vllm_engine = None  # the process's vLLM engine, made at its first use


def get_engine(options: SamplingOptions) -> GenerationEngine:
    """The engine that ``options.engine`` names; for ``vllm`` the one engine of this process
    (made once, with the ``engine_kwargs`` of its first caller: one engine per process)."""
    global _vllm_engine
    if options.engine == "hf":
        return HF
    if options.engine != "vllm":
        raise ValueError(f"sampling.engine must be 'hf' or 'vllm', got {options.engine!r}")
    if _vllm_engine is None:
        from sail_lightning.engines.vllm import VLLMEngine  # vllm is imported in there only

        _vllm_engine = VLLMEngine(**(options.engine_kwargs or {}))
    else:
        _vllm_engine.check_kwargs(options.engine_kwargs)
    return _vllm_engine
