"""Objectives against hand-derived values and independent implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_utils import SyncCounter  # the benchmark's own counter
from sail_lightning.objectives import (
    LossOptions,
    Route,
    dpo_loss,
    exploration_bonus,
    margin,
    sail_loss,
)

BETA = 0.1


def margins_to_logps(beta_h):
    """Log-probs whose DPO margin is beta_h / BETA (reference zero, rejected zero)."""
    h = torch.tensor(beta_h, dtype=torch.float64) / BETA
    zeros = torch.zeros_like(h)
    return h, zeros, zeros.clone(), zeros.clone()


def random_logps(n, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    # Sequence log-probs are negative sums: keep them away from 0 (released_code divides).
    t = [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 5) for _ in range(4)]
    lp_c, lp_r = (x.clone().requires_grad_(requires_grad) for x in t[:2])
    return lp_c, lp_r, t[2], t[3]


def test_reference_values_from_method_doc():
    lp = margins_to_logps([0.0, 1.0, 2.0])
    losses = dpo_loss(*lp, beta=BETA)
    assert torch.allclose(losses, torch.tensor([0.693147, 0.313262, 0.126928], dtype=losses.dtype),
                          atol=1e-6)
    assert losses.mean().item() == pytest.approx(0.377779, abs=1e-6)
    assert dpo_loss(*lp, beta=BETA, loss_type="hinge").mean().item() == pytest.approx(1 / 3)
    _, metrics = sail_loss(*lp, torch.zeros(3, dtype=torch.long), LossOptions(beta=BETA))
    assert metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)  # a tie is not a win
    assert metrics["rewards/margins"].item() == pytest.approx(1.0)


def test_loss_family_hand_values():
    lp = margins_to_logps([0.5, -1.0])
    z = torch.tensor([0.5, -1.0], dtype=torch.float64)
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    eps = 0.1
    cdpo = [-(1 - eps) * ls(v) - eps * ls(-v) for v in z.tolist()]
    robust = [(-(1 - eps) * ls(v) + eps * ls(-v)) / (1 - 2 * eps) for v in z.tolist()]
    h = (z / BETA).tolist()
    ipo = [(v - 1 / (2 * BETA)) ** 2 for v in h]
    torch.testing.assert_close(dpo_loss(*lp, beta=BETA, label_smoothing=eps),
                               torch.tensor(cdpo, dtype=torch.float64))
    torch.testing.assert_close(dpo_loss(*lp, beta=BETA, loss_type="robust", label_smoothing=eps),
                               torch.tensor(robust, dtype=torch.float64))
    torch.testing.assert_close(dpo_loss(*lp, beta=BETA, loss_type="ipo"),
                               torch.tensor(ipo, dtype=torch.float64))
    torch.testing.assert_close(dpo_loss(*lp, beta=BETA, loss_type="hinge"),
                               torch.tensor([0.5, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("bad", [{"loss_type": "nope"}, {"label_smoothing": 0.5}, {"beta": 0.0}])
def test_dpo_loss_rejects_bad_options(bad):
    kwargs = {"beta": BETA, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        dpo_loss(*margins_to_logps([1.0]), **kwargs)


@pytest.mark.parametrize("routes,coefs", [
    ([0, 0, 0, 0], {"coef_dp": 0.4, "coef_pp": 0.3, "coef_pr": 0.3}),  # all DPO
    ([2, 3, 2, 3], {"coef_dp": 0.4}),                                   # PP/PR, zero coefs
    ([0, 2, 3, 0], {}),
])
@pytest.mark.parametrize("form", ["score_function", "released_code"])
def test_reduces_exactly_to_dpo(routes, coefs, form):
    lp = random_logps(4)
    loss, _ = sail_loss(*lp, torch.tensor(routes), LossOptions(beta=BETA, response_term=form,
                        **coefs))
    assert torch.equal(loss, dpo_loss(*lp, beta=BETA).mean())


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def test_label_term_gradient_is_c_ell_grad_ell():
    c, n = 0.2, 6
    for route in (Route.DP, Route.PP):
        lp = random_logps(n, seed=3)
        routes = torch.full((n,), int(route))
        seed = 11
        # Same seed -> same DP flips in both calls, so the difference is the label term alone.
        coefs = {"coef_dp": c} if route == Route.DP else {"coef_pp": c}
        with_term, m = sail_loss(*lp, routes, LossOptions(beta=BETA, **coefs),
                                 generator=torch.Generator().manual_seed(seed))
        without, _ = sail_loss(*lp, routes, LossOptions(beta=BETA),
                               generator=torch.Generator().manual_seed(seed))
        g_with = grads(with_term, lp[:2])
        g_without = grads(without, lp[:2])
        # Recreate the flips independently and differentiate ell alone.
        h = (lp[0] - lp[2]) - (lp[1] - lp[3])
        if route == Route.DP:
            draws = torch.bernoulli(1 - torch.sigmoid(BETA * h.detach()),
                                    generator=torch.Generator().manual_seed(seed)).bool()
            h = torch.where(draws, -h, h)
            assert m["dp/flip_rate"].item() == pytest.approx(draws.double().mean().item())
        ell = F.logsigmoid(BETA * h)
        if route == Route.PP:
            # PP also carries the response term: remove its (independent) gradient.
            resp = -c * ell.detach() * (lp[0] + lp[1])
            g_resp = grads(resp.sum() / n, lp[:2])
        else:
            g_resp = (0, 0)
        per_example = [torch.autograd.grad(ell[i], lp[:2], retain_graph=True) for i in range(n)]
        for k in range(2):
            expected = torch.stack([ell[i].detach() * per_example[i][k] for i in range(n)]).sum(0)
            # minimised loss carries -0.5 c ell^2 / B  ->  gradient -(c / B) ell grad(ell)
            torch.testing.assert_close(g_with[k] - g_without[k] - g_resp[k], -(c / n) * expected)


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_score_function_equals_reinforce(baseline):
    n, c = 8, 0.3
    lp = random_logps(n, seed=5)
    routes = torch.tensor([3, 3, 0, 3, 0, 3, 3, 0])
    loss, m = sail_loss(*lp, routes, LossOptions(beta=BETA, coef_pr=c, baseline=baseline))
    g = grads(loss, lp[:2])
    h = (lp[0] - lp[2]) - (lp[1] - lp[3])
    ell = F.logsigmoid(BETA * h)
    is_pr = routes == 3
    b = ell.detach()[is_pr].mean() if baseline == "mean" else 0.0
    # REINFORCE: score term's gradient w.r.t. log pi(y) is -c (ell - b) / B on PR examples.
    reinforce = torch.where(is_pr, -c * (ell.detach() - b) / n, torch.zeros_like(ell))
    g_dpo = grads((-ell).mean(), lp[:2])
    for k in range(2):
        torch.testing.assert_close(g[k], g_dpo[k] + reinforce)
    expected_value = (-ell).mean() + (-c * (ell.detach() - b) * (lp[0] + lp[1]))[is_pr].sum() / n
    torch.testing.assert_close(loss, expected_value)
    assert m["loss/response_term"].item() == pytest.approx((loss - (-ell).mean()).item())


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_released_code_equals_authors_hook(grad_accum):
    n, c = 6, 0.3
    lp = random_logps(n, seed=9)
    routes = torch.tensor([3, 2, 3, 0, 3, 2])
    c_pp = 0.2
    ours, _ = sail_loss(*lp, routes, LossOptions(beta=BETA, coef_pr=c, coef_pp=c_pp,
                        response_term="released_code"), grad_accum=grad_accum)
    # Lightning divides the loss by the accumulation steps, as TRL's trainer does.
    g_ours = grads(ours / grad_accum, lp[:2])

    # The authors' plugin: the DPO loss, plus a hook on each generated response's log-prob
    # that adds -c * ell / log pi(y) to its gradient (not divided by accumulation).
    lp_c = lp[0].detach().clone().requires_grad_()
    lp_r = lp[1].detach().clone().requires_grad_()
    ell = F.logsigmoid(BETA * ((lp_c - lp[2]) - (lp_r - lp[3])))
    coef = torch.where(routes == 3, c, torch.where(routes == 2, c_pp, 0.0)).double()
    lp_c.register_hook(lambda g: g - coef * (ell / lp_c).detach())
    lp_r.register_hook(lambda g: g - coef * (ell / lp_r).detach())
    # PP rows also carry the label term -0.5 c ell^2 (mean over the batch).
    label = (-0.5 * coef * ell**2 * (routes == 2)).sum() / n
    (((-ell).mean() + label) / grad_accum).backward()
    torch.testing.assert_close(g_ours[0], lp_c.grad)
    torch.testing.assert_close(g_ours[1], lp_r.grad)


@pytest.mark.parametrize("form", ["released_code", "score_function"])
def test_zero_logprob_on_rows_without_response_term_is_not_nan(form):
    lp = margins_to_logps([1.0, 2.0])  # policy chosen log-probs 10, 20; others exactly 0
    lp_c, lp_r, ref_c, ref_r = lp
    routes = torch.tensor([0, 1])
    loss, _ = sail_loss(lp_c, lp_r, ref_c, ref_r, routes, LossOptions(beta=BETA, coef_pr=0.3,
                        response_term=form), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_dp_flip_rate_matches_policy_preference():
    n = 200_000
    for beta_h in (-1.0, 0.0, 2.0):
        lp = margins_to_logps([beta_h] * n)
        _, m = sail_loss(*lp, torch.full((n,), int(Route.DP)), LossOptions(beta=BETA,
                         coef_dp=0.4), generator=torch.Generator().manual_seed(0))
        expected = 1 - 1 / (1 + math.exp(-beta_h))
        assert m["dp/flip_rate"].item() == pytest.approx(expected, abs=0.005)


def test_dp_draws_reproducible_with_seeded_generator():
    lp = random_logps(64, seed=1, requires_grad=False)
    routes = torch.full((64,), int(Route.DP))
    run = lambda s: sail_loss(*lp, routes, LossOptions(beta=BETA, coef_dp=0.4),  # noqa: E731
                              generator=torch.Generator().manual_seed(s))[0]
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_flipped_dp_examples_use_negated_margin():
    # beta*h = 40: flip probability ~4e-18, so no flip; beta*h=-40: always flipped.
    lp = margins_to_logps([40.0, -40.0])
    loss, m = sail_loss(*lp, torch.tensor([1, 1]), LossOptions(beta=BETA),
                        generator=torch.Generator().manual_seed(0))
    assert m["dp/flip_rate"].item() == 0.5
    # After the flip both examples have margin +40, so the loss is tiny.
    assert loss.item() < 1e-12


def test_label_term_value_and_per_route_metrics():
    lp = random_logps(4, seed=2, requires_grad=False)
    routes = torch.tensor([0, 2, 2, 0])
    loss, m = sail_loss(*lp, routes, LossOptions(beta=BETA, coef_pp=0.2))
    h = (lp[0] - lp[2]) - (lp[1] - lp[3])
    ell = F.logsigmoid(BETA * h)
    label = (-0.5 * 0.2 * ell**2 * (routes == 2)).sum() / 4
    assert m["loss/label_term"].item() == pytest.approx(label.item())
    assert m["routes/pp_fraction"].item() == 0.5
    assert m["loss/route_pp"].item() == pytest.approx((-ell[1:3]).mean().item())
    assert "loss/route_pr" not in m


@pytest.mark.parametrize("bad", [{"response_term": "x"}, {"baseline": "x"}, {"coef_dp": -1.0}])
def test_sail_loss_rejects_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        sail_loss(*random_logps(2), torch.zeros(2, dtype=torch.long), LossOptions(beta=BETA, **bad))


def test_exploration_bonus_forms_and_equivalence():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0])
    selm = exploration_bonus(policy, ref, alpha=1e-3, beta=0.01, form="selm")
    torch.testing.assert_close(selm, 1e-3 * 0.01 * torch.tensor([1.0, -1.0]))
    xpo = exploration_bonus(policy, ref, alpha=1e-5, beta=0.01, form="xpo")
    torch.testing.assert_close(xpo, 1e-5 * policy.detach())
    # Same gradient when alpha_xpo = alpha_selm * beta.
    g1 = grads(selm.sum(), [policy])[0]
    g2 = grads(exploration_bonus(policy, ref, alpha=1e-5, beta=0.01, form="xpo").sum(), [policy])[0]
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="form"):
        exploration_bonus(policy, ref, alpha=1.0, beta=1.0, form="other")


@pytest.mark.parametrize("form,baseline", [("score_function", "none"),
                                           ("score_function", "mean"),
                                           ("released_code", "none")])
def test_metrics_off_gives_the_same_loss_and_gradient_without_their_syncs(form, baseline):
    route = torch.tensor([Route.DPO, Route.DP, Route.PP, Route.PR] * 3)

    def run(metrics, routes=route):
        lp = random_logps(len(routes), seed=4)
        with SyncCounter() as counter:
            loss, m = sail_loss(*lp, routes, LossOptions(beta=BETA, coef_dp=0.2, coef_pp=0.3,
                                coef_pr=0.4, response_term=form, baseline=baseline), grad_accum=2,
                                generator=torch.Generator().manual_seed(1), metrics=metrics)
        loss.backward()
        return loss, m, (lp[0].grad, lp[1].grad), counter.syncs

    loss_on, m_on, grad_on, syncs_on = run(True)
    loss_off, m_off, grad_off, syncs_off = run(False)
    assert m_off == {} and "dp/flip_rate" in m_on
    assert torch.equal(loss_on, loss_off)  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(grad_on, grad_off, strict=True))
    # The metrics' syncs (per route present, the flip rate's) are gone; the loss's own remain:
    # the DP-draw check and the mean baseline's check (its masked mean syncs no more).
    loss_syncs = 1 + (baseline == "mean")
    assert syncs_off == loss_syncs and syncs_on >= syncs_off + 10
    assert run(False, torch.full((4,), int(Route.DPO)))[3] == 1 + (baseline == "mean")


@pytest.mark.parametrize("form,baseline", [("score_function", "none"),
                                           ("score_function", "mean"),
                                           ("released_code", "none")])
@pytest.mark.parametrize("rows", [[Route.DPO, Route.DP, Route.PP, Route.PR] * 3,
                                  [Route.PR] * 8, [Route.PP, Route.PR] * 4, [Route.DPO] * 4])
def test_routes_present_removes_the_loss_syncs_bit_for_bit(form, baseline, rows):
    """Given the set of routes (as the collator records it), the loss asks the tensor
    nothing: no host sync, and the same loss and gradients bit for bit."""
    route = torch.tensor([int(r) for r in rows])

    def run(routes):
        lp = random_logps(len(rows), seed=5)
        with SyncCounter() as counter:
            loss, _ = sail_loss(*lp, route, LossOptions(beta=BETA, coef_dp=0.2, coef_pp=0.3,
                                coef_pr=0.4, response_term=form, baseline=baseline), grad_accum=2,
                                generator=torch.Generator().manual_seed(1), metrics=False,
                                routes=routes)
        loss.backward()
        return loss, [t.grad for t in lp[:2]], counter.syncs

    loss_a, grads_a, syncs_a = run(None)
    loss_b, grads_b, syncs_b = run(tuple(sorted({int(r) for r in rows})))
    assert syncs_b == 0 and syncs_a >= 1
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_mean_baseline_masked_mean_equals_indexed_mean():
    """The baseline's masked mean (no boolean indexing) is the indexed mean (to rounding)."""
    lp = random_logps(12, seed=6)
    for rows in ([Route.PR] * 12, [Route.DPO, Route.PP, Route.PR] * 4):
        route = torch.tensor([int(r) for r in rows])
        loss, _ = sail_loss(*lp, route, LossOptions(beta=BETA, coef_pp=0.3, coef_pr=0.4,
                            baseline="mean"), metrics=False)
        ell = torch.nn.functional.logsigmoid(BETA * margin(*lp)).detach()
        on = (route == Route.PP) | (route == Route.PR)
        c = torch.tensor([0.0, 0.0, 0.3, 0.4], dtype=torch.float64)[route]
        label = (-0.5 * torch.tensor([0.0, 0.0, 0.3, 0.0], dtype=torch.float64)[route]
                 * ell**2).sum() / 12
        expected = (dpo_loss(*lp, beta=BETA).mean() + label
                    + (-c * (ell - ell[on].mean()) * (lp[0] + lp[1])).sum() / 12)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-14)


def test_sail_loss_coefficients_in_the_inputs_dtype():
    # 0.3 and 0.2 are not float32 numbers: a float32 coefficient table is off by ~4e-8
    # relative, far above float64's 1e-16. The reference is plain Python float64 arithmetic.
    lp_c, lp_r, rlp_c, rlp_r = random_logps(4, seed=5, requires_grad=False)
    routes = torch.tensor([0, 2, 3, 3])
    loss, _ = sail_loss(lp_c, lp_r, rlp_c, rlp_r, routes, LossOptions(beta=BETA, coef_pp=0.2,
                        coef_pr=0.3))
    assert loss.dtype == torch.float64
    ref = 0.0
    for i in range(4):
        h = (lp_c[i].item() - rlp_c[i].item()) - (lp_r[i].item() - rlp_r[i].item())
        ell = -math.log1p(math.exp(-BETA * h))
        c_label = 0.2 if routes[i] == 2 else 0.0
        c_resp = {2: 0.2, 3: 0.3}.get(int(routes[i]), 0.0)
        ref += -ell - 0.5 * c_label * ell**2 - c_resp * ell * (lp_c[i].item() + lp_r[i].item())
    ref /= 4
    assert abs(loss.item() - ref) / abs(ref) < 1e-13


def test_rewards_accuracies_compare_in_the_inputs_dtype():
    # A strict float64 win by 1e-12 that a float32 cast would make a tie (not a win).
    lp_c = torch.tensor([-1.0 + 1e-12, -2.0], dtype=torch.float64)
    lp_r = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    assert float(lp_c[0].float()) == float(lp_r[0].float())  # the cast would tie them
    _, m = sail_loss(lp_c, lp_r, zeros, zeros.clone(), torch.zeros(2, dtype=torch.long),
                     LossOptions(beta=BETA))
    assert m["rewards/accuracies"].item() == 0.5  # one strict win, one exact tie
    assert m["rewards/margins"].dtype == torch.float64
