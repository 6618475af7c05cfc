"""Build the policy and its reference from a hub name, a local folder or a config."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sail_lightning.common import DTYPES


class _NoKernelsNotice(logging.Filter):
    """Drops bitsandbytes' notice that the optional ``kernels`` package is missing, which it
    logs at import on CPUs with AVX512-BF16 (every run imports it through peft): that kernel
    only speeds up 4-bit inference, which ``_no_cpu_inference_repack`` turns off anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsNotice())
# Under HF_HUB_OFFLINE=1 (common on clusters) the kernels package logs one more, from here.
logging.getLogger("kernels._internals.hf_hub").addFilter(_NoKernelsNotice())


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


@dataclass
class QuantizationOptions:
    """4-bit base weights (QLoRA, bitsandbytes) under trainable LoRA adapters; also the
    reward model's 4-bit weights (``RewardModelLabeller(quantization=...)``, inference only).

    The storage dtype of the packed 4-bit weights is always the model's float dtype
    (``model.torch_dtype``, default float32): FSDP shards 4-bit and float weights together
    only when they share one dtype.

    Attributes:
        quant_type: ``nf4`` (the QLoRA paper's NormalFloat) or ``fp4``.
        double_quant: quantize the quantization constants too (about 0.4 bit per weight).
        compute_dtype: dtype of the dequantized matmuls: ``float32``, ``bfloat16`` or
            ``float16``; default: the model's ``torch_dtype``, else float32.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None


_QUANT_TYPES = ("nf4", "fp4")


def resolve_quantization(options: QuantizationOptions | dict | None,
                         name: str = "model.quantization") -> QuantizationOptions | None:
    """Options from a dataclass or a dict (hparams saved by the CLI hold dicts), validated.

    Args:
        name: the option's name in messages (the labeller's differs from the policy's).

    Raises:
        ValueError: naming the ``name`` field that is wrong.
    """
    if options is None:
        return None
    if isinstance(options, dict):
        if unknown := sorted(set(options) - set(QuantizationOptions.__dataclass_fields__)):
            raise ValueError(f"{name}: unknown fields {unknown}; known: "
                             f"{sorted(QuantizationOptions.__dataclass_fields__)}")
        options = QuantizationOptions(**options)
    if options.quant_type not in _QUANT_TYPES:
        raise ValueError(f"{name}.quant_type must be one of {_QUANT_TYPES}, "
                         f"got {options.quant_type!r}")
    if options.compute_dtype is not None and options.compute_dtype not in DTYPES:
        raise ValueError(f"{name}.compute_dtype must be one of {sorted(DTYPES)}, "
                         f"got {options.compute_dtype!r}")
    return options


def bnb_config(options: QuantizationOptions, dtype: torch.dtype | None,
               keep_float: list[str] | None = None):
    """The transformers ``BitsAndBytesConfig`` of the options, for a model of ``dtype``.

    ``keep_float`` names the modules left unquantized; None keeps transformers' choice (the
    output embeddings and the last module: a causal LM's ``lm_head``).
    """
    from transformers import BitsAndBytesConfig

    storage = dtype or torch.float32
    compute = DTYPES[options.compute_dtype] if options.compute_dtype else storage
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
                              bnb_4bit_use_double_quant=options.double_quant,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage,
                              llm_int8_skip_modules=keep_float)


def head_modules(auto_class, name_or_path: str, *,
                 trust_remote_code: bool = False) -> list[str] | None:
    """Names of the top-level modules outside the backbone (``base_model_prefix``): a
    classifier's head (``score``; DeBERTa's ``pooler`` and ``classifier``), or None where
    the model has no such backbone. Read from the config on the meta device: no weights.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        if hasattr(auto_class, "_model_mapping"):  # an Auto class; a model class has no flag
            model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
        else:
            # A model class's from_config is private in transformers (the Auto classes'
            # is public); it is the only way to build one on the meta device from a config.
            model = auto_class._from_config(config)
    children = [name for name, _ in model.named_children()]
    if model.base_model_prefix not in children:
        return None
    return [name for name in children if name != model.base_model_prefix]


def load_pretrained(auto_class, name_or_path: str, dtype: torch.dtype | None = None,
                    quantization: QuantizationOptions | None = None, *,
                    float_head: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """``auto_class.from_pretrained``; with ``quantization`` its linear layers are 4-bit
    ``bnb.nn.Linear4bit``. The one loading path of the policy, reference and reward model.

    Args:
        auto_class: an Auto class, or a model class with its own ``from_pretrained``.
        float_head: keep every module outside the backbone in float (see ``head_modules``).
            transformers' own choice keeps only the last module: a Llama classifier's
            ``score``, but not DeBERTa's ``pooler`` nor a head whose last weight is a bias.
        trust_remote_code: run the modelling code of the model's folder (its ``auto_map``).
            Always passed, False included: left unset, transformers would ask on a terminal.
    """
    if quantization is None:
        return auto_class.from_pretrained(name_or_path, dtype=dtype,
                                          trust_remote_code=trust_remote_code)
    # An explicit float dtype: "auto" could load bfloat16 weights beside float32 storage.
    dtype = dtype or torch.float32
    keep = (head_modules(auto_class, name_or_path, trust_remote_code=trust_remote_code)
            if float_head else None)
    model = auto_class.from_pretrained(name_or_path, dtype=dtype,
                                       quantization_config=bnb_config(quantization, dtype, keep),
                                       trust_remote_code=trust_remote_code)
    return _no_cpu_inference_repack(model)


def resolve_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"model.torch_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_causal_lm(
    name_or_path: str | None,
    config: dict[str, Any] | None,
    tokenizer,
    dtype: torch.dtype | None = None,
    init_seed: int = 0,
    quantization: QuantizationOptions | None = None,
) -> nn.Module:
    """A causal LM from a hub name or local folder (one code path), or a fresh one from a config.

    A config dict is a transformers config (``model_type`` plus sizes); the vocabulary size
    and the special-token ids are filled in from the tokenizer unless given. With
    ``quantization`` the linear layers of a loaded model are 4-bit ``bnb.nn.Linear4bit``.
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
    return load_pretrained(AutoModelForCausalLM, name_or_path, dtype, quantization)


def check_vocabulary(model: nn.Module, tokenizer, *, model_name: str,
                     tokenizer_name: str | None) -> None:
    """Refuses a tokenizer whose ids the model cannot embed, naming both sizes, before any
    step: otherwise the first forward fails deep in the embedding with a bare ``IndexError:
    index out of range in self`` (e.g. the quickstart's ``tokenizer: synthetic`` left set for
    a model given by path, or another model family's tokenizer).

    Raises:
        ValueError: ``len(tokenizer)`` exceeds the model's input embedding rows.
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or len(tokenizer) <= rows:
        return
    raise ValueError(
        f"model.tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but the model "
        f"{model_name} embeds only {rows} (its vocab_size): ids from {rows} up would fail in "
        "the embedding. Use the model's own tokenizer (model.tokenizer: null, or the folder "
        "the model was saved with), or a model whose vocabulary covers this tokenizer")


def _no_cpu_inference_repack(model: nn.Module) -> nn.Module:
    """Keeps 4-bit weights in their training layout on CPUs with AVX512-BF16.

    There, bitsandbytes 0.50 repacks a ``Linear4bit`` in place on its first eval-mode,
    no-grad forward (validation, reference log-probs, generation) into an inference layout.
    Measured here: log-probs then shift by about 2e-3, the double quantization is undone,
    and later training forwards give LoRA zero gradients. Training alternates both kinds of
    forward, so the repack is turned off (no effect on GPUs).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def prepare_quantized(model: nn.Module, gradient_checkpointing: bool,
                      dtype: torch.dtype | None = None) -> nn.Module:
    """peft's k-bit preparation: freezes the base, upcasts half-precision non-quantized
    weights (norms, embeddings) to float32 for stable training, and turns on gradient
    checkpointing with input gradients (the frozen embeddings would otherwise cut the graph).

    The input and output embeddings then go back to ``dtype`` when it is half precision, as
    the QLoRA authors' code does: they are frozen and their values were ``dtype`` values, so
    float32 only doubles the largest float weights (Llama-3-8B: 4.2 GB instead of 2.1 GB)
    while bf16-mixed runs the output layer in bf16 anyway. The norms stay in float32. The
    output layer casts its input to its own dtype, for runs without autocast (whose logits
    are then in that dtype too).

    Note: with a bfloat16 / float16 model the norms leave float32 and half-precision weights
    side by side, which FSDP1 cannot flatten into one unit (untested here: no GPU).
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing)
    if dtype in (torch.bfloat16, torch.float16):
        head = model.get_output_embeddings()
        for module in (model.get_input_embeddings(), head):
            if module is not None:
                # .data, not module.to(): a tied output layer keeps sharing the one tensor.
                module.weight.data = module.weight.data.to(dtype)
        if head is not None:
            head.register_forward_pre_hook(_input_to_weight_dtype)
    return model


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    # Contiguous for the same reason as in logprobs.chunked_head_logprobs: generation feeds
    # the last position as a strided slice.
    return (args[0].to(module.weight.dtype).contiguous(), *args[1:])


def add_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_quantized(model: nn.Module) -> bool:
    """Whether a (peft-wrapped) model holds 4- or 8-bit bitsandbytes weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(getattr(base, f"is_loaded_in_{bits}bit", False) for bits in (4, 8))


def freeze(model: nn.Module) -> nn.Module:
    """Frozen and in eval mode, in place: a reference loaded for that purpose needs no copy."""
    model.requires_grad_(False)
    return model.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy in eval mode: the reference of full fine-tuning."""
    return freeze(copy.deepcopy(model))
