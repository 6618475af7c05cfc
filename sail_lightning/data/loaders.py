"""Datasets and the resumable loader that the DataModule hands to Lightning."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from sail_lightning.data.tokenize import TokenizedPair


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
    """A DataLoader that Lightning resumes mid-epoch exactly: it skips the batches already
    trained on (Lightning saves and restores ``state_dict()`` of stateful loaders).

    Lightning does not prefetch from a loader with a length (this one has one), so at a
    checkpoint the batches yielded are the batches trained on. Same ``__init__`` as
    DataLoader, so Lightning can rebuild it with a DistributedSampler.
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
