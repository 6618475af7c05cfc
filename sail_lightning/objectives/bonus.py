"""SELM's and XPO's exploration bonuses (pure torch, per-sequence log-probs ``(B,)``)."""

from __future__ import annotations

from torch import Tensor

BONUS_FORMS = ("selm", "xpo")


def bonus_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    *,
    alpha: float,
    beta: float,
    form: str = "selm",
) -> Tensor:
    """The exploration bonus of a batch: :func:`exploration_bonus` summed over the examples
    that carry a bonus response (``mask``) and divided by the batch size, as the other terms
    are averaged over the whole batch."""
    bonus = exploration_bonus(policy_logps, ref_logps, alpha=alpha, beta=beta, form=form)
    return (bonus * mask.to(bonus.dtype)).sum() / mask.shape[0]


def exploration_bonus(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    alpha: float,
    beta: float,
    form: str = "selm",
) -> Tensor:
    """Optimism bonus added to the loss, per example.

    - ``selm`` (SELM): ``alpha * beta * (log pi_theta(y_ref) - log pi_ref(y_ref))``
    - ``xpo`` (XPO): ``alpha * log pi_theta(y~)``, ``y~`` sampled from the reference.

    Both have the same gradient when ``alpha_xpo = alpha_selm * beta``.
    """
    if form == "selm":
        return alpha * beta * (policy_logps - ref_logps)
    if form == "xpo":
        return alpha * policy_logps
    raise ValueError(f"form must be one of {BONUS_FORMS}, got {form!r}")
