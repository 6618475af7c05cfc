"""PreferenceDataModule: offline preference pairs, split, tokenized and routed per epoch."""

from __future__ import annotations

import hashlib
import logging
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sail_lightning.data.pool import OnlinePair, read_round, round_path, write_round
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
    tokenize_and_filter,
)
from sail_lightning.objectives import Route

log = logging.getLogger("sail_lightning.data")

SYNTHETIC_SOURCE = "synthetic"
_BAD_RECORD_MODES = ("error", "skip")


class PairDataset(Dataset):
    """Tokenized pairs, each with its route for the current epoch."""

    def __init__(self, pairs: list[TokenizedPair], routes: torch.Tensor) -> None:
        self.pairs = pairs
        self.routes = routes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return self.pairs[i].example(int(self.routes[i]))


class EpochView(Dataset):
    """One epoch's mixture of offline and online pairs, composed on first access.

    Its length is known from the configuration alone, so the DataLoader that Lightning
    builds early (for ``estimated_stepping_batches``, before round 0 exists) stays valid;
    the contents come from the pool as it is when the epoch starts.
    """

    def __init__(self, datamodule: PreferenceDataModule, epoch: int) -> None:
        self.datamodule = datamodule
        self.epoch = epoch
        self._items: list[dict] | None = None

    def __len__(self) -> int:
        return self.datamodule.epoch_counts()["total"]

    def __getitem__(self, i: int) -> dict:
        if self._items is None:
            self._items = self.datamodule.compose_epoch(self.epoch)
        return self._items[i]


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch exactly: it skips the batches already
    trained on (Lightning saves and restores ``state_dict()`` of stateful loaders).

    Lightning does not prefetch from a loader with a length (this one has one), so at a
    checkpoint the batches yielded are the batches trained on (tests/test_resume.py checks
    that the resumed losses equal the uninterrupted run's). Same ``__init__`` as DataLoader,
    so Lightning can rebuild it with a DistributedSampler.
    """

    _skip = 0
    _yielded = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch

    def state_dict(self) -> dict:
        return {"batches_trained": self._yielded}

    def load_state_dict(self, state_dict: dict) -> None:
        self._skip = int(state_dict.get("batches_trained", 0))


def epoch_routes(
    n: int, mix_dp: float, seed: int, epoch: int, k: int | None = None
) -> torch.Tensor:
    """Routes of the offline pairs for one epoch: ``k`` (default ``round(mix_dp * n)``) to DP.

    Drawn from ``(seed, epoch)`` alone, so every rank, and a resumed run, agree.
    """
    routes = torch.full((n,), int(Route.DPO), dtype=torch.long)
    k = round(mix_dp * n) if k is None else k
    if k:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        routes[torch.randperm(n, generator=g)[:k]] = int(Route.DP)
    return routes


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
        eval_batch_size: pairs per validation batch (defaults to ``batch_size``).
        mix_dp: fraction of each epoch's examples that are offline pairs relabelled by the
            policy (SAIL-DP, the paper's r).
        mix_pp: fraction of each epoch's examples that are policy samples labelled by the
            policy (SAIL-PP, p).
        mix_pr: fraction of each epoch's examples that are policy samples labelled by the
            labeller (SAIL-PR, online / iterative DPO, SELM, XPO: g). Each epoch passes every
            offline pair once (as DPO or DP) and adds online pairs so that their share is
            ``mix_pp + mix_pr``: an epoch holds ``n_offline / (1 - mix_pp - mix_pr)``
            examples, the paper's epoch scaling. ``mix_pp + mix_pr = 1`` trains on
            online pairs alone, ``online_pairs`` per epoch.
        online_pairs: online pairs per epoch when ``mix_pp + mix_pr = 1``.
        pool_dir: where each round's pairs are written (jsonl); default:
            ``<trainer.log_dir>/rounds``.
        seed: seed of the split, the routes and the shuffling.
        on_bad_record: ``error`` (stop at the first bad record, naming file and line) or
            ``skip`` (skip, count and log bad records).
        limit: read at most this many records from ``source`` (quick experiments).
        num_synthetic_pairs: pairs made by the synthetic task when ``source="synthetic"``.
        num_workers: DataLoader workers.
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
        eval_batch_size: int | None = None,
        mix_dp: float = 0.0,
        mix_pp: float = 0.0,
        mix_pr: float = 0.0,
        online_pairs: int | None = None,
        pool_dir: str | None = None,
        seed: int = 0,
        on_bad_record: str = "error",
        limit: int | None = None,
        num_synthetic_pairs: int = 4000,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # Fail on bad options here, before any model is loaded.
        if on_bad_record not in _BAD_RECORD_MODES:
            raise ValueError(f"data.on_bad_record must be one of {_BAD_RECORD_MODES}, "
                             f"got {on_bad_record!r}")
        check_reading_options(format, preference, columns, prefix="data.")
        for name, value in (("mix_dp", mix_dp), ("mix_pp", mix_pp), ("mix_pr", mix_pr)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {value}")
        if mix_dp + mix_pp + mix_pr > 1.0 + 1e-9:
            raise ValueError("data.mix_dp + data.mix_pp + data.mix_pr must be <= 1, got "
                             f"{mix_dp} + {mix_pp} + {mix_pr}")
        if mix_pp + mix_pr >= 1.0 - 1e-9 and not online_pairs:
            raise ValueError("data.online_pairs must be set when data.mix_pp + data.mix_pr = 1 "
                             "(training on online pairs alone)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("max_prompt_length", max_prompt_length),
                            ("max_response_length", max_response_length),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        for name, path in (("source", source), ("val_source", val_source)):
            if path and looks_like_path(path) and not os.path.exists(os.path.expanduser(path)):
                raise FileNotFoundError(f"data.{name}: no such file or folder: {path}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_pairs: list[TokenizedPair] | None = None
        self.val_pairs: list[TokenizedPair] = []
        self.stats: dict[str, float] = {}
        self._restored: dict | None = None
        self.train_records: list[PreferenceRecord] = []
        self.val_records: list[PreferenceRecord] = []
        self.offline_ref: torch.Tensor | None = None  # (n_offline, 2) reference log-probs
        self.rounds: list[dict] = []  # {"round", "path", "pairs"} of every persisted round
        self.round_pairs: list[OnlinePair] = []  # the latest round, trained on this epoch

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
        if self.train_pairs is not None:
            return  # idempotent: Lightning may call setup once per stage
        from sail_lightning.synthetic import build_tokenizer

        hp = self.hparams
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
        view = EpochView(self, self._epoch())
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(view, num_replicas=trainer.world_size,
                                         rank=trainer.global_rank, shuffle=False)
        if trainer is not None and hp.mix_dp > 0 and trainer.reload_dataloaders_every_n_epochs != 1:
            log.warning("data.mix_dp > 0 without trainer.reload_dataloaders_every_n_epochs=1: "
                        "the same pairs go to SAIL-DP every epoch")
        return ResumableDataLoader(
            view,
            batch_size=hp.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            num_workers=hp.num_workers,
        )

    # -- the epoch mixture -----------------------------------------------------------------

    def epoch_counts(self) -> dict[str, int]:
        """Examples per route in every epoch (constant, so schedules can be planned)."""
        hp = self.hparams
        n_off = len(self.train_pairs or [])
        online = hp.mix_pp + hp.mix_pr
        if online >= 1.0 - 1e-9:
            total, n_off = int(hp.online_pairs), 0
        else:
            total = round(n_off / (1.0 - online))
        n_pp, n_pr = round(hp.mix_pp * total), round(hp.mix_pr * total)
        if n_off:
            n_pp = min(n_pp, total - n_off)
            n_pr = total - n_off - n_pp
        n_dp = min(round(hp.mix_dp * total), n_off)
        return {"total": n_off + n_pp + n_pr, "offline": n_off, "dp": n_dp,
                "dpo": n_off - n_dp, "pp": n_pp, "pr": n_pr}

    def online_needed(self) -> dict[str, int]:
        """Online pairs one epoch trains on, per route: what a round should generate."""
        counts = self.epoch_counts()
        return {"pp": counts["pp"], "pr": counts["pr"]}

    def compose_epoch(self, epoch: int) -> list[dict]:
        """The examples of one epoch, shuffled by ``(seed, epoch)``."""
        hp = self.hparams
        counts = self.epoch_counts()
        items: list[dict] = []
        if counts["offline"]:
            routes = epoch_routes(counts["offline"], hp.mix_dp, hp.seed, epoch, k=counts["dp"])
            for i, pair in enumerate(self.train_pairs):
                if self.offline_ref is not None:
                    ref = self.offline_ref[i].tolist()
                    pair = TokenizedPair(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids,
                                         ref[0], ref[1])
                items.append(pair.example(int(routes[i])))
        for route, key in ((Route.PP, "pp"), (Route.PR, "pr")):
            if not counts[key]:
                continue
            pool = [p for p in self.round_pairs if p.route == route]
            if not pool:
                raise RuntimeError(
                    f"data.mix_{key} > 0 but the pool has no {key.upper()} pairs: add "
                    "PairGenerationCallback to trainer.callbacks (configs/method/*.yaml do)")
            if len(pool) < counts[key]:
                log.warning("round %d has %d %s pairs for %d slots: reusing pairs",
                            self.rounds[-1]["round"], len(pool), key.upper(), counts[key])
            items.extend(pool[i % len(pool)].pair.example(route) for i in range(counts[key]))
        # A stream of its own: the route draw's permutation would put every DP row first.
        g = torch.Generator().manual_seed(hp.seed * 1_000_003 + epoch + 500_009)
        return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]

    # -- the online pool -------------------------------------------------------------------

    @property
    def current_round(self) -> int:
        return self.rounds[-1]["round"] if self.rounds else -1

    def round_prompts(self, n: int, round_index: int) -> list[int]:
        """Indices into ``train_records`` of the prompts of one round, distinct prompts first."""
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed * 7_919 + round_index)
        order = torch.randperm(len(self.train_records), generator=g).tolist()
        seen, distinct = set(), []
        for i in order:
            if self.train_records[i].prompt not in seen:
                seen.add(self.train_records[i].prompt)
                distinct.append(i)
        return [distinct[k % len(distinct)] for k in range(n)]

    def add_round(self, round_index: int, pairs: list[OnlinePair], *, write: bool = True) -> str:
        """Store a round's pairs (identical on every rank); ``write`` on one rank only."""
        pool_dir = self.hparams.pool_dir or self.pool_dir_default
        path = os.path.abspath(round_path(pool_dir, round_index))
        if write:
            write_round(path, pairs)
        self.rounds.append({"round": round_index, "path": path, "pairs": len(pairs)})
        self.round_pairs = pairs
        return path

    pool_dir_default = "rounds"  # the callback points it into the run's log dir

    def val_dataloader(self) -> DataLoader:
        routes = torch.full((len(self.val_pairs),), int(Route.DPO), dtype=torch.long)
        return DataLoader(
            PairDataset(self.val_pairs, routes),
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            shuffle=False,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    # -- checkpoint state ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "seed": self.hparams.seed,
            "train_pairs": len(self.train_pairs or []),
            "val_pairs": len(self.val_pairs),
            "fingerprint": getattr(self, "fingerprint", None),
            # Paths, not pairs: the pairs are on disk, written before this state was saved.
            "rounds": list(self.rounds),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)
        self.rounds = list(state_dict.get("rounds", []))
        self.round_pairs = read_round(self.rounds[-1]["path"]) if self.rounds else []
        if self.rounds and len(self.round_pairs) != self.rounds[-1]["pairs"]:
            raise ValueError(f"{self.rounds[-1]['path']}: {len(self.round_pairs)} pairs, the "
                             f"checkpoint recorded {self.rounds[-1]['pairs']}")
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
