"""SAILModule: policy, reference and the SAIL / DPO-family training step."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair
from sail_lightning.logprobs import concatenated_logprobs
from sail_lightning.models import (
    LoraOptions,
    QuantizationOptions,
    add_lora,
    build_causal_lm,
    freeze,
    frozen_copy,
    prepare_quantized,
    resolve_dtype,
    resolve_quantization,
)
from sail_lightning.objectives import (
    BASELINES,
    BONUS_FORMS,
    LOSS_TYPES,
    RESPONSE_TERMS,
    Route,
    exploration_bonus,
    preference_metrics,
    sail_loss,
)

_SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
_REF_ADAPTER = "reference"
# Checkpoint entry: whether the reference was updated from the policy (then it is saved).
_CKPT_REFERENCE_UPDATED = "sail_reference_updated"
# Wrapper prefixes that module names carry but state-dict keys do not.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

log = logging.getLogger("sail_lightning.module")


class SAILModule(L.LightningModule):
    """The SAIL objective (and DPO, IPO, hinge, cDPO) on a policy and a frozen reference.

    The method is configuration: each example's route (set by the data) picks its terms, and
    the coefficients below weigh them. All coefficients zero is DPO.

    Args:
        model_name_or_path: hub name or local folder of the policy (``from_pretrained``).
        model_config: a transformers config dict for a freshly initialised model (tiny
            models for tests and the quickstart); exclusive with ``model_name_or_path``.
        init_seed: seed of a fresh model's initial weights (with ``model_config``).
        tokenizer: tokenizer name or path; defaults to ``model_name_or_path``.
            ``"synthetic"`` is the embedded task's tokenizer.
        ref_model_name_or_path: a separate reference model; default: a frozen copy of the
            initial policy, or, with ``lora``, the policy with its adapters disabled.
        lora: LoRA options; unset means full fine-tuning.
        quantization: 4-bit base weights under the LoRA adapters (QLoRA); needs ``lora``
            and ``model_name_or_path``. A separate reference is loaded in 4-bit too.
        torch_dtype: ``float32``, ``bfloat16`` or ``float16`` weights (default: as saved).
        gradient_checkpointing: trade compute for activation memory.
        beta: KL strength of DPO (the paper's beta).
        loss_type: DPO-term form: ``sigmoid``, ``robust``, ``hinge`` or ``ipo``.
        label_smoothing: cDPO / robust DPO epsilon.
        coef_dp: label-term weight on SAIL-DP examples (the paper's rho).
        coef_pp: label- and response-term weight on SAIL-PP examples (pi).
        coef_pr: response-term weight on SAIL-PR examples (gamma).
        response_term: ``score_function`` (the derivation) or ``released_code`` (the
            authors' gradient hook, to reproduce their runs).
        baseline: ``none`` or ``mean`` (variance-reducing baseline of the score function).
        bonus_alpha: weight of the exploration bonus on pairs that carry a bonus response
            (SELM: 1e-3, XPO: 1e-5; 0 turns it off).
        bonus_form: ``selm`` (alpha beta log pi/pi_ref of the reference sample) or ``xpo``
            (alpha log pi of the reference sample).
        label_seed: seed of the SAIL-DP label draws; each batch's draws are seeded by
            ``(label_seed, epoch, batch, rank)``, so a resumed run draws what an
            uninterrupted one would, on any number of processes.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the optimizer steps spent in linear warmup.
        scheduler: decay after warmup: ``cosine``, ``linear`` or ``constant_with_warmup``.
        logprob_chunk_size: response tokens per chunk of the output layer, recomputed in
            backward (0 = the model's full ``(N, T, V)`` logits). Bounds the logits' memory,
            the largest tensors of a step at real vocabularies; refused (ValueError) for
            models that change logits after their output layer. Tested on one process.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        init_seed: int = 0,
        tokenizer: str | None = None,
        ref_model_name_or_path: str | None = None,
        lora: LoraOptions | None = None,
        quantization: QuantizationOptions | None = None,
        torch_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        coef_dp: float = 0.0,
        coef_pp: float = 0.0,
        coef_pr: float = 0.0,
        response_term: str = "score_function",
        baseline: str = "none",
        bonus_alpha: float = 0.0,
        bonus_form: str = "selm",
        label_seed: int = 0,
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        scheduler: str = "cosine",
        logprob_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        _validate(locals())
        # The tokenizer the run uses, saved as such: the CLI hands the same name to the data
        # (data.tokenizer), and Lightning refuses hparams that differ between the two.
        tokenizer = tokenizer or model_name_or_path
        # Saved as dicts, as the CLI saves them: a checkpoint then loads with torch.load's
        # default weights_only=True, which refuses pickled dataclasses.
        lora, quantization = _as_dict(lora), _as_dict(quantization)
        self.save_hyperparameters()
        self.policy = None
        self.reference = None
        self._ref_adapter: str | None = None  # LoRA: a frozen copy of the policy's adapter
        # The reference no longer equals what configure_model builds: checkpoints keep it.
        self._reference_updated = False
        # Checkpoints omit the frozen weights that configure_model rebuilds (on_save_checkpoint);
        # on_load_checkpoint still requires every other key.
        self.strict_loading = False

    @property
    def tokenizer_name(self) -> str:
        return self.hparams.tokenizer

    # -- models ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.policy is not None:
            return  # idempotent: Lightning may call it again (e.g. when resuming)
        from sail_lightning.synthetic import build_tokenizer

        hp = self.hparams
        tokenizer = build_tokenizer(self.tokenizer_name)
        dtype = resolve_dtype(hp.torch_dtype)
        quant = resolve_quantization(hp.quantization)
        policy = build_causal_lm(hp.model_name_or_path, hp.model_config, tokenizer, dtype,
                                 hp.init_seed, quant)
        if quant is not None:
            policy = prepare_quantized(policy, hp.gradient_checkpointing, dtype)
        elif hp.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        if hp.ref_model_name_or_path:
            self.reference = freeze(
                build_causal_lm(hp.ref_model_name_or_path, None, tokenizer, dtype,
                                quantization=quant))
        elif hp.lora is None:
            self.reference = frozen_copy(policy)
        if hp.lora is not None:
            policy = add_lora(policy, LoraOptions(**hp.lora))  # saved as a dict (__init__)
        # from_pretrained returns eval mode, and Lightning keeps submodules' modes: without
        # this, dropout would stay off while training.
        policy.train()
        self.policy = policy
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            # FSDP2 under ModelParallelStrategy: shard here, where the model is built.
            from sail_lightning.distributed import shard_fsdp2

            shard_fsdp2(self.policy, mesh["data_parallel"])
            if self.reference is not None:
                shard_fsdp2(self.reference, mesh["data_parallel"])

    @contextlib.contextmanager
    def reference_model(self):
        """The reference as a model: a frozen copy, the policy's frozen reference adapter
        (after an update), or the policy with its adapters disabled."""
        if self.reference is not None:
            yield self.reference
        elif self._ref_adapter is not None:
            self.policy.set_adapter(self._ref_adapter)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")
                self._freeze_reference_adapter()
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def reference_logprobs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of a collated batch (no gradient)."""
        with torch.no_grad(), self.reference_model() as model:
            return concatenated_logprobs(model, batch, self.hparams.logprob_chunk_size)

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs of every row (chosen, rejected[, bonus])."""
        lp, counts = concatenated_logprobs(self.policy, batch, self.hparams.logprob_chunk_size)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(lp)  # cached once per pool: no reference forward
        else:
            ref, _ = self.reference_logprobs(batch)
        if self.hparams.loss_type == "ipo":
            # IPO is defined on length-averaged log-probs.
            counts = counts.clamp(min=1).to(lp.dtype)
            lp, ref = lp / counts, ref / counts
        return lp, ref

    def _logprobs(self, batch):
        lp, ref = self._forward(batch)
        b = batch["route"].shape[0]
        return lp[:b], lp[b : 2 * b], ref[:b], ref[b : 2 * b]

    # -- services for the online loop ------------------------------------------------------

    @torch.no_grad()
    def pair_logprobs(
        self, pairs: list[TokenizedPair], *, policy: bool = True, batch_size: int = 32
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Policy (optional) and reference log-probs of pairs, in eval mode: ``(N, k)`` with
        columns chosen, rejected (and bonus when the pairs carry one)."""
        collate = PreferenceCollator(self._pad_token_id())
        pol_out, ref_out = [], []
        was_training = self.policy.training
        self.policy.eval()
        try:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                examples = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids,
                                          bonus_ids=p.bonus_ids).example(0) for p in chunk]
                batch = {k: v.to(self.device) for k, v in collate(examples).items()}
                k = batch["input_ids"].shape[0] // len(chunk)
                ref, _ = self.reference_logprobs(batch)
                ref_out.append(ref.view(k, -1).T.float().cpu())
                if policy:
                    lp, _ = concatenated_logprobs(self.policy, batch,
                                                  self.hparams.logprob_chunk_size)
                    pol_out.append(lp.view(k, -1).T.float().cpu())
        finally:
            self.policy.train(was_training)
        return (torch.cat(pol_out) if policy else None), torch.cat(ref_out)

    def update_reference(self) -> None:
        """pi_ref <- pi_theta (iterative DPO, SELM). Under LoRA the policy's adapter is
        copied into a second, frozen adapter: nothing is merged into (quantized) weights."""
        self._reference_updated = True
        if self.hparams.lora is None:
            target = self.reference
            target.load_state_dict(self.policy.state_dict())
            target.requires_grad_(False)
            return
        self._add_reference_adapter()
        params = dict(self.policy.named_parameters())
        copied = 0
        with torch.no_grad():
            for name, p in params.items():
                if ".default." in name:
                    # FSDP2: the policy's adapter is sharded (DTensor); the reference adapter,
                    # added after fully_shard, is a plain tensor that each rank holds whole.
                    full = p.full_tensor() if hasattr(p, "full_tensor") else p
                    target = params[name.replace(".default.", f".{self._ref_adapter}.")]
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

    def _add_reference_adapter(self) -> None:
        """The second LoRA adapter that holds an updated reference (idempotent)."""
        if self._ref_adapter is not None:
            return
        import copy

        self._ref_adapter = _REF_ADAPTER
        config = copy.deepcopy(self.policy.peft_config["default"])
        self.policy.add_adapter(self._ref_adapter, config)
        self.policy.set_adapter("default")
        self._freeze_reference_adapter()

    def _freeze_reference_adapter(self) -> None:
        for name, p in self.policy.named_parameters():
            if f".{self._ref_adapter}." in name:
                p.requires_grad_(False)

    def _pad_token_id(self) -> int:
        config = getattr(self.policy, "config", None)
        pad = getattr(config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    # -- lean checkpoints ------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drops the frozen weights that ``configure_model`` rebuilds: the reference (from a
        path, or a copy of the initial policy, which a path or ``init_seed`` reproduces) and,
        under LoRA / QLoRA, the frozen base. Kept: trainable weights and an updated reference.

        Filtering the checkpoint, not overriding ``state_dict()``, also works under FSDP.
        """
        state = checkpoint.get("state_dict")
        if state is None:
            return
        trainable = self._trainable_keys()
        dropped = [k for k in state if self._rebuildable(k, trainable)]
        for key in dropped:
            del state[key]
        checkpoint[_CKPT_REFERENCE_UPDATED] = self._reference_updated
        log.debug("checkpoint: %d frozen tensors left out, %d kept", len(dropped), len(state))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checks the saved weights (``check_checkpoint``); loading is otherwise non-strict."""
        state = checkpoint.get("state_dict")
        if state is None or self.policy is None:
            # FSDP2: the strategy takes the weights out first, and SAILModelParallelStrategy
            # has called check_checkpoint before loading them.
            return
        self.check_checkpoint(state.keys(), checkpoint)

    def check_checkpoint(self, saved_keys, checkpoint: dict[str, Any]) -> None:
        """Restores the reference adapter if one was saved, then requires every key that
        ``on_save_checkpoint`` would keep among ``saved_keys`` (the checkpoint's weights).

        Raises:
            RuntimeError: naming the keys that are missing and cannot be rebuilt.
        """
        saved = set(saved_keys)
        # Checkpoints from before the flag: a saved reference adapter says it all the same.
        has_adapter = any(f".{_REF_ADAPTER}." in k for k in saved if k.startswith("policy."))
        self._reference_updated = bool(checkpoint.get(_CKPT_REFERENCE_UPDATED, has_adapter))
        if self._reference_updated and self.hparams.lora is not None:
            self._add_reference_adapter()  # its weights come from the checkpoint
        trainable = self._trainable_keys()
        keys = self._state_keys()
        missing = [k for k in keys if k not in saved and not self._rebuildable(k, trainable)]
        if missing:
            raise RuntimeError(f"the checkpoint lacks {len(missing)} weight(s) that cannot be "
                               f"rebuilt from the model options: {missing[:20]}")
        # Non-strict loading would drop these silently (4-bit quantization state aside).
        unexpected = [k for k in saved - set(keys) if ".weight." not in k]
        if unexpected:
            rank_zero_warn(f"checkpoint weights that the model does not have, ignored: "
                           f"{sorted(unexpected)[:20]}")

    def _rebuildable(self, key: str, trainable: set[str]) -> bool:
        """Whether ``configure_model`` recreates the weight of a state-dict key exactly."""
        if key.startswith("reference."):
            return not self._reference_updated
        if self.hparams.lora is not None and key.startswith("policy."):
            return key not in trainable and f".{_REF_ADAPTER}." not in key
        return False

    def _trainable_keys(self) -> set[str]:
        return {_clean_key(n) for n, p in self.named_parameters() if p.requires_grad}

    def _state_keys(self) -> list[str]:
        """State-dict keys of the parameters and persistent buffers, without materialising
        the state dict (which would gather sharded weights)."""
        keys = []
        for prefix, module in self.named_modules():
            skip = module._non_persistent_buffers_set
            tensors = [*module._parameters.items(),
                       *((n, b) for n, b in module._buffers.items() if n not in skip)]
            keys += [_clean_key(f"{prefix}.{n}" if prefix else n) for n, t in tensors
                     if t is not None]
        return keys

    # -- steps -----------------------------------------------------------------------------

    def _label_generator(self, batch_idx: int) -> torch.Generator:
        # Stateless: nothing to checkpoint, and no rank inherits another's stream on resume.
        key = (self.hparams.label_seed, self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)

    def on_fit_start(self) -> None:
        stats = getattr(self.trainer.datamodule, "stats", None)
        if stats and self.logger is not None:
            # Counts of kept / skipped / dropped records, so a dashboard shows what was read.
            self.logger.log_metrics({k: float(v) for k, v in stats.items()}, step=0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        lp, ref = self._forward(batch)
        n = batch["route"].shape[0]
        # The metrics (and their host syncs) only on the steps the logger writes.
        log_now = self._logging_step()
        loss, metrics = sail_loss(
            lp[:n], lp[n : 2 * n], ref[:n], ref[n : 2 * n], batch["route"], beta=hp.beta,
            coef_dp=hp.coef_dp, coef_pp=hp.coef_pp, coef_pr=hp.coef_pr,
            response_term=hp.response_term, baseline=hp.baseline,
            grad_accum=self.trainer.accumulate_grad_batches,
            generator=self._label_generator(batch_idx),
            loss_type=hp.loss_type, label_smoothing=hp.label_smoothing, metrics=log_now)
        if "bonus_mask" in batch and hp.bonus_alpha:
            bonus = exploration_bonus(lp[2 * n :], ref[2 * n :], alpha=hp.bonus_alpha,
                                      beta=hp.beta, form=hp.bonus_form)
            bonus = (bonus * batch["bonus_mask"].to(bonus.dtype)).sum() / n
            loss = loss + bonus
            if log_now:
                metrics["loss/bonus_term"] = bonus.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}. "
                "model.response_term=released_code divides by log pi(y), which nears 0 as "
                "responses shrink; lower model.lr or model.coef_*, or use score_function")
        if log_now:
            # Only on the steps the logger writes: each self.log costs about a millisecond,
            # most of a tiny model's step. Synced: under DDP the logged loss is the global
            # batch's, as with one process.
            self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
            self.log("train/rewards/accuracies", metrics.pop("rewards/accuracies"),
                     prog_bar=True, batch_size=n)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def _logging_step(self) -> bool:
        """Whether the logger writes this step: the other steps' detailed metrics would be
        computed, reduced and dropped (Lightning's per-metric bookkeeping is most of a tiny
        model's step time)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        hp = self.hparams
        lp_c, lp_r, ref_c, ref_r = self._logprobs(batch)
        loss, _ = sail_loss(lp_c, lp_r, ref_c, ref_r, torch.full_like(batch["route"], Route.DPO),
                            beta=hp.beta, loss_type=hp.loss_type,
                            label_smoothing=hp.label_smoothing, metrics=False)
        metrics = preference_metrics(lp_c, lp_r, ref_c, ref_r, beta=hp.beta)
        n = batch["route"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=n, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Norm before clipping: what a dashboard needs to see a spike.
        if not self._logging_step():
            return
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not grads:
            return
        # torch's total norm handles FSDP2's sharded (DTensor) gradients; Lightning's
        # grad_norm utility does not.
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm)

    # -- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = get_scheduler(hp.scheduler, optimizer,
                                 num_warmup_steps=int(hp.warmup_ratio * total),
                                 num_training_steps=total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _as_dict(options: Any) -> Any:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options


def _clean_key(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _validate(args: dict[str, Any]) -> None:
    """Option errors name the option, and come before any model is loaded."""
    if (args["model_name_or_path"] is None) == (args["model_config"] is None):
        raise ValueError("set exactly one of model.model_name_or_path (a hub name or folder) "
                         "and model.model_config (a config dict for a fresh model)")
    if args["model_name_or_path"] is None and args["tokenizer"] is None:
        raise ValueError("model.tokenizer is required with model.model_config")
    checks = [("loss_type", LOSS_TYPES), ("response_term", RESPONSE_TERMS),
              ("baseline", BASELINES), ("scheduler", _SCHEDULERS), ("bonus_form", BONUS_FORMS)]
    for name, allowed in checks:
        if args[name] not in allowed:
            raise ValueError(f"model.{name} must be one of {allowed}, got {args[name]!r}")
    if args["beta"] <= 0:
        raise ValueError(f"model.beta must be > 0, got {args['beta']}")
    for name in ("coef_dp", "coef_pp", "coef_pr"):
        if args[name] < 0:
            raise ValueError(f"model.{name} must be >= 0, got {args[name]}")
    if args["loss_type"] != "sigmoid" and (args["coef_dp"] or args["coef_pp"] or args["coef_pr"]):
        raise ValueError("SAIL's extra terms are derived for the sigmoid loss: set "
                         f"model.loss_type=sigmoid or the model.coef_* options to 0 "
                         f"(got loss_type={args['loss_type']!r})")
    if not 0.0 <= args["warmup_ratio"] < 1.0:
        raise ValueError(f"model.warmup_ratio must be in [0, 1), got {args['warmup_ratio']}")
    resolve_dtype(args["torch_dtype"])
    if resolve_quantization(args["quantization"]) is not None:
        if args["lora"] is None:
            raise ValueError("model.quantization (4-bit base weights) trains only LoRA adapters: "
                             "set model.lora too, or unset model.quantization")
        if args["model_name_or_path"] is None:
            raise ValueError("model.quantization quantizes weights as they are loaded: set "
                             "model.model_name_or_path (save a model_config model with "
                             "save_pretrained first) instead of model.model_config")
