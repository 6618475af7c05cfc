"""Preference objectives (pure torch, no Lightning; every function takes per-sequence
log-probability tensors of shape ``(B,)`` and is unit-tested against hand-derived values):

- ``dpo``: the DPO family (sigmoid, robust, hinge, IPO), SFT's loss, implicit-reward metrics.
- ``selfplay``: SPPO's loss and win probabilities (SPIN trains the sigmoid loss).
- ``bonus``: SELM's and XPO's exploration bonuses.
- ``losses``: each ``model.loss_type`` as one registered object.
- ``options``: ``LossOptions``, the objective's options, validated once.
- ``sail``: SAIL's objective, the per-example loss plus the terms each route adds.
"""

from sail_lightning.common import SFT, Route
from sail_lightning.objectives.bonus import BONUS_FORMS, bonus_loss, exploration_bonus
from sail_lightning.objectives.dpo import (
    DPO_FORMS,
    dpo_loss,
    length_normalised,
    margin,
    preference_metrics,
    self_label_probability,
    sft_loss,
)
from sail_lightning.objectives.losses import LOSS_TYPES, LOSSES, PairLoss, get_loss, register_loss
from sail_lightning.objectives.options import BASELINES, RESPONSE_TERMS, LossOptions
from sail_lightning.objectives.sail import sail_loss
from sail_lightning.objectives.selfplay import sppo_loss, win_probabilities

__all__ = [
    "BASELINES", "BONUS_FORMS", "DPO_FORMS", "LOSSES", "LOSS_TYPES", "RESPONSE_TERMS", "SFT",
    "LossOptions", "PairLoss", "Route", "bonus_loss", "dpo_loss", "exploration_bonus", "get_loss",
    "length_normalised", "margin", "preference_metrics", "register_loss", "sail_loss",
    "self_label_probability", "sft_loss", "sppo_loss", "win_probabilities",
]
