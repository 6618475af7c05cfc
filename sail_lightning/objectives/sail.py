"""SAIL's objective: the per-example preference loss of each pair plus SAIL's label and
response terms, picked per example by its route (pure torch; notation in ``dpo.py``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from sail_lightning.common import Route
from sail_lightning.objectives.dpo import margin, preference_metrics, self_label_probability
from sail_lightning.objectives.options import LossOptions


def _per_route(route: Tensor, dp: float, pp: float, pr: float, dtype: torch.dtype) -> Tensor:
    """Coefficient per example, picked by its route (0 for plain DPO), in ``dtype`` (the
    inputs'): a float32 table would round float64 coefficients (a relative 4e-8 error).
    Built on the route's device from Python scalars: a lookup table would be a
    host-to-device copy every step."""
    out = torch.zeros(route.shape, dtype=dtype, device=route.device)
    for r, value in ((Route.DP, dp), (Route.PP, pp), (Route.PR, pr)):
        if value:
            out = torch.where(route == r, value, out)
    return out


def _present(routes: Collection[int] | None, route: Tensor, *wanted: Route) -> bool:
    """Whether the batch holds a row of any ``wanted`` route: from ``routes`` (the set the
    data pipeline recorded, a plain Python value) when given, else from the tensor, which
    costs a host sync (a GPU stall per call)."""
    if routes is not None:
        return any(int(r) in routes for r in wanted)
    mask = route == wanted[0]
    for r in wanted[1:]:
        mask = mask | (route == r)
    return bool(mask.any())


def sail_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    route: Tensor,
    options: LossOptions,
    *,
    grad_accum: int = 1,
    generator: torch.Generator | None = None,
    metrics: bool = True,
    fields: Mapping[str, Tensor | None] | None = None,
    routes: Collection[int] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAIL objective on a batch whose examples carry their own route.

    Every example contributes the loss of ``options.loss_type`` (``objectives.losses``; DPO's
    ``-ell`` by default), and, with ``coef_* = options.coef_*``:

    - DP (SAIL-DP): the label is resampled first, ``flip ~ Bernoulli(1 - sigmoid(beta h))``
      drawn from ``generator``; where flipped ``h -> -h``. Label term ``-0.5 coef_dp ell^2``
      (not detached: its gradient is ``coef_dp * ell * grad(ell)``, the score of the label).
    - PP (SAIL-PP): label term ``-0.5 coef_pp ell^2`` (label drawn at generation time) and
      the response term with ``c = coef_pp``.
    - PR (SAIL-PR): the response term with ``c = coef_pr``.

    Response term, two forms:

    - ``score_function`` (the derivation, REINFORCE on the sampled pair)::

          -c * (ell.detach() - b) * (lp_c + lp_r)

      with ``b = 0`` (``baseline="none"``) or the mean of ``ell.detach()`` over the batch's
      PP/PR examples (``baseline="mean"``).
    - ``released_code`` (the authors' gradient hook, bit for bit)::

          grad_accum * sum_batch( -c * (ell/lp_c).detach() * lp_c - c * (ell/lp_r).detach() * lp_r )

      a sum over the batch, not divided by gradient accumulation, and of the opposite sign
      to the derivation. Use it to reproduce the paper's runs.

    DPO, DP and label terms, and the score-function term, are averaged over the whole batch
    (``sum / B``) with per-example coefficients. All routes DPO, or PP/PR routes with zero
    coefficients, give exactly ``dpo_loss(...).mean()`` (DP rows still resample labels).

    Args:
        route: LongTensor ``(B,)`` of :class:`Route` values.
        options: the objective's options, validated (``LossOptions``); the SAIL terms are
            derived for the sigmoid loss and always use ``ell``.
        grad_accum: gradient accumulation steps (only ``released_code`` uses it).
        generator: CPU generator for the DP label draws (reproducibility).
        metrics: compute the metrics. They cost host syncs (``bool(mask.any())`` per
            route); training steps that do not log pass ``False``. The loss and its
            gradient are the same either way.
        fields: the batch's per-pair fields the loss reads (``PairLoss.fields``: SPPO's
            ``win_chosen`` / ``win_rejected``, ``(B,)``); None or missing: none.
        routes: the routes present in the batch (``PreferenceCollator`` records them as
            ``batch["routes_present"]``), so that the step asks no GPU which routes it has;
            None reads them from ``route`` (a host sync per check). Giving a set that
            misses a route present in ``route`` is an error of the caller: that route's
            label draws or baseline are skipped.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached metrics named as peers name them
        (an empty dict when ``metrics`` is false).
    """
    if options.loss is None:
        raise ValueError("model.loss_type=sft has no preference loss: use objectives.sft_loss")
    beta, coef_dp, coef_pp, coef_pr = options.beta, options.coef_dp, options.coef_pp, \
        options.coef_pr
    route = route.to(device=policy_chosen_logps.device, dtype=torch.long)
    lp_c, lp_r, rlp_c, rlp_r = (
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    n = lp_c.shape[0]
    is_dp = route == Route.DP

    # SAIL-DP: resample the dataset label from the policy's own Bradley-Terry model.
    flip = None
    c_lp, r_lp, c_ref, r_ref = lp_c, lp_r, rlp_c, rlp_r
    if _present(routes, route, Route.DP):
        h0 = margin(lp_c, lp_r, rlp_c, rlp_r)
        p_flip = 1 - self_label_probability(h0, beta=beta)
        draws = torch.bernoulli(p_flip, generator=generator).to(h0.device)
        flip = is_dp & draws.bool()
        # Swapping chosen and rejected is exactly h -> -h, and keeps dpo_loss's forms valid.
        c_lp = torch.where(flip, lp_r, lp_c)
        r_lp = torch.where(flip, lp_c, lp_r)
        c_ref = torch.where(flip, rlp_r, rlp_c)
        r_ref = torch.where(flip, rlp_c, rlp_r)

    base = options.loss(c_lp, r_lp, c_ref, r_ref, fields or {}, beta=beta,
                        label_smoothing=options.label_smoothing)
    dpo_term = base.mean()
    # A term whose coefficient is 0 on every route of the batch adds exactly 0 to the loss
    # and its gradient: it is skipped (with the routes known, a batch without DP/PP/PR rows
    # is DPO's step, op for op). Unknown routes (None) skip only zero coefficients.
    label_on = _may_apply(routes, coef_dp, Route.DP) or _may_apply(routes, coef_pp, Route.PP)
    response_on = _may_apply(routes, coef_pp, Route.PP) or _may_apply(routes, coef_pr, Route.PR)
    loss = dpo_term
    ell = c_label = label_term = response = None
    if label_on or response_on or metrics:
        ell = F.logsigmoid(beta * margin(c_lp, r_lp, c_ref, r_ref))
    if label_on:
        c_label = _per_route(route, coef_dp, coef_pp, 0.0, ell.dtype)
        label_term = (-0.5 * c_label * ell**2).sum() / n
        loss = loss + label_term
    if response_on:
        response = _response_term(lp_c, lp_r, ell, route, routes, coef_pp, coef_pr,
                                  options.response_term, options.baseline, grad_accum)
        loss = loss + response

    if not metrics:
        return loss, {}
    with torch.no_grad():
        zero = torch.zeros((), dtype=ell.dtype, device=ell.device)
        c_label = torch.zeros_like(ell) if c_label is None else c_label
        return loss, _sail_metrics(lp_c, lp_r, rlp_c, rlp_r, route, flip, base, ell, c_label,
                                   dpo_term, zero if label_term is None else label_term,
                                   zero if response is None else response, beta=beta)


def _may_apply(routes: Collection[int] | None, coef: float, route: Route) -> bool:
    """Whether a term of coefficient ``coef`` on ``route`` can be non-zero in the batch."""
    return bool(coef) and (routes is None or int(route) in routes)


def _response_term(lp_c: Tensor, lp_r: Tensor, ell: Tensor, route: Tensor,
                   routes: Collection[int] | None, coef_pp: float, coef_pr: float,
                   response_term: str, baseline: str, grad_accum: int) -> Tensor:
    """:func:`sail_loss`'s response term (its docstring has both forms)."""
    n = lp_c.shape[0]
    c_resp = _per_route(route, 0.0, coef_pp, coef_pr, ell.dtype)
    if response_term == "score_function":
        ell_d = ell.detach()
        b = torch.zeros_like(ell_d)
        if baseline == "mean" and _present(routes, route, Route.PP, Route.PR):
            has_resp = (route == Route.PP) | (route == Route.PR)
            # A masked mean, not ell_d[has_resp]: boolean indexing is a host sync.
            b = (torch.where(has_resp, ell_d, 0.0).sum() / has_resp.sum()).expand_as(ell_d)
        return (-c_resp * (ell_d - b) * (lp_c + lp_r)).sum() / n
    # Rows without a response coefficient are masked out before dividing: a log-prob of
    # exactly 0 (a confident one-token response) would otherwise give 0 * inf = NaN.
    on = c_resp > 0
    one = torch.ones_like(lp_c)
    hook_c = (ell / torch.where(on, lp_c, one)).detach() * lp_c
    hook_r = (ell / torch.where(on, lp_r, one)).detach() * lp_r
    terms = torch.where(on, -c_resp * hook_c - c_resp * hook_r, torch.zeros_like(hook_c))
    return grad_accum * terms.sum()


def _sail_metrics(lp_c: Tensor, lp_r: Tensor, rlp_c: Tensor, rlp_r: Tensor, route: Tensor,
                  flip: Tensor | None, base: Tensor, ell: Tensor, c_label: Tensor,
                  dpo_term: Tensor,
                  label_term: Tensor, response: Tensor, *, beta: float) -> dict[str, Tensor]:
    """:func:`sail_loss`'s metrics, from the pieces of its loss (all detached)."""
    n = lp_c.shape[0]
    metrics = preference_metrics(lp_c, lp_r, rlp_c, rlp_r, beta=beta)
    metrics["loss/dpo_term"] = dpo_term.detach()
    metrics["loss/label_term"] = label_term.detach()
    metrics["loss/response_term"] = response.detach()
    label_rows = -0.5 * c_label * ell.detach() ** 2
    for r in Route:
        mask = route == r
        if bool(mask.any()):
            name = r.name.lower()
            metrics[f"loss/route_{name}"] = base.detach()[mask].mean()
            metrics[f"routes/{name}_fraction"] = mask.float().mean()
            if r in (Route.DP, Route.PP):
                metrics[f"loss/label_{name}"] = label_rows[mask].sum() / n
    is_dp = route == Route.DP
    if flip is not None and bool(is_dp.any()):
        metrics["dp/flip_rate"] = flip[is_dp].float().mean()
    return metrics
