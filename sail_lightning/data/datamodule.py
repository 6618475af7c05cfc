"""PreferenceDataModule: offline preference pairs, split, tokenized and routed per epoch."""

from __future__ import annotations

import hashlib
import logging
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sail_lightning.data.records import (
    PreferenceRecord,
    ReadStats,
    read_preference_records,
    records_from_dicts,
)
from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair, tokenize_records
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
        p = self.pairs[i]
        return {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                "rejected_ids": p.rejected_ids, "route": int(self.routes[i])}


def epoch_routes(n: int, mix_dp: float, seed: int, epoch: int) -> torch.Tensor:
    """Routes of the offline pairs for one epoch: exactly ``round(mix_dp * n)`` go to DP.

    Drawn from ``(seed, epoch)`` alone, so every rank, and a resumed run, agree.
    """
    routes = torch.full((n,), int(Route.DPO), dtype=torch.long)
    k = round(mix_dp * n)
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
        format: ``auto``, ``hh`` (HH-RLHF whole dialogues) or ``prompt`` (prompt/chosen/rejected).
        val_source: a separate validation source; if unset, ``val_fraction`` of ``source``
            is held out by a seeded split.
        val_split: the split of ``val_source`` (hub datasets).
        val_fraction: held-out fraction when ``val_source`` is unset.
        max_prompt_length: prompts keep their last this many tokens.
        max_response_length: responses keep their first this many tokens (eos included).
        batch_size: pairs per training batch (per device).
        eval_batch_size: pairs per validation batch (defaults to ``batch_size``).
        mix_dp: fraction of offline pairs routed to SAIL-DP each epoch (the paper's r).
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
        val_source: str | None = None,
        val_split: str = "test",
        val_fraction: float = 0.05,
        max_prompt_length: int = 256,
        max_response_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        mix_dp: float = 0.0,
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
        if not 0.0 <= mix_dp <= 1.0:
            raise ValueError(f"data.mix_dp must be in [0, 1], got {mix_dp}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("max_prompt_length", max_prompt_length),
                            ("max_response_length", max_response_length),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        for name, path in (("source", source), ("val_source", val_source)):
            if path and _looks_local(path) and not os.path.exists(path):
                raise FileNotFoundError(f"data.{name}: no such file or folder: {path}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_pairs: list[TokenizedPair] | None = None
        self.val_pairs: list[TokenizedPair] = []
        self.stats: dict[str, int] = {}
        self._restored: dict | None = None

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
                                                     on_bad_record=hp.on_bad_record, limit=limit)
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
        self.train_pairs = tokenize_records(tok_args[0], train, *tok_args[1:])
        self.val_pairs = tokenize_records(tok_args[0], val, *tok_args[1:])
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
        hp = self.hparams
        epoch = self._epoch()
        routes = epoch_routes(len(self.train_pairs), hp.mix_dp, hp.seed, epoch)
        return DataLoader(
            PairDataset(self.train_pairs, routes),
            batch_size=hp.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(hp.seed + epoch),
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            num_workers=hp.num_workers,
        )

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
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)
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


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(
        (".jsonl", ".gz", ".json", ".parquet")
    )


def _fingerprint(records: list[PreferenceRecord]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(r.prompt.encode())
        h.update(b"\0")
        h.update(r.chosen.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
