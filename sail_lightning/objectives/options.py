"""``LossOptions``: the options of a run's objective, validated once.

``SAILModule`` builds it from its ``model.*`` options and hands it whole to the objective
(``sail_loss``), the exploration bonus, the non-finite guard's hints and the method check
(``MethodSpec``); none of them checks an option again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sail_lightning.common import SFT
from sail_lightning.objectives.bonus import BONUS_FORMS
from sail_lightning.objectives.losses import LOSS_TYPES, PairLoss, get_loss

RESPONSE_TERMS = ("score_function", "released_code")
BASELINES = ("none", "mean")


@dataclass(frozen=True)
class LossOptions:
    """What the training step computes; each field is the ``model.`` option of its name.

    Raises ``ValueError`` naming the option (``model.<name>``) on construction.
    """

    beta: float = 0.1
    """KL strength of DPO (the paper's beta); > 0."""
    loss_type: str = "sigmoid"
    """The per-example loss (``objectives.losses``: ``sigmoid``, ``robust``, ``hinge``,
    ``ipo``, ``sppo``), or ``sft`` (supervised fine-tuning on the chosen responses)."""
    label_smoothing: float = 0.0
    """cDPO / robust DPO epsilon, in [0, 0.5)."""
    coef_dp: float = 0.0
    """Label-term weight on SAIL-DP examples (the paper's rho); >= 0."""
    coef_pp: float = 0.0
    """Label- and response-term weight on SAIL-PP examples (pi); >= 0."""
    coef_pr: float = 0.0
    """Response-term weight on SAIL-PR examples (gamma); >= 0."""
    response_term: str = "score_function"
    """``score_function`` (the derivation) or ``released_code`` (the authors' hook)."""
    baseline: str = "none"
    """``none`` or ``mean``: the score function's variance-reducing baseline."""
    bonus_alpha: float = 0.0
    """Weight of the exploration bonus on pairs that carry a bonus response; >= 0."""
    bonus_form: str = "selm"
    """``selm`` or ``xpo``: the form of that bonus."""

    def __post_init__(self) -> None:
        for name, allowed in (("loss_type", (*LOSS_TYPES, SFT)),
                              ("response_term", RESPONSE_TERMS), ("baseline", BASELINES),
                              ("bonus_form", BONUS_FORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if not self.beta > 0:  # also refuses NaN
            raise ValueError(f"model.beta must be > 0, got {self.beta}")
        for name in ("coef_dp", "coef_pp", "coef_pr", "bonus_alpha"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.label_smoothing must be in [0, 0.5), got "
                             f"{self.label_smoothing}")
        if (self.loss is None or not self.loss.sail_terms) and (
                self.coef_dp or self.coef_pp or self.coef_pr):
            raise ValueError("SAIL's extra terms are derived for the sigmoid loss: set "
                             "model.loss_type=sigmoid or the model.coef_* options to 0 "
                             f"(got loss_type={self.loss_type!r})")

    @property
    def loss(self) -> PairLoss | None:
        """The per-example loss object; None for ``sft``."""
        return None if self.loss_type == SFT else get_loss(self.loss_type)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> LossOptions:
        """The options named by this class's fields, from e.g. a module's hparams (others
        ignored, missing ones at their defaults)."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


LOSS_OPTION_NAMES = tuple(f.name for f in fields(LossOptions))
