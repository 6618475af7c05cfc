"""The DPO family of per-example preference losses, SFT's loss and the implicit-reward
metrics (pure torch, per-sequence log-probs of shape ``(B,)``). Notation (sail-method.md)::

    lp_c, lp_r   = log pi_theta(y_c|x), log pi_theta(y_r|x)      (with grad)
    rlp_c, rlp_r = log pi_ref(y_c|x),   log pi_ref(y_r|x)        (no grad)
    h   = (lp_c - rlp_c) - (lp_r - rlp_r)
    ell = logsigmoid(beta * h)                                     (DPO loss = -ell)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_FORMS = ("sigmoid", "robust", "hinge", "ipo")


def margin(lp_c: Tensor, lp_r: Tensor, rlp_c: Tensor, rlp_r: Tensor) -> Tensor:
    """The log-ratio margin ``h = (lp_c - rlp_c) - (lp_r - rlp_r)``."""
    return (lp_c - rlp_c) - (lp_r - rlp_r)


def self_label_probability(h: Tensor, *, beta: float) -> Tensor:
    """The policy's own Bradley-Terry probability that chosen beats rejected,
    ``sigmoid(beta * h)``: the label distribution of SAIL-PP (drawn when a pair is
    generated) and SAIL-DP (redrawn in the training step).

    Computed on the CPU in float64 (``h`` detached), so that the seeded draws made from it
    are one reproducible stream whatever the device or dtype of training.
    """
    return torch.sigmoid(beta * h.detach().cpu().double())


def length_normalised(logps: Tensor, counts: Tensor) -> Tensor:
    """Per-token means of summed log-probs: IPO's log-probs (Azar et al. average over the
    response's tokens). An empty response counts as one token."""
    return logps / counts.clamp(min=1).to(logps.dtype)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-example DPO-family losses.

    With ``h`` the log-ratio margin above and ``eps = label_smoothing``:

    - ``sigmoid`` (DPO; cDPO when eps > 0): ``-(1-eps) logsig(beta h) - eps logsig(-beta h)``
    - ``robust``: ``(-(1-eps) logsig(beta h) + eps logsig(-beta h)) / (1 - 2 eps)``
    - ``hinge``: ``relu(1 - beta h)``
    - ``ipo``: ``(h - 1/(2 beta))^2``. IPO is defined on length-averaged log-probs: callers
      pass per-token means, not sums; this function uses whatever it is given.
    - ``sppo`` is not of this family: it needs each pair's win probabilities
      (``objectives.selfplay.sppo_loss``, ``objectives.losses``).

    Returns:
        Tensor of shape ``(B,)``.
    """
    if loss_type == "sppo":
        raise ValueError("loss_type='sppo' regresses on win probabilities: use "
                         "objectives.sppo_loss, or sail_loss with LossOptions(loss_type='sppo')")
    if loss_type not in DPO_FORMS:
        raise ValueError(f"loss_type must be one of {DPO_FORMS}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * h
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    return (h - 1 / (2 * beta)) ** 2



def sft_loss(logps: Tensor, counts: Tensor) -> Tensor:
    """Supervised fine-tuning: the mean negative log-likelihood per response token.

    ``L = -sum_i log pi(y_i|x_i) / sum_i |y_i|`` over the batch's responses ``y_i`` (prompt
    tokens are not predicted: their log-probs are not in ``logps``). Every token weighs the
    same, so long responses count by their length, as in the usual SFT recipes.

    Args:
        logps: ``(B,)`` summed log-probs of each response (``sequence_logprobs``).
        counts: ``(B,)`` response tokens of each.
    """
    return -logps.sum() / counts.sum().clamp(min=1)


def preference_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> dict[str, Tensor]:
    """Implicit-reward metrics, named as TRL and peers name them (dashboards compare).

    ``rewards/chosen = beta (lp_c - rlp_c)``, ``rewards/rejected`` likewise, their margin,
    ``rewards/accuracies`` (chosen strictly above rejected: a tie is not a win), and the
    policy's mean log-probs of chosen and rejected responses. Computed in the inputs' dtype:
    a float32 cast would turn a strict float64 win into a tie.
    """
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected = beta * (policy_rejected_logps - ref_rejected_logps)
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
