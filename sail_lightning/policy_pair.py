"""PolicyPair: the policy being trained and its reference, as one service.

Rounds, labellers, evaluation, export and the strategies all need "the policy", "the
reference" and log-probs of pairs under both; this object owns those, and which of their
weights a checkpoint must keep. ``SAILModule`` holds one (as ``module.pair``) and keeps the
Lightning parts: steps, logging, optimisers and the checkpoint hooks, which ask the pair.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair
from sail_lightning.logprobs import concatenated_logprobs
from sail_lightning.models import (
    LoraOptions,
    add_lora,
    build_causal_lm,
    check_vocabulary,
    freeze,
    frozen_copy,
    prepare_quantized,
    resolve_dtype,
    resolve_quantization,
)

REFERENCE_ADAPTER = "reference"
"""Name of the frozen LoRA adapter that holds an updated reference (iterative methods)."""
PREFIX = "pair."
"""The pair's state-dict keys within ``SAILModule``'s (it holds the pair as ``pair``)."""
# Checkpoint entry: whether the reference was updated from the policy (then it is saved).
REFERENCE_UPDATED = "sail_reference_updated"

# Wrapper prefixes that module names carry but state-dict keys do not.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class PolicyPair(nn.Module):
    """The policy and its reference: a frozen copy, a separate frozen model, or (LoRA) the
    policy with its adapters disabled, or its frozen reference adapter after an update.

    Args:
        policy: the model being trained (a ``peft`` model under LoRA).
        reference: a frozen reference model, or None under LoRA (the disabled adapters).
        logprob_chunk_size: response tokens per chunk of the output layer (0: full logits);
            see ``logprobs.concatenated_logprobs``.
        with_reference: False for a policy trained without one (SFT): no copy is kept, and
            asking for the reference raises.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | None = None, *,
                 logprob_chunk_size: int = 0, with_reference: bool = True) -> None:
        super().__init__()
        if not with_reference and reference is not None:
            raise ValueError("a PolicyPair built with_reference=False takes no reference model")
        if with_reference and reference is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("a PolicyPair without a reference model needs a LoRA (peft) "
                             "policy, whose disabled adapters are the reference")
        self.policy = policy
        self.reference = reference
        self.logprob_chunk_size = logprob_chunk_size
        self.has_reference = with_reference
        # The reference no longer equals what was built: checkpoints keep it.
        self.reference_updated = False

    @property
    def lora(self) -> bool:
        return hasattr(self.policy, "peft_config")

    @property
    def has_reference_adapter(self) -> bool:
        return self.lora and REFERENCE_ADAPTER in self.policy.peft_config

    @property
    def pad_token_id(self) -> int:
        pad = getattr(getattr(self.policy, "config", None), "pad_token_id", None)
        return 0 if pad is None else int(pad)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # -- the reference ---------------------------------------------------------------------

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference as a model, for generation or a forward pass."""
        if not self.has_reference:
            raise RuntimeError("this policy is trained without a reference (model.loss_type="
                               "sft): there is no reference model to use")
        if self.reference is not None:
            yield self.reference
        elif self.has_reference_adapter:
            self.policy.set_adapter(REFERENCE_ADAPTER)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")
                self._freeze_reference_adapter()  # set_adapter makes the active one trainable
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def update_reference(self) -> None:
        """pi_ref <- pi_theta (iterative DPO, SELM). Under LoRA the policy's adapter is
        copied into a second, frozen adapter: nothing is merged into (quantized) weights."""
        self.reference_updated = True
        if not self.lora:
            self.reference.load_state_dict(self.policy.state_dict())
            self.reference.requires_grad_(False)
            return
        self.add_reference_adapter()
        params = dict(self.policy.named_parameters())
        copied = 0
        with torch.no_grad():
            for name, p in params.items():
                if ".default." not in name:
                    continue
                # FSDP2: the policy's adapter is sharded (DTensor); the reference adapter,
                # added after fully_shard, is a plain tensor that each rank holds whole.
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                target = params[name.replace(".default.", f".{REFERENCE_ADAPTER}.")]
                if full.shape != target.shape:  # copy_ would broadcast a shard silently
                    raise RuntimeError(
                        f"update_reference: {name} has shape {tuple(full.shape)}, its "
                        f"reference copy {tuple(target.shape)}; a sharded (FSDP1) adapter "
                        "cannot be copied: use configs/strategy/fsdp2.yaml")
                target.copy_(full)
                copied += 1
        if not copied:  # e.g. flattened parameters: the reference would silently stay the base
            raise RuntimeError("update_reference: no LoRA weight of the policy's 'default' "
                               "adapter was found to copy into the reference")
        self._freeze_reference_adapter()

    def add_reference_adapter(self) -> None:
        """The second LoRA adapter that holds an updated reference (idempotent)."""
        if self.has_reference_adapter:
            return
        config = copy.deepcopy(self.policy.peft_config["default"])
        self.policy.add_adapter(REFERENCE_ADAPTER, config)
        self.policy.set_adapter("default")
        self._freeze_reference_adapter()

    def _freeze_reference_adapter(self) -> None:
        for name, p in self.policy.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                p.requires_grad_(False)

    # -- log-probs -------------------------------------------------------------------------

    def reference_logprobs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Reference log-probs (no gradient) and response lengths of a collated batch."""
        with torch.no_grad(), self.reference_model() as model:
            return concatenated_logprobs(model, batch, self.logprob_chunk_size)

    def logprobs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Policy log-probs (with gradient), reference log-probs and response lengths of
        every row of a collated batch (chosen, rejected[, bonus]). Reference log-probs
        cached in the batch (``ref_logps``) skip the reference forward."""
        lp, counts = concatenated_logprobs(self.policy, batch, self.logprob_chunk_size)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(lp)
        else:
            ref, _ = self.reference_logprobs(batch)
        return lp, ref, counts

    def chosen_logprobs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Policy log-probs (with gradient) and lengths of the chosen rows ``[:B]`` of a
        collated batch alone (SFT): no rejected rows, no reference forward. The rows are
        right-padded to the batch's longest row, which may be a rejected one: cut to theirs."""
        n = batch["route"].shape[0]
        width = int(batch["attention_mask"][:n].sum(-1).max())
        rows = {k: batch[k][:n, :width] for k in ("input_ids", "attention_mask",
                                                  "response_mask")}
        return concatenated_logprobs(self.policy, rows, self.logprob_chunk_size)

    @torch.no_grad()
    def pair_logprobs(self, pairs: list[TokenizedPair], *, policy: bool = True,
                      batch_size: int = 32, by_length: bool = True, chosen_only: bool = False
                      ) -> tuple[Tensor | None, Tensor]:
        """Policy (optional) and reference log-probs of pairs, in eval mode: float32 CPU
        tensors ``(N, k)`` with columns chosen, rejected (and bonus when pairs carry one),
        in the order of ``pairs``.

        ``by_length`` batches pairs of similar length together (sorted by their longest
        row), which cuts the padding each forward computes; the values are the same up to
        float rounding (a row's padded width changes the kernels' blocking). Every rank
        sorts its own pairs, so sharded (FSDP) forwards still run in step.

        ``chosen_only``: the chosen rows alone (one column): a response's log-prob without
        the forward of a rejected row (the evaluation's KL samples are single responses).
        """
        collate = PreferenceCollator(self.pad_token_id)
        order = length_order(pairs) if by_length else list(range(len(pairs)))
        pol_out, ref_out = [], []
        was_training = self.policy.training
        self.policy.eval()
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = [pairs[i] for i in order[start : start + batch_size]]
                examples = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids,
                                          bonus_ids=p.bonus_ids).example(0) for p in chunk]
                batch = {k: v.to(self.device) for k, v in collate(examples).items()
                         if isinstance(v, Tensor)}
                if chosen_only:  # rows [:n], cut to their own width (as chosen_logprobs)
                    n = len(chunk)
                    width = int(batch["attention_mask"][:n].sum(-1).max())
                    batch = {k: batch[k][:n, :width] for k in ("input_ids", "attention_mask",
                                                                "response_mask")}
                k = batch["input_ids"].shape[0] // len(chunk)
                ref, _ = self.reference_logprobs(batch)
                ref_out.append(ref.view(k, -1).T.float().cpu())
                if policy:
                    lp, _ = concatenated_logprobs(self.policy, batch, self.logprob_chunk_size)
                    pol_out.append(lp.view(k, -1).T.float().cpu())
        finally:
            self.policy.train(was_training)
        back = torch.argsort(torch.tensor(order, dtype=torch.long))  # rows back in pairs' order
        pol = torch.cat(pol_out)[back] if policy else None
        return pol, torch.cat(ref_out)[back]

    # -- what a checkpoint keeps -----------------------------------------------------------

    def rebuildable(self, key: str) -> bool:
        """Whether ``build_policy_pair`` recreates the weight of a state-dict key (relative
        to the pair) exactly: the reference until it is updated, and under LoRA the frozen
        base. Checkpoints leave these out."""
        if key.startswith("reference."):
            return not self.reference_updated
        if self.lora and key.startswith("policy."):
            return key not in self._trainable_keys() and f".{REFERENCE_ADAPTER}." not in key
        return False

    def lean_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drops the rebuildable weights from a Lightning checkpoint's ``state_dict`` (keys
        under ``PREFIX``) and records whether the reference was updated."""
        checkpoint[REFERENCE_UPDATED] = self.reference_updated
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for key in [k for k in state
                    if k.startswith(PREFIX) and self.rebuildable(k.removeprefix(PREFIX))]:
            del state[key]

    def check_checkpoint(self, saved_keys: Iterable[str], checkpoint: dict[str, Any]) -> None:
        """Prepares the pair for a Lightning checkpoint whose weights are ``saved_keys``:
        :meth:`check_saved`, and a warning naming saved weights the pair lacks (non-strict
        loading would drop them silently)."""
        state = checkpoint.get("state_dict") or {}
        saved = [k.removeprefix(PREFIX) for k in (state.keys() if state else saved_keys)]
        unexpected = self.check_saved(saved, checkpoint.get(REFERENCE_UPDATED), prefix=PREFIX)
        unexpected = [k for k in unexpected if ".weight." not in k]  # 4-bit quantization state
        if unexpected:
            rank_zero_warn(f"checkpoint weights that the model does not have, ignored: "
                           f"{unexpected[:20]}")

    def check_saved(self, saved_keys: Iterable[str], reference_updated: bool | None, *,
                    prefix: str = "") -> list[str]:
        """Prepares the pair for loading saved weights (keys relative to the pair) and
        returns the saved keys it does not have (messages name keys as ``prefix + key``).

        Restores the reference adapter when the saved reference was updated
        (``reference_updated``: ``lean_checkpoint`` records it in every checkpoint; None, a
        checkpoint written elsewhere, reads as not updated).

        Raises:
            RuntimeError: naming the keys that are missing and cannot be rebuilt.
        """
        saved = set(saved_keys)
        self.reference_updated = bool(reference_updated)
        if self.reference_updated and self.lora:
            self.add_reference_adapter()  # its weights come from the checkpoint
        keys = self.state_keys()
        missing = [k for k in keys if k not in saved and not self.rebuildable(k)]
        if missing:
            raise RuntimeError(f"the checkpoint lacks {len(missing)} weight(s) that cannot be "
                               f"rebuilt from the model options: "
                               f"{[prefix + k for k in missing[:20]]}")
        return sorted(prefix + k for k in saved - set(keys))

    def _trainable_keys(self) -> set[str]:
        return {clean_key(n) for n, p in self.named_parameters() if p.requires_grad}

    def state_keys(self) -> list[str]:
        """State-dict keys of the pair (``persistent_state_keys``)."""
        return persistent_state_keys(self)


def persistent_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the parameters and persistent buffers, without materialising the
    state dict (which would gather sharded weights)."""
    keys = []
    for prefix, module in model.named_modules():
        # torch keeps which buffers are persistent in this private set only.
        skip = module._non_persistent_buffers_set
        tensors = [*module.named_parameters(recurse=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False) if n not in skip)]
        keys += [clean_key(f"{prefix}.{n}" if prefix else n) for n, t in tensors
                 if t is not None]
    return keys


def length_order(pairs: list[TokenizedPair]) -> list[int]:
    """Indices of ``pairs`` sorted by their longest row (prompt + longest response)."""
    return sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + max(
        len(pairs[i].chosen_ids), len(pairs[i].rejected_ids), len(pairs[i].bonus_ids or ())))


def clean_key(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (FSDP, checkpointing, compile)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def build_policy_pair(options: Mapping[str, Any], tokenizer: Any, *,
                      with_reference: bool = True) -> PolicyPair:
    """The policy and reference that ``SAILModule``'s model options describe (without a
    reference when ``with_reference`` is False: SFT).

    ``options`` holds ``SAILModule``'s arguments (``model_name_or_path``, ``model_config``,
    ``init_seed``, ``ref_model_name_or_path``, ``lora`` (a dict), ``quantization``,
    ``torch_dtype``, ``gradient_checkpointing``, ``logprob_chunk_size``). The same options
    rebuild the same frozen weights, which is why checkpoints can leave them out.
    """
    dtype = resolve_dtype(options["torch_dtype"])
    quant = resolve_quantization(options["quantization"])
    policy = build_causal_lm(options["model_name_or_path"], options["model_config"], tokenizer,
                             dtype, options["init_seed"], quant)
    check_vocabulary(policy, tokenizer, tokenizer_name=options.get("tokenizer"),
                     model_name=options["model_name_or_path"] or "of model.model_config")
    if quant is not None:
        policy = prepare_quantized(policy, options["gradient_checkpointing"], dtype)
    elif options["gradient_checkpointing"]:
        policy.gradient_checkpointing_enable()
    reference = None
    if not with_reference:
        pass  # nothing to copy: SFT trains the policy alone
    elif options["ref_model_name_or_path"]:
        reference = freeze(build_causal_lm(options["ref_model_name_or_path"], None, tokenizer,
                                           dtype, quantization=quant))
    elif options["lora"] is None:
        reference = frozen_copy(policy)
    if options["lora"] is not None:
        policy = add_lora(policy, LoraOptions(**options["lora"]))
    # from_pretrained returns eval mode, and Lightning keeps submodules' modes: without
    # this, dropout would stay off while training.
    policy.train()
    chunk = options["logprob_chunk_size"]
    return PolicyPair(policy, reference,
                      logprob_chunk_size=auto_chunk_size(policy) if chunk is None else chunk,
                      with_reference=with_reference)


AUTO_CHUNK_VOCAB = 16_384  # from this vocabulary up, the output layer runs in chunks
AUTO_CHUNK_SIZE = 256


def auto_chunk_size(model: nn.Module) -> int:
    """``logprob_chunk_size`` when none is given: ``AUTO_CHUNK_SIZE`` for a vocabulary of
    ``AUTO_CHUNK_VOCAB`` tokens or more, else 0 (full logits).

    At real vocabularies the ``(N, T, V)`` float32 logits and their gradient are a step's
    largest tensors (SmolLM2's 49,152 tokens, batch 8 pairs x 192 tokens: 604 MB each; with
    gradient checkpointing the step peaked at 6.1 GiB RSS full, 4.8 GiB chunked, glibc's
    default heap). Below that, chunking only adds the head's recomputation in backward.
    """
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or model.config.vocab_size
    return AUTO_CHUNK_SIZE if vocab >= AUTO_CHUNK_VOCAB else 0
