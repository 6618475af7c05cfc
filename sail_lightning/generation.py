"""Batched, seeded sampling of responses from the current policy (online DPO / SAIL rounds).

Prompts are sorted by length before batching (less left padding) and the results are put back
in the prompts' order. The SAIL authors' released code lost track of that order (responses
attached to the wrong prompts after a shuffle, prompts stripped by the wrong prompt's length),
so here every response is stripped by the padded prompt width of its own batch, by token count,
and returned at its prompt's original index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sail_lightning.tokenizer import decode_text

ENGINES = ("hf", "vllm")
"""Generation engines of ``SamplingOptions.engine`` (``sail_lightning.engines``)."""


@dataclass
class SamplingOptions:
    """How responses are sampled from the policy.

    Attributes:
        num_samples: Responses per prompt (2 for SAIL / online DPO pairs).
        temperature: Sampling temperature (0.9 is the SAIL authors' value); ignored when greedy.
        top_p: Nucleus sampling mass in (0, 1]; 1.0 samples from the full tempered policy (no
            top-k truncation is applied either).
        max_new_tokens: Most tokens generated per response.
        batch_size: Prompts per ``generate()`` call (each yields ``num_samples`` sequences).
        greedy: Greedy decoding instead of sampling (then num_samples must be 1).
        engine: What generates the policy's samples: ``hf`` (transformers ``generate``, this
            module) or ``vllm`` (one colocated vLLM engine per process, its weights synced
            from the policy before each call: ``sail_lightning.engines.vllm``, the ``[vllm]``
            extra). Same output either way (``generate_responses``'s contract).
        engine_kwargs: Extra ``vllm.LLM`` arguments for ``engine: vllm`` (e.g.
            ``gpu_memory_utilization``, ``max_model_len``, ``kv_cache_memory_bytes``); read
            when the process's engine is built, at its first round.
    """

    num_samples: int = 2
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64
    greedy: bool = False
    engine: str = "hf"
    engine_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "sampling") -> None:
        """Raises ``ValueError`` naming the first invalid option as ``{prefix}.{name}``."""
        if self.num_samples < 1:
            raise ValueError(f"{prefix}.num_samples must be >= 1, got {self.num_samples}")
        if self.greedy and self.num_samples != 1:
            raise ValueError(
                f"{prefix}.num_samples must be 1 with {prefix}.greedy (greedy decoding gives "
                f"identical samples), got {self.num_samples}"
            )
        if not self.temperature > 0:
            raise ValueError(f"{prefix}.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{prefix}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"{prefix}.batch_size must be >= 1, got {self.batch_size}")
        if self.engine not in ENGINES:
            raise ValueError(f"{prefix}.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine_kwargs and self.engine != "vllm":
            raise ValueError(f"{prefix}.engine_kwargs are vllm.LLM arguments: they need "
                             f"{prefix}.engine=vllm, got {self.engine!r}")


@contextlib.contextmanager
def generation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and gradient checkpointing off while generating, both restored afterwards.

    Works for a HF ``PreTrainedModel`` and for wrappers around one (a peft ``PeftModel``, ...):
    ``gradient_checkpointing_enable`` only sets a ``gradient_checkpointing`` flag (plus the
    checkpoint function) on the modules that hold one, so those flags are what is switched off
    and put back, wherever they sit in the module tree. Calling ``gradient_checkpointing_enable``
    again instead would forget the caller's kwargs (``use_reentrant``, ``every_n_layers``, ...)
    and register another input-embedding hook every round.

    Each module's own ``training`` flag is restored, so submodules that the caller keeps in eval
    mode on purpose inside a training model stay in eval mode. Restoration also happens when the
    body raises.

    Yields:
        The model, in eval mode with gradient checkpointing off.
    """
    modes = [(module, module.training) for module in model.modules()]
    checkpointed = [
        (module, module.gradient_checkpointing)
        for module in model.modules()
        if isinstance(getattr(module, "gradient_checkpointing", None), bool)
    ]
    try:
        model.eval()
        for module, _ in checkpointed:
            module.gradient_checkpointing = False
        yield model
    finally:
        for module, flag in checkpointed:
            module.gradient_checkpointing = flag
        model.train(modes[0][1])  # runs any train() override of the root
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seeds the CPU and ``device`` generators; the caller's RNG states come back on exit.

    Only the generators that are forked are seeded: ``torch.manual_seed`` would also reseed
    every other visible GPU (each DDP rank sees them all), leaving their states changed.
    """
    accelerator = device.type != "cpu"
    # On CPU only the CPU state is forked; "cuda" (with no devices) is just a valid type name.
    with torch.random.fork_rng(
        devices=[device] if accelerator else [],
        device_type=device.type if accelerator else "cuda",
    ):
        torch.random.default_generator.manual_seed(seed)
        if accelerator:
            backend: Any = torch.get_device_module(device)
            # manual_seed seeds the current device: make it the model's one.
            has_context = hasattr(backend, "device")
            with backend.device(device) if has_context else contextlib.nullcontext():
                backend.manual_seed(seed)
        yield


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads prompts to a common width, returning ``(input_ids, attention_mask)``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _clean(tokens: list[int], pad_token_id: int, eos_token_id: int) -> list[int]:
    """Cuts a response right after its first eos (kept) and drops trailing pads."""
    if eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id) + 1]
    # Only matters without an eos: pads at the end of a response are batch filler, never
    # content (and when pad == eos, the response already ends at its first eos).
    end = len(tokens)
    while end > 0 and tokens[end - 1] == pad_token_id != eos_token_id:
        end -= 1
    return tokens[:end]


def generate_responses(
    model: nn.Module,
    prompt_ids: Sequence[list[int]],
    options: SamplingOptions,
    *,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    progress: bool = True,
    desc: str = "generate",
    synced_gpus: bool = False,
) -> list[list[list[int]]]:
    """Samples ``options.num_samples`` responses for each prompt, in the prompts' order.

    Args:
        model: A causal LM with ``generate`` (HF model or peft wrapper). Its train mode and
            gradient checkpointing are restored afterwards; its weights are not touched.
        prompt_ids: Token ids of each prompt (e.g. starting with bos); none may be empty.
        options: Sampling options (validated here).
        pad_token_id: Used for left padding and stripped from the end of responses.
        eos_token_id: Ends a response; kept as its last token.
        seed: Seeds the sampling; the same seed, prompts, options and model give the same
            responses. The caller's global RNG state is left as it was.
        progress: Show a tqdm bar over the batches.
        desc: The progress bar's label.
        synced_gpus: Passed to ``generate`` (FSDP / ZeRO-3). Every rank must then run the same
            number of batches, i.e. have as many ``ceil(len(prompt_ids) / batch_size)``.

    Returns:
        ``result[i][j]``: sample ``j`` for ``prompt_ids[i]``, the generated token ids only,
        cut right after the first eos (kept); without an eos (``max_new_tokens`` reached) the
        response is kept as generated, less any trailing pads.

    Raises:
        ValueError: On invalid options or an empty prompt.
    """
    options.validate()
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty (it needs at least a bos token)")
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows
    # on the first batch. The sort is stable, and `order` maps sorted positions back.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    results: list[list[list[int]] | None] = [None] * len(prompt_ids)
    device = next(model.parameters()).device
    step = options.batch_size
    if options.greedy:
        sampling: dict[str, Any] = {"do_sample": False}
    else:
        # top_k=0 turns off the top-50 truncation that transformers applies by default, so the
        # samples come from the (tempered, nucleus) policy as the objectives assume.
        sampling = {
            "do_sample": True, "temperature": options.temperature, "top_p": options.top_p,
            "top_k": 0,
        }
    starts = range(0, len(order), step)
    with torch.no_grad(), generation_mode(model), _seeded(seed, device):
        for start in tqdm(starts, desc=desc, disable=not progress):
            indices = order[start : start + step]
            input_ids, attention_mask = _left_pad([prompt_ids[i] for i in indices], pad_token_id)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=options.max_new_tokens,
                num_return_sequences=options.num_samples,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                use_cache=True,
                synced_gpus=synced_gpus,
                **sampling,
            )
            # A generation_config with return_dict_in_generate gives an output object.
            sequences = getattr(output, "sequences", output)
            # Every row holds the whole padded prompt first: strip its width, by token count.
            generated = sequences[:, input_ids.shape[1] :].tolist()
            # generate() repeats each prompt num_samples times in a row (repeat_interleave).
            k = options.num_samples
            if len(generated) != len(indices) * k:
                raise RuntimeError(
                    f"generate() returned {len(generated)} sequences for {len(indices)} prompts "
                    f"x {k} samples"
                )
            for row, index in enumerate(indices):
                results[index] = [
                    _clean(tokens, pad_token_id, eos_token_id)
                    for tokens in generated[row * k : (row + 1) * k]
                ]
    return results  # type: ignore[return-value]  # every index was filled exactly once


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Decodes a response to text, special tokens (bos, eos, pad) dropped, and for byte-level
    BPE bytes that form no character (``tokenizer.decode_text`` says why)."""
    return decode_text(tokenizer, ids)
