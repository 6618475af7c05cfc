"""The epoch mixture as pure plans: counts per route, offline routes, epoch and round plans."""

import pytest
import torch

from sail_lightning.common import Route
from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.data.mixture import (
    OFFLINE,
    ONLINE,
    EpochCounts,
    epoch_counts,
    epoch_routes,
    epoch_total,
    offline_pairs_for,
    plan_epoch,
    plan_round,
)


def test_epoch_counts_offline_once_pass_each_offline_pair_once():
    c = epoch_counts(108, mix_dp=0.2, mix_pp=0.1, mix_pr=0.3, scaling="offline_once")
    assert c.offline == 108 and c.total == round(108 / 0.6) == 180
    assert c.pp == round(0.1 * c.total) and c.pp + c.pr + 108 == c.total
    assert c.dp == round(0.2 * c.total) and c.dpo == 108 - c.dp and c.online == c.pp + c.pr
    only = epoch_counts(108, mix_dp=0.0, mix_pp=0.0, mix_pr=1.0, online_pairs=50)
    assert only == EpochCounts(total=50, offline=0, dp=0, dpo=0, pp=0, pr=50, pairs=0)


def test_epoch_counts_dpo_updates_by_hand():
    # The authors' scaling: 60 plain-DPO updates (as offline DPO's epoch), and an epoch of
    # 60 / (1 - 0.2 - 0.1 - 0.3) = 150 examples: 30 DP, 15 PP, the rest (45) PR.
    c = epoch_counts(60, mix_dp=0.2, mix_pp=0.1, mix_pr=0.3)
    assert c == EpochCounts(total=150, offline=90, dp=30, dpo=60, pp=15, pr=45, pairs=60)
    # Today's scaling on the same data: 60 / (1 - 0.4) = 100 examples, 20 of the 60 pairs DP.
    once = epoch_counts(60, mix_dp=0.2, mix_pp=0.1, mix_pr=0.3, scaling="offline_once")
    assert once == EpochCounts(total=100, offline=60, dp=20, dpo=40, pp=10, pr=30, pairs=60)
    # SAIL-DP's defaults (r = 0.4): 100 DPO updates + 67 DP passes; offline_once: 60 + 40.
    dp = epoch_counts(100, mix_dp=0.4, mix_pp=0.0, mix_pr=0.0)
    assert (dp.total, dp.dpo, dp.dp) == (167, 100, 67)
    assert epoch_counts(100, mix_dp=0.4, mix_pp=0, mix_pr=0, scaling="offline_once") == \
        EpochCounts(total=100, offline=100, dp=40, dpo=60, pp=0, pr=0, pairs=100)
    # Without DP both scalings agree (the quickstart: SAIL-PR, g = 0.3).
    for n in (7, 100, 3600):
        assert epoch_counts(n, mix_dp=0, mix_pp=0, mix_pr=0.3) == epoch_counts(
            n, mix_dp=0, mix_pp=0, mix_pr=0.3, scaling="offline_once")
    assert epoch_counts(3600, mix_dp=0, mix_pp=0, mix_pr=0.3).total == 5143
    assert epoch_total(60, mix_dp=0.2, mix_pp=0.1, mix_pr=0.3) == 150
    assert offline_pairs_for(150, mix_dp=0.2, mix_pp=0.1, mix_pr=0.3) == 60
    assert offline_pairs_for(100, mix_dp=0.2, mix_pp=0.1, mix_pr=0.3,
                             scaling="offline_once") == 60


def test_epoch_scaling_is_validated():
    with pytest.raises(ValueError, match="data.epoch_scaling must be one of"):
        epoch_counts(10, mix_dp=0.0, mix_pp=0.0, mix_pr=0.0, scaling="paper")
    with pytest.raises(ValueError, match="epoch_scaling=dpo_updates.*offline_once"):
        PreferenceDataModule(mix_dp=0.5, mix_pr=0.5)
    PreferenceDataModule(mix_dp=0.5, mix_pr=0.5, epoch_scaling="offline_once")


def test_plan_epoch_dpo_updates_passes_every_pair_as_dpo_plus_dp_passes():
    counts = epoch_counts(10, mix_dp=0.3, mix_pp=0.2, mix_pr=0.3)  # 10 / 0.2 = 50
    assert (counts.total, counts.dpo, counts.dp, counts.pp, counts.pr) == (50, 10, 15, 10, 15)
    online_routes = [int(Route.PP)] * 10 + [int(Route.PR)] * 15
    plan = plan_epoch(counts, online_routes, mix_dp=0.3, seed=1, epoch=2)
    assert len(plan) == 50
    dpo = sorted(i for kind, i, r in plan if kind == OFFLINE and r == Route.DPO)
    assert dpo == list(range(10))
    dp = sorted(i for kind, i, r in plan if kind == OFFLINE and r == Route.DP)
    assert len(dp) == 15 and set(dp) == set(range(10))  # all 10 once, 5 of them twice
    assert plan == plan_epoch(counts, online_routes, mix_dp=0.3, seed=1, epoch=2)


def test_epoch_routes_exact_fraction_reproducible_and_new_each_epoch():
    r0 = epoch_routes(1000, 0.4, seed=0, epoch=0)
    assert int((r0 == Route.DP).sum()) == 400 and int((r0 == Route.DPO).sum()) == 600
    assert torch.equal(r0, epoch_routes(1000, 0.4, seed=0, epoch=0))
    assert not torch.equal(r0, epoch_routes(1000, 0.4, seed=0, epoch=1))
    assert int((epoch_routes(10, 0.0, 0, 0) == Route.DPO).sum()) == 10


def test_plan_epoch_holds_every_offline_pair_once_and_fills_the_online_slots():
    counts = epoch_counts(10, mix_dp=0.3, mix_pp=0.2, mix_pr=0.3, scaling="offline_once")
    online_routes = [int(Route.PP)] * 2 + [int(Route.PR)] * 3  # a round smaller than its slots
    plan = plan_epoch(counts, online_routes, mix_dp=0.3, seed=1, epoch=2)
    assert len(plan) == counts.total
    offline = sorted(i for kind, i, _ in plan if kind == OFFLINE)
    assert offline == list(range(10))
    assert sum(r == Route.DP for kind, _, r in plan if kind == OFFLINE) == counts.dp
    online = [(i, r) for kind, i, r in plan if kind == ONLINE]
    assert sum(r == Route.PP for _, r in online) == counts.pp
    assert sum(r == Route.PR for _, r in online) == counts.pr
    assert all(online_routes[i] == r for i, r in online)  # each slot takes a pair of its route
    assert plan == plan_epoch(counts, online_routes, mix_dp=0.3, seed=1, epoch=2)
    assert plan != plan_epoch(counts, online_routes, mix_dp=0.3, seed=1, epoch=3)
    with pytest.raises(RuntimeError, match="no PP pairs"):
        plan_epoch(counts, [int(Route.PR)] * 5, mix_dp=0.3, seed=1, epoch=2)


def test_plan_round_takes_distinct_prompts_first_and_routes_in_proportion():
    counts = epoch_counts(30, mix_dp=0.0, mix_pp=0.2, mix_pr=0.2)
    prompts = ["a =", "b =", "a =", "c ="] * 5  # 3 distinct prompts
    plan = plan_round(counts, prompts, seed=0, round_index=1)
    assert len(plan.prompt_indices) == counts.online == len(plan.routes)
    first = {prompts[i] for i in plan.prompt_indices[:3]}
    assert first == {"a =", "b =", "c ="}
    assert plan.routes == [int(Route.PP)] * counts.pp + [int(Route.PR)] * counts.pr
    assert plan == plan_round(counts, prompts, seed=0, round_index=1)
    assert plan.prompt_indices != plan_round(counts, prompts, seed=0, round_index=2).prompt_indices
    assert len(plan_round(counts, prompts, seed=0, round_index=1, prompts_per_round=4)
               .prompt_indices) == 4
    none = plan_round(epoch_counts(30, mix_dp=0.0, mix_pp=0.0, mix_pr=0.0), prompts, seed=0,
                      round_index=0)
    assert none.prompt_indices == [] and none.routes == []


@pytest.mark.parametrize("kw,match", [({"mix_dp": 0.5, "mix_pr": 0.6}, "<= 1"),
                                      ({"mix_pr": 1.0}, "online_pairs"),
                                      ({"mix_pp": -0.1}, "mix_pp")])
def test_mixture_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        PreferenceDataModule(**kw)
