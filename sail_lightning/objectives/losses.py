"""The per-example preference losses, each one object registered by ``model.loss_type``.

A loss maps a batch's per-sequence log-probs ``(B,)`` of policy and reference, chosen and
rejected, and the per-pair fields its pairs carry (``fields``), to ``(B,)`` losses. Its
class attributes are its rules, which the module (``_validate``) and ``MethodSpec`` ask:

- ``fields``: per-pair fields it reads; only a pair mode whose ``pair_fields`` holds them
  makes its pairs (SPPO's win probabilities).
- ``sail_terms``: SAIL's label and response terms are derived for it (the sigmoid loss).
- ``length_normalised``: it is defined on per-token mean log-probs (IPO).

Adding a loss: a ``PairLoss`` subclass decorated with ``@register_loss`` (imported by
``objectives/__init__.py``), and a config that names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from sail_lightning.objectives.dpo import DPO_FORMS, dpo_loss
from sail_lightning.objectives.selfplay import sppo_loss

Fields = Mapping[str, Tensor | None]


class PairLoss:
    """One ``model.loss_type``: ``loss(lp_c, lp_r, rlp_c, rlp_r, fields, beta=...,
    label_smoothing=...) -> (B,)``."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]] = ()
    sail_terms: ClassVar[bool] = False
    length_normalised: ClassVar[bool] = False

    def __call__(self, lp_c: Tensor, lp_r: Tensor, rlp_c: Tensor, rlp_r: Tensor,
                 fields: Fields, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
        raise NotImplementedError


LOSSES: dict[str, PairLoss] = {}


def register_loss(loss: PairLoss) -> PairLoss:
    """Registers a loss object under its ``name``."""
    if loss.name in LOSSES:
        raise ValueError(f"loss {loss.name!r} is registered twice")
    LOSSES[loss.name] = loss
    return loss


def get_loss(name: str) -> PairLoss:
    """The loss registered as ``name``; ValueError naming the known ones otherwise."""
    if name not in LOSSES:
        raise ValueError(f"loss_type must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name]


class DPOFamily(PairLoss):
    """One form of :func:`~sail_lightning.objectives.dpo.dpo_loss` (sigmoid, robust, hinge,
    IPO)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sail_terms = name == "sigmoid"
        self.length_normalised = name == "ipo"

    def __call__(self, lp_c: Tensor, lp_r: Tensor, rlp_c: Tensor, rlp_r: Tensor,
                 fields: Fields, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
        return dpo_loss(lp_c, lp_r, rlp_c, rlp_r, beta=beta, loss_type=self.name,
                        label_smoothing=label_smoothing)


class SPPOLoss(PairLoss):
    """SPPO's squared loss on each pair's win probabilities (``selfplay.sppo_loss``)."""

    name = "sppo"
    fields = ("win_chosen", "win_rejected")

    def __call__(self, lp_c: Tensor, lp_r: Tensor, rlp_c: Tensor, rlp_r: Tensor,
                 fields: Fields, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
        return sppo_loss(lp_c, lp_r, rlp_c, rlp_r, fields.get("win_chosen"),
                         fields.get("win_rejected"), beta=beta)


for _form in DPO_FORMS:
    register_loss(DPOFamily(_form))
register_loss(SPPOLoss())

LOSS_TYPES = tuple(LOSSES)
