"""Self-play objectives: SPIN and SPPO, on the same routes, rounds and training step.

Both are configurations of the library's machinery, not new modules:

- **SPIN** (Chen et al. 2024, self-play fine-tuning): each iteration pairs the dataset's
  demonstration (chosen) with the current policy's own sample for the same prompt
  (rejected), trains the logistic loss ``-log sigmoid(beta h)`` on them (DPO's sigmoid loss,
  the reference being the previous iteration's policy), then sets ``pi_ref <- pi_theta``.
  In this library: the pair mode ``spin`` (``pair_modes/spin.py``) with
  ``update_reference=True`` and ``model.loss_type: sigmoid`` (``configs/method/spin.yaml``);
  no labeller.
- **SPPO** (Wu et al. 2024, self-play preference optimisation): ``K`` samples per prompt;
  each sample's win probability against the policy, ``P(y_k > pi) ~ mean_{j != k}
  P(y_k > y_j)``, is estimated by the labeller (:func:`win_probabilities`); the pair is the
  samples of highest and lowest estimate, carrying both estimates; the loss regresses each
  response's log-ratio on its centred win probability (:func:`sppo_loss`), then
  ``pi_ref <- pi_theta``. In this library: the pair mode ``sppo`` (``pair_modes/sppo.py``)
  and ``model.loss_type: sppo`` (``objectives.losses.SPPOLoss``, ``configs/method/sppo.yaml``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def win_probabilities(scores: Tensor) -> Tensor:
    """Each sample's estimated probability of beating the policy, from labeller scores.

    ``P(y_k > y_j) = sigmoid(s_k - s_j)`` (Bradley-Terry on the scores: a reward model's
    scores are its Bradley-Terry logits), averaged over the other samples ``j != k`` of the
    same prompt: a sample drawn from the policy stands in for the policy.

    Args:
        scores: ``(n, K)`` scores of ``K >= 2`` samples for each of ``n`` prompts.

    Returns:
        ``(n, K)`` probabilities in the scores' dtype (float32 scores give float32).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"win_probabilities needs (n, K >= 2) scores, got {tuple(scores.shape)}")
    k = scores.shape[1]
    pairwise = torch.sigmoid(scores[:, :, None] - scores[:, None, :])  # [i, a, b]: a over b
    # The diagonal holds sigmoid(0) = 1/2 for every sample: remove it, average the others.
    return (pairwise.sum(dim=2) - 0.5) / (k - 1)


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    win_chosen: Tensor | None,
    win_rejected: Tensor | None,
    *,
    beta: float,
) -> Tensor:
    """Per-example SPPO loss (squared, not logistic)::

        a = lp_c - rlp_c,  b = lp_r - rlp_r,  eta = 1 / beta
        loss = ((a - eta (P_c - 1/2))^2 + (b - eta (P_r - 1/2))^2) / 2

    The paper's target ``log(pi_{t+1}(y) / pi_t(y)) = eta (P(y > pi_t) - 1/2)``, on both
    responses of the pair, averaged. Without estimates (``win_* = None``, e.g. offline
    validation pairs) the hard labels ``P_c = 1, P_r = 0`` are used (SPPO's "hard" form).

    Returns:
        Tensor of shape ``(B,)``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    a = policy_chosen_logps - ref_chosen_logps
    b = policy_rejected_logps - ref_rejected_logps
    p_c = torch.ones_like(a) if win_chosen is None else win_chosen.to(a)
    p_r = torch.zeros_like(b) if win_rejected is None else win_rejected.to(b)
    return ((a - (p_c - 0.5) / beta) ** 2 + (b - (p_r - 0.5) / beta) ** 2) / 2
