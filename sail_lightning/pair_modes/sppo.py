"""``sppo`` (SPPO, Wu et al. 2024): ``num_samples >= 2`` policy samples per prompt, each
one's win probability against the others estimated from the labeller's scores
(``objectives.win_probabilities``); the highest and lowest form the pair and carry their
estimates (``win_chosen``, ``win_rejected``), which SPPO's loss (``model.loss_type: sppo``)
regresses on."""

from __future__ import annotations

from torch import Tensor

from sail_lightning.objectives.selfplay import win_probabilities
from sail_lightning.pair_modes.base import register
from sail_lightning.pair_modes.best_worst import BestWorst


@register
class SPPO(BestWorst):
    name = "sppo"
    method = "sppo"
    min_samples = 2
    pair_fields = ("win_chosen", "win_rejected")
    loss_types = ("sppo",)

    def rank(self, scores: Tensor) -> Tensor:
        return win_probabilities(scores[None].double())[0]

    def fields(self, rank: Tensor, best: int, worst: int) -> dict[str, float]:
        return {"win_chosen": float(rank[best]), "win_rejected": float(rank[worst])}
