"""SAILModule: policy, reference and the SAIL / DPO-family training step."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning as L
import torch

from sail_lightning.distributed import shard_fsdp2
from sail_lightning.guard import NonFiniteGuard, fused_kwargs, grad_norm, optimizer_grads
from sail_lightning.method import MethodSpec
from sail_lightning.models import (
    LoraOptions,
    QuantizationOptions,
    resolve_dtype,
    resolve_quantization,
)
from sail_lightning.objectives import (
    SFT,
    LossOptions,
    Route,
    bonus_loss,
    length_normalised,
    preference_metrics,
    sail_loss,
    sft_loss,
)
from sail_lightning.policy_pair import PolicyPair, build_policy_pair
from sail_lightning.tokenizer import build_tokenizer

_SCHEDULERS = ("cosine", "linear", "constant_with_warmup")

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
        loss_type: DPO-term form: ``sigmoid``, ``robust``, ``hinge``, ``ipo`` or ``sppo`` (SPPO's
            squared loss on the win probabilities its pairs carry, ``objectives.losses``); or
            ``sft``: supervised fine-tuning on the chosen responses of the offline pairs (loss
            on response tokens only, ``objectives.sft_loss``), with no reference model built.
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
            models that change logits after their output layer. Default (None): 256 for a
            vocabulary of 16,384 tokens or more, else 0 (``policy_pair.auto_chunk_size``).
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
        logprob_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        # The objective's options, validated once (with the others) and handed whole to the
        # objective, the guard and the method check.
        self.loss_options = _validate(locals())
        # Validation scores the preference loss alone (every pair offline, DPO's route).
        self._val_options = dataclasses.replace(self.loss_options, coef_dp=0.0, coef_pp=0.0,
                                                coef_pr=0.0, response_term="score_function",
                                                baseline="none")
        # The tokenizer the run uses, saved as such: the CLI hands the same name to the data
        # (data.tokenizer), and Lightning refuses hparams that differ between the two.
        tokenizer = tokenizer or model_name_or_path
        # Saved as dicts, as the CLI saves them: a checkpoint then loads with torch.load's
        # default weights_only=True, which refuses pickled dataclasses.
        lora, quantization = _as_dict(lora), _as_dict(quantization)
        self.save_hyperparameters()
        self.pair: PolicyPair | None = None  # built in configure_model
        self.guard = NonFiniteGuard()
        # Checkpoints omit the frozen weights that configure_model rebuilds (on_save_checkpoint);
        # on_load_checkpoint still requires every other key.
        self.strict_loading = False

    # -- models ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.pair is not None:
            return  # idempotent: Lightning may call it again (e.g. when resuming)
        self.pair = build_policy_pair(self.hparams, build_tokenizer(self.hparams.tokenizer),
                                      with_reference=self.hparams.loss_type != SFT)
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            # FSDP2 under ModelParallelStrategy: shard here, where the model is built.
            shard_fsdp2(self.pair.policy, mesh["data_parallel"])
            if self.pair.reference is not None:
                shard_fsdp2(self.pair.reference, mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # Before configure_model builds anything: the method's options must agree.
            spec = MethodSpec.from_trainer(self.trainer)
            spec.check()
            log.info("method: %s", spec.name)

    # -- lean checkpoints: the pair decides what is kept --------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leaves out the frozen weights that ``configure_model`` rebuilds
        (``PolicyPair.lean_checkpoint``); filtering the checkpoint, not overriding
        ``state_dict()``, also works under FSDP."""
        self.pair.lean_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checks the saved weights (``PolicyPair.check_checkpoint``) before the non-strict
        load. Under FSDP2 ``SAILModelParallelStrategy`` has checked them already."""
        if checkpoint.get("state_dict") is not None and self.pair is not None:
            self.pair.check_checkpoint(checkpoint["state_dict"].keys(), checkpoint)

    # -- steps -----------------------------------------------------------------------------

    def on_train_epoch_end(self) -> None:
        self.guard.check(epoch=self.current_epoch, options=self.loss_options,
                         lr=self.hparams.lr)  # a sync per epoch

    def on_fit_start(self) -> None:
        stats = getattr(self.trainer.datamodule, "stats", None)
        # Once per run: a resumed run continuing its folder has them already (same data:
        # the checkpoint's fingerprint is checked).
        if stats and self.logger is not None and not self.trainer.ckpt_path:
            # Counts of kept / skipped / dropped records, so a dashboard shows what was read.
            self.logger.log_metrics({k: float(v) for k, v in stats.items()}, step=0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        if hp.loss_type == SFT:
            return self._sft_step(batch, "train")
        lp, ref = self.logprobs(batch)
        n = batch["route"].shape[0]
        # The metrics (and their host syncs) only on the steps the logger writes.
        log_now = self.logging_step()
        opts = self.loss_options
        loss, metrics = sail_loss(
            lp[:n], lp[n : 2 * n], ref[:n], ref[n : 2 * n], batch["route"], opts,
            grad_accum=self.trainer.accumulate_grad_batches,
            generator=_label_generator(hp.label_seed, self.current_epoch, batch_idx,
                                       self.global_rank),
            metrics=log_now, fields={k: batch.get(k) for k in opts.loss.fields},
            routes=batch.get("routes_present"))
        if "bonus_mask" in batch and opts.bonus_alpha:
            bonus = bonus_loss(lp[2 * n :], ref[2 * n :], batch["bonus_mask"],
                               alpha=opts.bonus_alpha, beta=opts.beta, form=opts.bonus_form)
            loss = loss + bonus
            if log_now:
                metrics["loss/bonus_term"] = bonus.detach()
        # No host sync here: the guard keeps the verdict on the device (guard.py).
        routes = batch.get("routes_present")
        self.guard.record(self.global_step, loss,
                          [Route(int(r)).name.lower() for r in routes] if routes else (),
                          metrics if log_now else None)
        if log_now:
            # Only on the steps the logger writes: each self.log costs about a millisecond,
            # most of a tiny model's step. Synced: under DDP the logged loss is the global
            # batch's, as with one process.
            self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
            # Not on the progress bar: a name that long is cut there in an 80-column
            # terminal; the epoch's summary line (summary.ConsoleSummary) shows accuracies.
            self.log("train/rewards/accuracies", metrics.pop("rewards/accuracies"),
                     batch_size=n)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=n)
        return loss

    def logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs of every row of a batch (chosen, rejected[, bonus]),
        per-token means under IPO (``objectives.length_normalised``)."""
        lp, ref, counts = self.pair.logprobs(batch)
        if self.loss_options.loss.length_normalised:
            lp, ref = length_normalised(lp, counts), length_normalised(ref, counts)
        return lp, ref

    def logging_step(self) -> bool:
        """Whether the logger writes this step: the other steps' detailed metrics would be
        computed, reduced and dropped (Lightning's per-metric bookkeeping is most of a tiny
        model's step time)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _sft_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """SFT: the chosen responses' NLL per token; logged as ``<stage>/loss``."""
        lp, counts = self.pair.chosen_logprobs(batch)
        loss = sft_loss(lp, counts)
        if stage == "train":
            self.guard.record(self.global_step, loss, ("sft",))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=lp.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        hp = self.hparams
        if hp.loss_type == SFT:
            self._sft_step(batch, "val")
            return
        lp, ref = self.logprobs(batch)
        n = batch["route"].shape[0]
        lp_c, lp_r, ref_c, ref_r = lp[:n], lp[n : 2 * n], ref[:n], ref[n : 2 * n]
        opts = self._val_options
        loss, _ = sail_loss(lp_c, lp_r, ref_c, ref_r, torch.full_like(batch["route"], Route.DPO),
                            opts, metrics=False, fields={k: None for k in opts.loss.fields})
        metrics = preference_metrics(lp_c, lp_r, ref_c, ref_r, beta=hp.beta)
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=n, sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # No non-finite step updates weights (under 16-mixed, the GradScaler's own job). The
        # gradient norm is computed once, by the guard (before clipping: what shows a spike).
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if not scaler:
            self.guard.before_optimizer_step(optimizer, self.global_step,
                                             world_size=self.trainer.world_size)
        if not self.logging_step():
            return
        self.guard.check(epoch=self.current_epoch, options=self.loss_options, lr=self.hparams.lr)
        norm = grad_norm(optimizer_grads(optimizer)) if scaler else self.guard.grad_norm
        if norm is not None:
            self.log("train/grad_norm", norm)

    # -- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self):
        # Imported here: transformers.optimization imports bitsandbytes where installed,
        # which prints a notice about its kernels on every import of this module.
        from transformers import get_scheduler

        hp = self.hparams
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        # Fused where torch has it: it skips a non-finite step on the device (guard.py).
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay,
                                      **fused_kwargs(params, self.trainer.precision_plugin))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = get_scheduler(hp.scheduler, optimizer,
                                 num_warmup_steps=int(hp.warmup_ratio * total),
                                 num_training_steps=total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _label_generator(seed: int, epoch: int, batch_idx: int, rank: int) -> torch.Generator:
    # Stateless: nothing to checkpoint, and no rank inherits another's stream on resume.
    key = (seed, epoch, batch_idx, rank)
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)


def _as_dict(options: Any) -> Any:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options


def _validate(args: dict[str, Any]) -> LossOptions:
    """Option errors name the option, and come before any model is loaded. Returns the
    objective's options (``LossOptions``, which check themselves)."""
    if (args["model_name_or_path"] is None) == (args["model_config"] is None):
        raise ValueError("set exactly one of model.model_name_or_path (a hub name or folder) "
                         "and model.model_config (a config dict for a fresh model)")
    if args["model_name_or_path"] is None and args["tokenizer"] is None:
        raise ValueError("model.tokenizer is required with model.model_config")
    if args["scheduler"] not in _SCHEDULERS:
        raise ValueError(f"model.scheduler must be one of {_SCHEDULERS}, got "
                         f"{args['scheduler']!r}")
    options = LossOptions.from_mapping(args)
    for name in ("weight_decay", "logprob_chunk_size"):
        if args[name] is None and name == "logprob_chunk_size":
            continue  # chosen from the vocabulary once the model is built
        if not args[name] >= 0:  # also refuses NaN
            raise ValueError(f"model.{name} must be >= 0, got {args[name]}")
    if not args["lr"] > 0:  # also refuses NaN
        raise ValueError(f"model.lr must be > 0, got {args['lr']}")
    if args["loss_type"] == SFT and args["ref_model_name_or_path"]:
        raise ValueError("model.loss_type=sft trains without a reference: unset "
                         "model.ref_model_name_or_path")
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
    return options
