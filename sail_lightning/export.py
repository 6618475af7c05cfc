"""Export the trained policy as a Hugging Face model folder (``save_pretrained``) for users."""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import lightning as L

from sail_lightning.models import is_quantized
from sail_lightning.policy_pair import PolicyPair
from sail_lightning.tokenizer import build_tokenizer

log = logging.getLogger("sail_lightning.export")

# Strategies whose policy weights are sharded: rank 0 alone does not hold them.
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def export_policy(pair: PolicyPair, tokenizer: str | Any, dirpath: str,
                  merge_lora: bool = True) -> str:
    """Saves ``pair.policy`` and its tokenizer to ``dirpath`` with ``save_pretrained``.

    Full fine-tuning saves the full weights. Under LoRA, ``merge_lora`` saves full weights
    with the adapter merged (into a copy: the module keeps training unchanged) and otherwise
    the ``default`` adapter alone (load it with ``peft.PeftModel.from_pretrained(base, dirpath)``).
    Under QLoRA only the adapter is saved, whatever ``merge_lora`` says: merging would add the
    update to 4-bit weights, which re-quantizes the sum and rounds most of the update away.

    Also usable on a module restored from a checkpoint: ``export_policy(module.pair,
    module.hparams.tokenizer, dirpath)`` after ``SAILModule.load_from_checkpoint``.

    Args:
        pair: the policy (``SAILModule.pair`` of a configured module).
        tokenizer: the policy's tokenizer, or its name or path (``model.tokenizer``).
        dirpath: output folder (created).
        merge_lora: merge LoRA adapters into full weights.

    Returns:
        What was saved: ``"full"``, ``"merged"`` or ``"adapter"``.
    """
    policy = pair.policy
    os.makedirs(dirpath, exist_ok=True)
    if not hasattr(policy, "peft_config"):
        policy.save_pretrained(dirpath)
        kind = "full"
    elif merge_lora and not is_quantized(policy):
        # Only the trained adapter: a "reference" adapter (iterative methods) is not the policy.
        merged = copy.deepcopy(policy).merge_and_unload(adapter_names=["default"])
        merged.save_pretrained(dirpath)
        del merged
        kind = "merged"
    else:
        if merge_lora:
            log.warning("export: the policy's base weights are 4-bit (QLoRA), so only the LoRA "
                        "adapter is saved to %s: merging it into NF4 weights would re-quantize "
                        "the sum and lose most of the update. Load the base with the "
                        "BitsAndBytesConfig in base_quantization.json, then "
                        "peft.PeftModel.from_pretrained(base, %r)", dirpath, dirpath)
        policy.save_pretrained(dirpath, selected_adapters=["default"])
        kind = "adapter"
    if is_quantized(policy):
        config = policy.get_base_model().config.quantization_config
        with open(os.path.join(dirpath, "base_quantization.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    tokenizer.save_pretrained(dirpath)
    log.info("export: policy (%s) and tokenizer saved to %s", kind, dirpath)
    return kind


class ExportPolicyCallback(L.Callback):
    """At the end of ``fit``, saves the trained policy and tokenizer as a Hugging Face folder.

    Args:
        dirpath: output folder; default ``<trainer.log_dir>/policy``.
        merge_lora: under LoRA, save full weights with the adapter merged (``True``) or the
            adapter only (``False``). Under QLoRA the adapter only is saved (see
            ``export_policy``).
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.saved_to: str | None = None
        self.kind: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before training, not after it: rank 0 alone cannot save sharded weights.
        name = type(trainer.strategy).__name__
        # Base classes too: the configs name subclasses (SAILFSDPStrategy and the FSDP2 one).
        bases = {c.__name__ for c in type(trainer.strategy).__mro__}
        if stage == "fit" and bases & set(_SHARDED_STRATEGIES):
            raise ValueError(f"ExportPolicyCallback does not gather weights sharded by {name}; "
                             "remove it and export from a checkpoint with "
                             "sail_lightning.export.export_policy")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dirpath = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir,
                                               "policy")
        if trainer.is_global_zero:
            if any(os.path.exists(os.path.join(dirpath, f))
                   for f in ("config.json", "adapter_config.json")):
                # Said, not silent: a config reused for another model would replace this one.
                log.warning("export: replacing the model already in %s (an earlier run's)",
                            dirpath)
            self.kind = export_policy(pl_module.pair, pl_module.hparams.tokenizer, dirpath,
                                      self.merge_lora)
        self.saved_to = dirpath
        # Every rank returns from fit with the folder complete.
        trainer.strategy.barrier("export_policy")
