"""PairGenerationCallback: when to build online rounds (``rounds.py`` does how)."""

from __future__ import annotations

import importlib
import logging
import time

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from sail_lightning.common import win_rate
from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.distributed import (
    all_gather_objects,
    generation_context,
    pad_shard,
    synced_generation,
)
from sail_lightning.engines import check_engine_strategy
from sail_lightning.generation import SamplingOptions
from sail_lightning.interfaces import Labeller
from sail_lightning.pair_modes import get_pair_mode
from sail_lightning.rounds import build_round
from sail_lightning.run_folder import holds_step

log = logging.getLogger("sail_lightning.online")


def check_reference_update(strategy: L.pytorch.strategies.Strategy, lora: bool,
                           update_reference: bool) -> None:
    """Refuses a LoRA reference update under FSDP1 before any training: its adapter weights
    are flat shards outside forward, so the copy into the reference adapter cannot work
    (FSDP2's sharded tensors can be gathered; tested there)."""
    if update_reference and lora and isinstance(strategy, FSDPStrategy):
        raise ValueError("PairGenerationCallback.update_reference with model.lora is not "
                         "supported under FSDPStrategy (FSDP1): use "
                         "configs/strategy/fsdp2.yaml, or full fine-tuning (model.lora: null)")


def is_pair_generation(class_path: str) -> bool:
    """Whether a config's callback ``class_path`` names :class:`PairGenerationCallback` or
    a subclass of it (by type, not by name); False for a path that does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, PairGenerationCallback)


class PairGenerationCallback(L.Callback):
    """Refreshes the DataModule's online pairs from the policy being trained.

    Round 0 is built in ``on_fit_start`` (not when resuming: the checkpoint's round is
    restored from disk), round k+1 in ``on_train_epoch_end`` of epoch k, every
    ``every_n_epochs`` epochs: epoch e trains on round ``e // every_n_epochs``. After a
    resume, ``on_train_start`` builds the round of the resumed epoch if the checkpoint lacks
    it, as the uninterrupted run built it (docs/resume.md). Lightning re-calls
    ``train_dataloader()`` before the next epoch starts
    (``reload_dataloaders_every_n_epochs: 1``), which then holds the new round.

    Args:
        labeller: labels SAIL-PR / online pairs (and scores candidates for ``best_worst`` and
            ``selm``). Default: the DataModule's ``oracle`` (on the synthetic task, its
            Bradley-Terry oracle).
        sampling: how responses are sampled from the policy.
        pair_mode: a registered pair mode (``sail_lightning.pair_modes``, one file each):
            ``two_samples`` (SAIL, online DPO), ``best_worst`` (iterative DPO), ``selm``,
            ``xpo``, ``spin`` (demonstration vs policy sample, no labeller) or ``sppo``
            (``num_samples >= 2``, win probabilities from the labeller's scores).
        prompts_per_round: prompts sampled per round; default: the online pairs one epoch
            trains on (``data.mix_pp``, ``data.mix_pr``).
        every_n_epochs: regenerate every this many epochs.
        update_reference: pi_ref <- pi_theta before each new round (iterative DPO, SELM).
        seed: seed of sampling and label draws (offset by round and rank).
        cache_reference: compute reference log-probs of the offline pairs once per pool.
        progress: progress bars for generation and labelling.
        score_batch_size: sequences per forward when scoring pairs.
    """

    def __init__(
        self,
        labeller: Labeller | None = None,
        sampling: SamplingOptions | None = None,
        pair_mode: str = "two_samples",
        prompts_per_round: int | None = None,
        every_n_epochs: int = 1,
        update_reference: bool = False,
        seed: int = 0,
        cache_reference: bool = True,
        progress: bool = True,
        score_batch_size: int = 32,
    ) -> None:
        mode = get_pair_mode(pair_mode)  # refuses an unknown name, naming the known ones
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if prompts_per_round is not None and prompts_per_round < 0:
            raise ValueError(f"prompts_per_round must be >= 0, got {prompts_per_round}")
        if score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1, got {score_batch_size}")
        self.labeller = labeller
        self.sampling = sampling or SamplingOptions()
        self.sampling.validate()
        mode.check_sampling(self.sampling)
        self.pair_mode = pair_mode
        self.prompts_per_round = prompts_per_round
        self.every_n_epochs = every_n_epochs
        self.update_reference = update_reference
        self.seed = seed
        self.cache_reference = cache_reference
        self.progress = progress
        self.last_round_metrics: dict[str, float] = {}  # the latest round's, on rank 0
        # The global step the latest round's gen/* metrics were logged at (state_dict).
        self.last_round_step: int | None = None
        self.score_batch_size = score_batch_size

    # -- hooks -----------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_engine_strategy(trainer.strategy, self.sampling.engine,
                              "PairGenerationCallback.sampling.engine")
        if not isinstance(trainer.datamodule, PreferenceDataModule):
            raise TypeError("PairGenerationCallback needs a PreferenceDataModule")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "PairGenerationCallback needs trainer.reload_dataloaders_every_n_epochs=1 (got "
                f"{trainer.reload_dataloaders_every_n_epochs}): otherwise no epoch sees new rounds")
        check_reference_update(trainer.strategy, pl_module.hparams.get("lora") is not None,
                               self.update_reference)
        if trainer.is_global_zero:  # the rank that writes the round files
            trainer.datamodule.pool.check_writable()
        # The labellers score where the policy runs (a labeller with its own device keeps it).
        for labeller in {id(x): x for x in (self.labeller, trainer.datamodule.oracle)
                         if x is not None}.values():
            labeller.to(trainer.strategy.root_device)

    def labeller_for(self, datamodule) -> Labeller | None:
        """The labeller of online pairs: this callback's, else the data's oracle."""
        return self.labeller if self.labeller is not None else datamodule.oracle

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            return  # the round is restored with the datamodule state, after this hook
        if trainer.strategy.restore_checkpoint_after_setup:
            # FSDP and FSDP2 restore a checkpoint after this hook, and trainer.ckpt_path is
            # unset until then: start in on_train_start, after any restore (which cancels
            # it), not with the un-restored weights. Epoch 0's pairs are composed lazily, at
            # its first batch, so round 0 is still in them.
            self._start_pending = True
            return
        self._start(trainer, pl_module)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cache_offline(trainer, pl_module)
        self._round(trainer, pl_module, 0)

    _start_pending = False

    def round_for_epoch(self, epoch: int) -> int:
        """The round that ``epoch`` trains on: round 0 until the first regeneration, then
        one more every ``every_n_epochs`` epochs."""
        return epoch // self.every_n_epochs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start_pending:
            self._start_pending = False
            self._start(trainer, pl_module)
            return
        dm = trainer.datamodule
        if trainer.ckpt_path and dm.pool.current_round >= 0:
            self._log_restored_round(trainer)
        # After a resume: a round the checkpoint lacks (killed while it was generated,
        # labelled or written; a step checkpoint on an epoch's last batch, after which
        # Lightning skips that epoch's end; a finished run extended with more epochs) is
        # built now, as the uninterrupted run built it: same weights, same seed.
        missing = self.round_for_epoch(trainer.current_epoch) > dm.pool.current_round
        if missing and dm.pool.current_round >= 0:
            log.warning("the checkpoint holds round %d but epoch %d trains on round %d: "
                        "building it now", dm.pool.current_round, trainer.current_epoch,
                        self.round_for_epoch(trainer.current_epoch))
            self._next_round(trainer, pl_module, trainer.current_epoch)
            return
        if missing:
            self._start(trainer, pl_module)
            return
        if self.cache_reference and dm.pool.offline_ref is None:
            self._cache_offline(trainer, pl_module)  # after a resume

    def state_dict(self) -> dict:
        # Saved by rank 0, which holds them: a resumed run logs the restored round's gen/*
        # row again (it is restored, not generated: _log_restored_round).
        return {"last_round_metrics": dict(self.last_round_metrics),
                "last_round_step": self.last_round_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_round_metrics = dict(state_dict.get("last_round_metrics", {}))
        self.last_round_step = state_dict.get("last_round_step")

    def _log_restored_round(self, trainer: L.Trainer) -> None:
        """Logs the gen/* row of the round a resume restored, at the step it was first logged
        at, to each logger that does not hold it already: a logger continuing the run's
        folder keeps the rows before the checkpoint's step (``run_folder.RunCSVLogger``), not
        the row of a round built at that step (at an epoch's end, before its checkpoint); a
        new folder has none. A checkpoint saved before these were stored has nothing to log."""
        metrics, step = self.last_round_metrics, self.last_round_step
        if (not trainer.is_global_zero or not metrics or step is None
                or metrics.get("gen/round") != trainer.datamodule.pool.current_round):
            return
        for logger in trainer.loggers:
            if not holds_step(logger, step):
                logger.log_metrics(metrics, step=step)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict) -> None:
        # Restored: round 0 is not generated, and the reference log-probs are cached again in
        # on_train_start, from the restored reference (an updated one differs from the
        # initial model's).
        trainer.datamodule.pool.set_offline_reference(None)
        self._start_pending = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        next_epoch = trainer.current_epoch + 1
        if trainer.max_epochs not in (None, -1) and next_epoch >= trainer.max_epochs:
            return  # no epoch left to train on a new round (one more run builds it on resume)
        if self.round_for_epoch(next_epoch) <= trainer.datamodule.pool.current_round:
            return  # not a regeneration epoch, or the round was restored
        self._next_round(trainer, pl_module, next_epoch)

    def _next_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """The round for ``epoch``, after the reference update when there is one."""
        dm = trainer.datamodule
        if self.update_reference:
            pl_module.pair.update_reference()
            dm.pool.set_offline_reference(None)
        if dm.pool.offline_ref is None:
            self._cache_offline(trainer, pl_module)
        self._round(trainer, pl_module, self.round_for_epoch(epoch))

    # -- work ------------------------------------------------------------------------------

    def _cache_offline(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if not self.cache_reference or not dm.train_pairs or dm.epoch_counts().offline == 0:
            return
        idx, real = pad_shard(list(range(len(dm.train_pairs))), trainer.global_rank,
                              trainer.world_size)
        with generation_context(trainer):
            _, ref = pl_module.pair.pair_logprobs([dm.train_pairs[i] for i in idx],
                                                  policy=False, batch_size=self.score_batch_size)
        parts = all_gather_objects([(idx[:real], ref[:real])], trainer.world_size)
        out = torch.empty(len(dm.train_pairs), 2)
        for ids, values in parts:
            out[ids] = values
        dm.pool.set_offline_reference(out)

    def _round(self, trainer, pl_module, round_index: int) -> None:
        dm = trainer.datamodule
        t0 = time.perf_counter()
        plan = dm.plan_round(round_index, self.prompts_per_round)
        n = len(plan.prompt_indices)
        if n == 0:
            return
        rank, world = trainer.global_rank, trainer.world_size
        # Padded shards: under sharding every rank must run as many forwards as the others.
        mine, real = pad_shard(list(range(n)), rank, world)
        seed = self.seed + 100_003 * round_index + rank
        labeller = self.labeller_for(dm)
        if labeller is not None:
            labeller.reseed(seed)
        indices = [plan.prompt_indices[k] for k in mine]
        with generation_context(trainer):
            pairs, stats = build_round(
                pl_module.pair, dm.tokenizer, [dm.train_records[i] for i in indices],
                [dm.train_pairs[i] for i in indices], labeller, self.sampling,
                beta=pl_module.hparams.beta, pair_mode=self.pair_mode, round_index=round_index,
                routes=[plan.routes[k] for k in mine], prompt_positions=mine, seed=seed,
                progress=self.progress and trainer.is_global_zero,
                score_batch_size=self.score_batch_size,
                synced_gpus=synced_generation(trainer))
        records = [dm.train_records[i] for i in indices[:real]]
        truth = _true_rewards(dm.oracle, pairs[:real], records)
        gathered = all_gather_objects([(pairs[:real], stats, truth)], world)
        pairs = sorted((p for part, _, _ in gathered for p in part), key=lambda p: p.prompt_index)
        t_write = time.perf_counter()
        path = dm.pool.add_round(round_index, pairs, write=trainer.is_global_zero)
        if trainer.is_global_zero:
            metrics = _metrics(round_index, pairs, [s for _, s, _ in gathered],
                               [t for _, _, t in gathered if t is not None])
            done = time.perf_counter()
            metrics["gen/write_seconds"] = done - t_write
            metrics["gen/round_seconds"] = done - t0
            # Online slots of the epoch this round feeds, and how many of them repeat a pair.
            slots = dm.epoch_counts().pp + dm.epoch_counts().pr
            metrics["gen/epoch_slots"] = float(slots)
            metrics["gen/reused_slots"] = float(max(0, slots - len(pairs)))
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self.last_round_metrics = metrics  # for summary.ConsoleSummary's epoch line
            self.last_round_step = trainer.global_step
            log.info("round %d: %d pairs in %s (generation %.1fs)", round_index, len(pairs),
                     path, metrics["gen/generation_seconds"])


def _true_rewards(oracle: Labeller | None, pairs, records) -> tuple | None:
    """The oracle's scores of each pair's chosen and rejected response (each rank scores
    its own shard, with its prompts' chat turns), or None without an oracle with scores."""
    if oracle is None or not pairs:
        return None
    prompts, messages = [p.prompt for p in pairs], [r.messages for r in records]
    chosen = oracle.score(prompts, [p.chosen for p in pairs], messages=messages)
    if chosen is None:
        return None
    return chosen, oracle.score(prompts, [p.rejected for p in pairs], messages=messages)


def _metrics(round_index: int, pairs, stats: list[dict], truth: list[tuple]) -> dict[str, float]:
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    gen_s = max(s["gen_seconds"] for s in stats)  # ranks run in parallel
    metrics = {
        "gen/round": float(round_index),
        "gen/prompts": float(len(pairs)),
        "gen/mean_length": total["tokens"] / max(1, total["generated"]),
        "gen/eos_rate": total["eos"] / max(1, total["generated"]),
        "gen/tokens_per_second": total["tokens"] / max(gen_s, 1e-9),
        # The round's cost split (the slowest rank's, as ranks run in parallel); with
        # gen/write_seconds and gen/round_seconds (the whole round, gathering included).
        "gen/generation_seconds": gen_s,
        "gen/labelling_seconds": max(s["label_seconds"] for s in stats),
        "gen/reference_seconds": max(s["ref_seconds"] for s in stats),
    }
    scored = [p.scores for p in pairs if p.scores]
    if scored:
        metrics["gen/reward_mean"] = sum(s["chosen"] + s["rejected"] for s in scored) / (
            2 * len(scored))
    if truth:
        # The task's true reward, and how often the label agrees with it (ties count half).
        rc, rr = torch.cat([t[0] for t in truth]), torch.cat([t[1] for t in truth])
        metrics["gen/label_agreement"] = win_rate(rc, rr)
        metrics["gen/true_reward_mean"] = float(torch.cat([rc, rr]).mean())
    return metrics
