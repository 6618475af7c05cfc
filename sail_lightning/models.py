"""Build the policy and its reference from a hub name, a local folder or a config."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraOptions:
    """LoRA adapters (peft) on the policy; the reference is then the policy with them off.

    Attributes:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default="all-linear")


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"model.torch_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def build_causal_lm(
    name_or_path: str | None,
    config: dict[str, Any] | None,
    tokenizer,
    dtype: torch.dtype | None = None,
    init_seed: int = 0,
) -> nn.Module:
    """A causal LM from a hub name or local folder (one code path), or a fresh one from a config.

    A config dict is a transformers config (``model_type`` plus sizes); the vocabulary size
    and the special-token ids are filled in from the tokenizer unless given.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is not None:
        cfg = dict(config)
        cfg.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            cfg.setdefault(key, getattr(tokenizer, key))
        # Its own seed: the same weights on every rank and world size, whatever else drew
        # from the global generator before (Lightning reseeds DDP workers, not one process).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        return model.to(dtype) if dtype is not None else model
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)


def add_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy in eval mode: the reference of full fine-tuning."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()
