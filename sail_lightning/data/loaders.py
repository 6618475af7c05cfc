"""Datasets and the resumable loader that the DataModule hands to Lightning."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from sail_lightning.data.tokenize import TokenizedPair

log = logging.getLogger("sail_lightning.data")


class PairDataset(Dataset):
    """Tokenized pairs, each with its route."""

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

    Args:
        length: the epoch's number of examples.
        compose: returns the epoch's examples (called once, at the first access).
    """

    def __init__(self, length: int, compose: Callable[[], list[dict]]) -> None:
        self.length = length
        self.compose = compose
        self.items: list[dict] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.items is None:
            self.items = self.compose()
        return self.items[i]


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch exactly: it skips the batches already trained on.

    The position is the DataModule's (its :class:`EpochPosition`), not this loader's:
    Lightning restores a loader's own state only when it builds the loader after the restore,
    which it does not in epoch 0 (``estimated_stepping_batches`` builds the loader before the
    checkpoint is read, and epoch 0 never rebuilds it), so a loader-held position
    was dropped there. ``start_batch`` is asked lazily, at the first batch of each pass, by
    which time any checkpoint is restored.

    Lightning does not prefetch from a loader with a length (this one has one), so at a
    checkpoint the batches yielded are the batches trained on. Same ``__init__`` as
    DataLoader, so Lightning can rebuild it with a DistributedSampler.
    """

    start_batch: Callable[[], int] | None = None  # set by the DataModule: batches to skip
    batches_yielded = 0  # batches of the current pass handed out, skipped ones included

    def __iter__(self):
        self.batches_yielded = 0
        skip = self.start_batch() if self.start_batch is not None else 0
        for batch in super().__iter__():
            self.batches_yielded += 1
            if self.batches_yielded > skip:
                yield batch

    # Lightning saves and restores a stateful loader's state; this loader stays stateful so
    # that Lightning does not warn that it cannot resume mid-epoch, but the position it
    # restores is the DataModule's (see the class docstring): restoring both would skip twice.
    def state_dict(self) -> dict:
        return {"batches_trained": self.batches_yielded}

    def load_state_dict(self, state_dict: dict) -> None:
        """Ignored: ``PreferenceDataModule.load_state_dict`` restores the position."""


class EpochPosition:
    """Where training is inside the current epoch: the epoch and the batches of it trained,
    saved in the DataModule's checkpoint state, so that a resumed run starts its epoch at
    the next batch (see :class:`ResumableDataLoader` for why the loader does not own it).

    Args:
        epoch: returns the current epoch (the trainer's, once attached).
    """

    def __init__(self, epoch: Callable[[], int]) -> None:
        self.epoch = epoch
        self.loader: ResumableDataLoader | None = None  # the latest train loader
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches) of a checkpoint

    def track(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        self.loader = loader
        loader.start_batch = self.start_batch
        return loader

    def start_batch(self) -> int:
        """Batches of the current epoch already trained: those a restored checkpoint saved in
        this epoch recorded, else 0. Asked at the first batch of each pass (after any
        restore); a restored position is used once."""
        at, self.resume_at = self.resume_at, None
        if at is not None and at[0] == self.epoch():
            log.info("resuming epoch %d at batch %d", at[0], at[1])
            return at[1]
        return 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch(),
                "batches": self.loader.batches_yielded if self.loader is not None else 0}

    def load_state_dict(self, state: dict | None) -> None:
        self.resume_at = (state["epoch"], state["batches"]) if state else None
