"""PreferenceDataModule: offline preference pairs, split, tokenized and routed per epoch."""

from __future__ import annotations

import logging
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sail_lightning.common import Route
from sail_lightning.data.loaders import (
    EpochPosition,
    EpochView,
    PairDataset,
    ResumableDataLoader,
)
from sail_lightning.data.mixture import (
    EpochCounts,
    RoundPlan,
    bucket_by_length,
    epoch_counts,
    plan_epoch,
    plan_round,
)
from sail_lightning.data.pool import OnlinePool
from sail_lightning.data.prepare import SYNTHETIC_SOURCE, check_options, prepare_pairs
from sail_lightning.data.records import PreferenceRecord
from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair, padded_length
from sail_lightning.interfaces import Labeller
from sail_lightning.run_folder import run_dir

log = logging.getLogger("sail_lightning.data")



class PreferenceDataModule(L.LightningDataModule):
    """Offline preference pairs for DPO and SAIL.

    Args:
        source: a local jsonl / jsonl.gz / parquet file or folder, an HF dataset name
            (``datasets.load_dataset``), ``"synthetic"`` for the embedded task, or
            ``"instructions"`` (``"instructions:<seed>"``) for the instructions task's
            training prompts (``sail_lightning.instructions``; its held-out prompts are then
            the validation set unless ``val_source`` is set).
        tokenizer: tokenizer name or path (``"synthetic"`` for the embedded task's). Under
            the CLI it is linked from ``model.tokenizer``.
        split: the split to read from a hub dataset.
        format: ``auto``, ``hh`` (HH-RLHF whole dialogues), ``prompt`` (prompt/chosen/rejected)
            or ``pku`` (PKU-SafeRLHF: prompt, response_0, response_1 and their labels).
        preference: ``better`` or ``safer``: which PKU-SafeRLHF label picks the chosen response.
        columns: read fields from other columns, e.g. ``{prompt: question, chosen: good,
            rejected: bad}`` (fields: prompt, chosen, rejected, response_0, response_1,
            better_response_id, safer_response_id); applies to ``source`` and ``val_source``.
        val_source: a separate validation source; if unset, ``val_fraction`` of ``source``
            is held out by a seeded split.
        val_split: the split of ``val_source`` (hub datasets).
        val_fraction: held-out fraction when ``val_source`` is unset.
        max_prompt_length: prompts keep their last this many tokens.
        max_response_length: responses keep their first this many tokens (eos included).
        batch_size: pairs per training batch (per device).
        length_buckets: 0 (off) or k: batches of similar length, sorted within windows of k
            batches of the shuffled epoch (``data.mixture.bucket_by_length``); less padding.
        eval_batch_size: pairs per validation batch (defaults to ``batch_size``).
        mix_dp: fraction of each epoch's examples that are offline pairs relabelled by the
            policy (SAIL-DP, the paper's r).
        mix_pp: fraction of each epoch's examples that are policy samples labelled by the
            policy (SAIL-PP, p).
        mix_pr: fraction of each epoch's examples that are policy samples labelled by the
            labeller (SAIL-PR, online / iterative DPO, SELM, XPO: g). ``mix_pp + mix_pr = 1``
            trains on online pairs alone, ``online_pairs`` per epoch.
        online_pairs: online pairs per epoch when ``mix_pp + mix_pr = 1``.
        epoch_scaling: the epoch's length with offline pairs (``data.mixture``).
            ``dpo_updates`` (default, the authors' released pipeline): every offline pair
            passes once as plain DPO, as in offline DPO's epoch, and the DP, PP and PR
            examples come on top: ``n_offline / (1 - r - p - g)`` examples, DP ones being
            extra passes over offline pairs. ``offline_once``: every offline pair passes
            once, as DPO or DP, plus online pairs: ``n_offline / (1 - p - g)`` examples.
            They differ only when ``mix_dp > 0``.
        pool_dir: where each round's pairs are written (jsonl); default:
            ``<trainer.log_dir>/rounds``.
        seed: seed of the split, the routes and the shuffling.
        on_bad_record: ``error`` (stop at the first bad record, naming file and line) or
            ``skip`` (skip, count and log bad records).
        limit: read at most this many records from ``source`` (quick experiments).
        num_synthetic_pairs: pairs made by the synthetic task when ``source="synthetic"``.
        num_workers: DataLoader workers.
        oracle: the task's ground truth, a labeller whose scores are the true reward (the
            synthetic task's ``sail_lightning.synthetic.OracleLabeller``, or a gold reward
            model). It labels online pairs when ``PairGenerationCallback`` names no labeller,
            judges ``EvaluationCallback`` when it names no judge, and scores each round
            (``gen/true_reward_mean``, ``gen/label_agreement``).
    """

    def __init__(
        self,
        source: str = SYNTHETIC_SOURCE,
        tokenizer: str | None = None,
        split: str = "train",
        format: str = "auto",
        preference: str = "better",
        columns: dict[str, str] | None = None,
        val_source: str | None = None,
        val_split: str = "test",
        val_fraction: float = 0.05,
        max_prompt_length: int = 256,
        max_response_length: int = 256,
        batch_size: int = 8,
        length_buckets: int = 0,
        eval_batch_size: int | None = None,
        mix_dp: float = 0.0,
        mix_pp: float = 0.0,
        mix_pr: float = 0.0,
        online_pairs: int | None = None,
        epoch_scaling: str = "dpo_updates",
        pool_dir: str | None = None,
        seed: int = 0,
        on_bad_record: str = "error",
        limit: int | None = None,
        num_synthetic_pairs: int = 4000,
        num_workers: int = 0,
        oracle: Labeller | None = None,
    ) -> None:
        super().__init__()
        check_options(locals())  # bad options fail here, before any model is loaded
        # The oracle is an object: a checkpoint's hparams must load with weights_only=True.
        self.save_hyperparameters(ignore=["oracle"])
        self.oracle = oracle
        self.tokenizer = None
        self.train_pairs: list[TokenizedPair] | None = None
        self.val_pairs: list[TokenizedPair] = []
        self.stats: dict[str, float] = {}
        self._restored: dict | None = None
        self.position = EpochPosition(self._epoch)  # saved: a resume starts at its batch
        self.train_records: list[PreferenceRecord] = []
        self.val_records: list[PreferenceRecord] = []
        self.pool = OnlinePool(pool_dir or "rounds")

    # -- reading ---------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.pool_dir is None and getattr(self, "trainer", None) is not None:
            self.pool.directory = _run_dir(self.trainer, "rounds")  # new rounds go to this run
        if self.train_pairs is not None:
            return  # idempotent: Lightning may call setup once per stage
        data = prepare_pairs(hp, self.oracle)  # read, split, tokenize, count, check
        self.tokenizer, self.stats, self.fingerprint = data.tokenizer, data.stats, data.fingerprint
        self.train_records, self.val_records = data.train_records, data.val_records
        self.train_pairs, self.val_pairs = data.train_pairs, data.val_pairs
        counts = self.epoch_counts()
        if counts.offline and counts.total > 3 * counts.pairs:
            # dpo_updates puts every offline pair in as plain DPO and the shares on top: a
            # large mix_dp + mix_pp + mix_pr makes epochs many times the data (a sweep's corner).
            log.warning("an epoch holds %d examples, %.1fx the %d offline pairs "
                        "(data.epoch_scaling=%s with data.mix_dp + mix_pp + mix_pr = %.2f)",
                        counts.total, counts.total / counts.pairs, counts.pairs,
                        hp.epoch_scaling, hp.mix_dp + hp.mix_pp + hp.mix_pr)
        if self._restored is not None:
            self._check_restored()

    # -- loaders ---------------------------------------------------------------------------

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        # Cheap and idempotent: Lightning calls it once per epoch (and twice on resume).
        # The view shuffles itself; under DDP our own sampler (no second shuffle: Lightning's
        # would reshuffle) gives rank r the rows r, r+W, ...: a global batch is the
        # one-process batch of the same size.
        hp = self.hparams
        trainer = getattr(self, "trainer", None)
        epoch = self._epoch()
        view = EpochView(self.epoch_counts().total, lambda: self.compose_epoch(epoch))
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(view, num_replicas=trainer.world_size,
                                         rank=trainer.global_rank, shuffle=False)
        if trainer is not None and hp.mix_dp > 0 and trainer.reload_dataloaders_every_n_epochs != 1:
            log.warning("data.mix_dp > 0 without trainer.reload_dataloaders_every_n_epochs=1: "
                        "the same pairs go to SAIL-DP every epoch")
        return self.position.track(ResumableDataLoader(
            view,
            batch_size=hp.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            num_workers=hp.num_workers,
        ))

    def val_dataloader(self) -> DataLoader:
        routes = torch.full((len(self.val_pairs),), int(Route.DPO), dtype=torch.long)
        return DataLoader(
            PairDataset(self.val_pairs, routes),
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            shuffle=False,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    # -- the epoch mixture and the online rounds -------------------------------------------

    def epoch_counts(self) -> EpochCounts:
        """Examples per route in every epoch (``data.mixture.epoch_counts``)."""
        hp = self.hparams
        return epoch_counts(len(self.train_pairs or []), mix_dp=hp.mix_dp, mix_pp=hp.mix_pp,
                            mix_pr=hp.mix_pr, online_pairs=hp.online_pairs,
                            scaling=hp.epoch_scaling)

    def compose_epoch(self, epoch: int) -> list[dict]:
        """The examples of one epoch (``data.mixture.plan_epoch``), with the offline pairs'
        cached reference log-probs when the pool holds them."""
        hp, pool = self.hparams, self.pool
        plan = plan_epoch(self.epoch_counts(), [p.route for p in pool.pairs], mix_dp=hp.mix_dp,
                          seed=hp.seed, epoch=epoch, round_index=pool.current_round)
        items = pool.examples(plan, self.train_pairs)
        if hp.length_buckets:  # batches of similar length: less padding
            world = self.trainer.world_size if getattr(self, "trainer", None) else 1
            items = [items[i] for i in bucket_by_length(
                [padded_length(x) for x in items], hp.batch_size * world, hp.length_buckets,
                seed=hp.seed, epoch=epoch)]
        return items

    def plan_round(self, round_index: int, prompts_per_round: int | None = None) -> RoundPlan:
        """The prompts (indices into ``train_records``) and routes of one round."""
        return plan_round(self.epoch_counts(), [r.prompt for r in self.train_records],
                          seed=self.hparams.seed, round_index=round_index,
                          prompts_per_round=prompts_per_round)

    # -- checkpoint state ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "seed": self.hparams.seed,
            "train_pairs": len(self.train_pairs or []),
            "val_pairs": len(self.val_pairs),
            "fingerprint": getattr(self, "fingerprint", None),
            "position": self.position.state_dict(),
            **self.pool.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)
        self.position.load_state_dict(state_dict.get("position"))
        self.pool.load_state_dict(state_dict)
        if self.train_pairs is not None:
            self._check_restored()

    def _check_restored(self) -> None:
        saved = self._restored
        if saved.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                "the checkpoint was trained on other data: its training pairs "
                f"({saved.get('train_pairs')}, fingerprint {saved.get('fingerprint')}) differ from "
                f"data.source={self.hparams.source!r} with data.seed={self.hparams.seed} "
                f"({len(self.train_pairs)} pairs, fingerprint {self.fingerprint})"
            )


def _run_dir(trainer: L.Trainer, name: str) -> str:
    """``<run folder>/<name>``: the run's own folder, its checkpoints' (``run_folder.run_dir``:
    for W&B ``<save_dir>/<project>/<run id>``, so a second run does not overwrite the
    first one's rounds)."""

    return os.path.join(run_dir(trainer), name)


