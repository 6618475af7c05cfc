"""PreferenceDataModule: offline preference pairs, split, tokenized and routed per epoch."""

from __future__ import annotations

import hashlib
import logging
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

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
    check_epoch_scaling,
    epoch_counts,
    plan_epoch,
    plan_round,
)
from sail_lightning.data.pool import OnlinePool
from sail_lightning.data.records import (
    PreferenceRecord,
    ReadStats,
    check_reading_options,
    looks_like_path,
    read_preference_records,
    records_from_dicts,
)
from sail_lightning.data.tokenize import (
    PreferenceCollator,
    TokenizedPair,
    check_unk_rate,
    padded_length,
    tokenize_and_filter,
)
from sail_lightning.labellers import Labeller
from sail_lightning.objectives import Route

log = logging.getLogger("sail_lightning.data")

SYNTHETIC_SOURCE = "synthetic"
_BAD_RECORD_MODES = ("error", "skip")


class PreferenceDataModule(L.LightningDataModule):
    """Offline preference pairs for DPO and SAIL.

    Args:
        source: a local jsonl / jsonl.gz / parquet file or folder, an HF dataset name
            (``datasets.load_dataset``), or ``"synthetic"`` for the embedded task.
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
        _validate(locals())  # bad options fail here, before any model is loaded
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

    def _read(self, source: str, split: str, limit: int | None) -> list[PreferenceRecord]:
        hp = self.hparams
        if source == SYNTHETIC_SOURCE:
            from sail_lightning.synthetic import SyntheticTask

            rows = SyntheticTask().make_pairs(hp.num_synthetic_pairs, seed=hp.seed)
            records, stats = records_from_dicts(rows, "synthetic", fmt="prompt",
                                                on_bad_record=hp.on_bad_record)
        else:
            records, stats = read_preference_records(source, split=split, fmt=hp.format,
                                                     on_bad_record=hp.on_bad_record, limit=limit,
                                                     preference=hp.preference, columns=hp.columns)
        self._count(source, stats)
        if not records:
            raise ValueError(f"{source}: no usable preference pairs ({stats.summary()})")
        return records

    def _count(self, source: str, stats: ReadStats) -> None:
        log.info("%s: %s", source, stats.summary())
        self.stats["data/read"] = self.stats.get("data/read", 0) + stats.read
        self.stats["data/kept"] = self.stats.get("data/kept", 0) + stats.kept
        self.stats["data/skipped"] = self.stats.get("data/skipped", 0) + sum(stats.skipped.values())
        self.stats["data/dropped"] = self.stats.get("data/dropped", 0) + sum(stats.dropped.values())

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.pool_dir is None and getattr(self, "trainer", None) is not None:
            self.pool.directory = _run_dir(self.trainer, "rounds")  # new rounds go to this run
        if self.train_pairs is not None:
            return  # idempotent: Lightning may call setup once per stage
        from sail_lightning.tokenizer import build_tokenizer

        if hp.tokenizer is None:
            raise ValueError("data.tokenizer is not set (the CLI links it from model.tokenizer "
                             "or model.model_name_or_path)")
        self.tokenizer = build_tokenizer(hp.tokenizer)
        records = self._read(hp.source, hp.split, hp.limit)
        if hp.val_source:
            train, val = records, self._read(hp.val_source, hp.val_split, None)
        else:
            g = torch.Generator().manual_seed(hp.seed)
            order = torch.randperm(len(records), generator=g).tolist()
            n_val = round(hp.val_fraction * len(records))
            if hp.val_fraction > 0 and len(records) > 1:
                n_val = max(1, n_val)
            val = [records[i] for i in order[:n_val]]
            train = [records[i] for i in order[n_val:]]
        tok_args = (self.tokenizer, hp.max_prompt_length, hp.max_response_length)
        cut = ReadStats()  # pairs left identical by truncation: dropped, records kept aligned
        train, self.train_pairs = tokenize_and_filter(tok_args[0], train, *tok_args[1:], stats=cut)
        val, self.val_pairs = tokenize_and_filter(tok_args[0], val, *tok_args[1:], stats=cut)
        self.train_records = train
        self.val_records = val  # text of the held-out pairs, for judges (evaluation.py)
        self.stats["data/kept"] += cut.kept
        self.stats["data/dropped"] += sum(cut.dropped.values())
        sample = [t for r in train[:200] for t in (r.prompt, r.chosen, r.rejected)]
        self.stats["data/unk_rate"] = check_unk_rate(self.tokenizer, sample,
                                                     tokenizer_name=hp.tokenizer, source=hp.source)
        _check_oracle(self.oracle, train[:1] or val[:1], hp.source)
        self.fingerprint = _fingerprint(train)
        self.stats.update({"data/train_pairs": len(train), "data/val_pairs": len(val)})
        log.info("train pairs: %d, validation pairs: %d", len(train), len(val))
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


def _fingerprint(records: list[PreferenceRecord]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(r.prompt.encode())
        h.update(b"\0")
        h.update(r.chosen.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run_dir(trainer: L.Trainer, name: str) -> str:
    """``<trainer.log_dir>/<name>``: the run's own folder."""
    root = trainer.log_dir or trainer.default_root_dir
    version = getattr(trainer.logger, "version", None) if trainer.logger else None
    if version is not None and not os.path.basename(os.path.normpath(root)).endswith(
            str(version)):
        # Loggers whose log_dir is their shared save_dir (W&B): one folder per run, or a
        # second run would overwrite the first one's rounds.
        root = os.path.join(root, str(version))
    return os.path.join(root, name)


def _validate(args: dict) -> None:
    """Option errors name the option, and come before any model is loaded."""
    on_bad_record, online_pairs, val_fraction = (args["on_bad_record"], args["online_pairs"],
                                                 args["val_fraction"])
    mix_dp, mix_pp, mix_pr = args["mix_dp"], args["mix_pp"], args["mix_pr"]
    if on_bad_record not in _BAD_RECORD_MODES:
        raise ValueError(f"data.on_bad_record must be one of {_BAD_RECORD_MODES}, "
                         f"got {on_bad_record!r}")
    check_reading_options(args["format"], args["preference"], args["columns"], prefix="data.")
    for name, value in (("mix_dp", mix_dp), ("mix_pp", mix_pp), ("mix_pr", mix_pr)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.{name} must be in [0, 1], got {value}")
    if mix_dp + mix_pp + mix_pr > 1.0 + 1e-9:
        raise ValueError("data.mix_dp + data.mix_pp + data.mix_pr must be <= 1, got "
                         f"{mix_dp} + {mix_pp} + {mix_pr}")
    check_epoch_scaling(args["epoch_scaling"], mix_dp=mix_dp, mix_pp=mix_pp, mix_pr=mix_pr)
    if mix_pp + mix_pr >= 1.0 - 1e-9 and not online_pairs:
        raise ValueError("data.online_pairs must be set when data.mix_pp + data.mix_pr = 1 "
                         "(training on online pairs alone)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if args["length_buckets"] < 0:
        raise ValueError(f"data.length_buckets must be >= 0, got {args['length_buckets']}")
    for name in ("max_prompt_length", "max_response_length", "batch_size"):
        if args[name] < 1:
            raise ValueError(f"data.{name} must be >= 1, got {args[name]}")
    for name in ("source", "val_source"):
        path = args[name]
        if path and looks_like_path(path) and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"data.{name}: no such file or folder: {path}")


def _check_oracle(oracle: Labeller | None, records: list[PreferenceRecord], source: str) -> None:
    """An oracle that cannot score this data fails now, naming ``data.oracle``, not at the
    first round or evaluation (e.g. the synthetic task's oracle given real text)."""
    if oracle is None or not records:
        return
    r = records[0]
    try:
        oracle.score([r.prompt], [r.chosen], messages=[r.messages])
    except Exception as e:
        raise ValueError(f"data.oracle ({type(oracle).__name__}) cannot score the records of "
                         f"{source} ({r.location}: {e}); set data.oracle to this data's ground "
                         "truth, or to null (then online pairs need the callback's labeller)"
                         ) from e

