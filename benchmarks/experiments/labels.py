"""The label-source axis of the comparison: who labels the online pairs, and how well.

- ``oracle``: the task's Bradley-Terry draws on the true reward, as a human would label
  (``OracleLabeller(sample=True)``; for best-of-n ranking its scores are the true reward).
- ``rm``: a reward model trained on every offline pair (the comparison's original labeller).
- ``rm_small``: a reward model trained on an eighth of the offline pairs with a fifth of
  their labels flipped: a worse learned labeller.

Each source is reported by its agreement with the true reward's order on held-out pairs of
base-policy samples (pairs whose true rewards differ; ties of a labeller count for ``a``).
"""

from __future__ import annotations

import importlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.experiments.base import read_pairs
from benchmarks.experiments.tasks import ComparisonTask, SyntheticComparison
from sail_lightning.labellers import Labeller


@dataclass(frozen=True)
class LabelSource:
    """One labeller of the online pairs.

    Attributes:
        name: the key in the results (``oracle`` for the oracle).
        description: for tables.
        fraction: share of the offline pairs a reward model trains on (None: the oracle).
        flip: share of those pairs whose label is flipped before training.
    """

    name: str
    description: str
    fraction: float | None = None
    flip: float = 0.0

    @property
    def oracle(self) -> bool:
        return self.fraction is None


LABEL_SOURCES: dict[str, LabelSource] = {
    "oracle": LabelSource("oracle", "oracle (Bradley-Terry draw on the true reward)"),
    "rm": LabelSource("rm", "reward model, all offline pairs", fraction=1.0),
    "rm_small": LabelSource("rm_small", "reward model, 1/8 of the pairs, 20% flipped",
                            fraction=0.125, flip=0.2),
}
DEFAULT_LABEL = "rm"  # the comparison's labeller before the label axis (``win_rate``)


def train_source(source: LabelSource, offline_path: str, work_dir: str, *, rm_epochs: int,
                 seed: int = 0, comparison: ComparisonTask | None = None,
                 base_dir: str | None = None) -> dict:
    """The source's reward model (trained on its share of the pairs, some flipped), or
    nothing for the oracle. Returns ``{"path"}`` (None for the oracle) and training facts."""
    if source.oracle:
        return {"path": None}
    rows = read_pairs(offline_path)
    rows = rows[: max(2, round(source.fraction * len(rows)))]
    rng = random.Random(f"label-source:{source.name}:{seed}")
    flipped = set(rng.sample(range(len(rows)), round(source.flip * len(rows))))
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i in flipped else r
            for i, r in enumerate(rows)]
    pairs_path = os.path.join(work_dir, f"pairs_{source.name}.jsonl")
    with open(pairs_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # Fewer pairs, more epochs: about as many gradient steps as the full reward model's.
    epochs = max(rm_epochs, min(4 * rm_epochs, round(rm_epochs / source.fraction)))
    comparison = comparison or SyntheticComparison()
    rm = comparison.reward_model(pairs_path, os.path.join(work_dir, f"reward_model_{source.name}"),
                                 epochs=epochs, seed=seed, base_dir=base_dir)
    return {**rm, "pairs": len(rows), "flipped": len(flipped), "epochs": epochs}


def labeller_config(source: LabelSource, rm_dir: str | None, seed: int,
                    comparison: ComparisonTask | None = None) -> dict:
    """The ``PairGenerationCallback.labeller`` of a run (class_path and init_args)."""
    if source.oracle:
        return {"class_path": (comparison or SyntheticComparison()).oracle_class(),
                "init_args": {"sample": True, "seed": seed}}
    return {"class_path": "sail_lightning.labellers.RewardModelLabeller",
            "init_args": {"name_or_path": rm_dir, "progress": False, "batch_size": 256}}


def build_labeller(source: LabelSource, rm_dir: str | None, seed: int = 0,
                   comparison: ComparisonTask | None = None) -> Labeller:
    config = labeller_config(source, rm_dir, seed, comparison)
    module, name = config["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config["init_args"])


def label_agreement(labeller: Labeller, pairs: Sequence[dict[str, str]],
                    comparison: ComparisonTask | None = None) -> float:
    """How often ``labeller`` orders held-out pairs as the true reward does (pairs whose
    true rewards differ). The prompts go as one user turn each, as the rounds pass them."""
    task = (comparison or SyntheticComparison()).task
    xs = [p["prompt"] for p in pairs]
    a, b = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    ta, tb = task.score(xs, a), task.score(xs, b)
    differ = ta != tb
    if not bool(differ.any()):
        return float("nan")
    turns = [(("user", x),) for x in xs]
    agree = labeller.label(xs, a, b, messages=turns).a_preferred == (ta > tb)
    return float(agree[differ].float().mean())


def seeded_agreement(source: LabelSource, rm_dir: str | None, pairs: Sequence[dict[str, str]],
                     comparison: ComparisonTask | None = None) -> float:
    """:func:`label_agreement` of the source, its draws seeded (the oracle's are random)."""
    torch.manual_seed(0)
    return label_agreement(build_labeller(source, rm_dir, seed=12_345, comparison=comparison),
                           pairs, comparison)
