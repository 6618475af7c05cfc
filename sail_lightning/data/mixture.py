"""The epoch mixture, as pure plans: how many examples of each route an epoch holds, which
examples they are and in what order, and what a round generates.

Everything here is a function of the configuration, the seed and the epoch or round: every
rank, and a resumed run, computes the same plan without communicating.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sail_lightning.common import Route

log = logging.getLogger("sail_lightning.data")

OFFLINE, ONLINE = "offline", "online"


# How long an epoch is (``data.epoch_scaling``).
# - ``dpo_updates`` (default, the authors' released pipeline, which divides the number of
#   epochs by ``1 - r - p - g``): an epoch holds as many plain-DPO updates as offline DPO's
#   epoch, ``n_offline``; the DP, PP and PR examples come on top, ``n_offline / (1 - r - p - g)``
#   examples in all. With r > 0 the DP examples are extra passes over offline pairs.
# - ``offline_once``: each offline pair passes once per epoch, as DPO or DP, and online
#   pairs are added to a share of ``p + g``: ``n_offline / (1 - p - g)`` examples. With
#   r > 0 this trains ``1 - r - p - g`` of the authors' plain-DPO updates per epoch.
# Both agree when r = 0 (the quickstart, SAIL-PR, SAIL-PP).
EPOCH_SCALINGS = ("dpo_updates", "offline_once")


@dataclass(frozen=True)
class EpochCounts:
    """Examples per route in every epoch (constant, so schedules can be planned).

    ``offline`` counts offline examples (``dpo + dp``); ``pairs`` the distinct offline pairs
    they are drawn from.
    """

    total: int
    offline: int
    dp: int
    dpo: int
    pp: int
    pr: int
    pairs: int

    @property
    def online(self) -> int:
        return self.pp + self.pr


@dataclass(frozen=True)
class RoundPlan:
    """What one round generates: a prompt per pair (indices into the training records)
    and each pair's route (PP first, then PR, in the proportion an epoch trains on)."""

    round_index: int
    prompt_indices: list[int]
    routes: list[int]


def check_epoch_scaling(scaling: str, *, mix_dp: float, mix_pp: float, mix_pr: float) -> None:
    """Raises ``ValueError`` naming ``data.epoch_scaling`` for an unknown scaling, or for
    ``dpo_updates`` with ``0 < 1 - r - p - g`` false while offline pairs are trained on (an
    epoch would hold no plain-DPO update to count)."""
    if scaling not in EPOCH_SCALINGS:
        raise ValueError(f"data.epoch_scaling must be one of {EPOCH_SCALINGS}, got {scaling!r}")
    online = mix_pp + mix_pr
    if scaling == "dpo_updates" and online < 1.0 - 1e-9 and mix_dp + online >= 1.0 - 1e-9:
        raise ValueError(
            f"data.epoch_scaling=dpo_updates sizes an epoch by its plain-DPO share "
            f"1 - mix_dp - mix_pp - mix_pr, which is 0 here ({mix_dp} + {mix_pp} + {mix_pr}): "
            "use data.epoch_scaling=offline_once or lower a share")


def epoch_total(n_offline: int, *, mix_dp: float, mix_pp: float, mix_pr: float,
                scaling: str = "dpo_updates") -> int:
    """Examples per epoch for ``n_offline`` offline pairs (``mix_pp + mix_pr < 1``):
    ``n_offline / (1 - r - p - g)`` (``dpo_updates``) or ``n_offline / (1 - p - g)``
    (``offline_once``), rounded."""
    check_epoch_scaling(scaling, mix_dp=mix_dp, mix_pp=mix_pp, mix_pr=mix_pr)
    dpo_share = 1.0 - mix_pp - mix_pr - (mix_dp if scaling == "dpo_updates" else 0.0)
    return round(n_offline / dpo_share)


def offline_pairs_for(total: int, *, mix_dp: float, mix_pp: float, mix_pr: float,
                      scaling: str = "dpo_updates") -> int:
    """The inverse of :func:`epoch_total`: how many offline pairs make an epoch of about
    ``total`` examples (benchmarks compare methods at equal examples per epoch)."""
    check_epoch_scaling(scaling, mix_dp=mix_dp, mix_pp=mix_pp, mix_pr=mix_pr)
    dpo_share = 1.0 - mix_pp - mix_pr - (mix_dp if scaling == "dpo_updates" else 0.0)
    return round(dpo_share * total)


def epoch_counts(n_offline: int, *, mix_dp: float, mix_pp: float, mix_pr: float,
                 online_pairs: int | None = None, scaling: str = "dpo_updates"
                 ) -> EpochCounts:
    """Examples per route of every epoch, by ``scaling`` (see ``EPOCH_SCALINGS``): the
    online shares are ``round(mix_pp * total)`` and the rest of ``total - offline``; DP's is
    ``round(mix_dp * total)``. With ``mix_pp + mix_pr = 1`` an epoch is ``online_pairs``
    online pairs alone."""
    online = mix_pp + mix_pr
    if online >= 1.0 - 1e-9:
        total = int(online_pairs)
        n_pp = round(mix_pp * total)
        n_pr = total - n_pp  # exactly online_pairs, whatever the rounding of the shares
        return EpochCounts(total=n_pp + n_pr, offline=0, dp=0, dpo=0, pp=n_pp, pr=n_pr, pairs=0)
    total = epoch_total(n_offline, mix_dp=mix_dp, mix_pp=mix_pp, mix_pr=mix_pr,
                        scaling=scaling)
    n_dp = round(mix_dp * total)
    if scaling == "dpo_updates":
        n_dpo = n_offline  # every offline pair once as plain DPO; DP passes come on top
    else:
        n_dp = min(n_dp, n_offline)
        n_dpo = n_offline - n_dp
    n_off = n_dpo + n_dp
    n_pp = min(round(mix_pp * total), max(0, total - n_off))
    n_pr = max(0, total - n_off - n_pp)
    return EpochCounts(total=n_off + n_pp + n_pr, offline=n_off, dp=n_dp, dpo=n_dpo,
                       pp=n_pp, pr=n_pr, pairs=n_offline)


def dp_passes(n: int, k: int, seed: int, epoch: int) -> list[int]:
    """The offline pairs of an epoch's ``k`` DP examples under ``dpo_updates``: a permutation
    of the ``n`` pairs drawn from ``(seed, epoch)``, repeated when ``k > n``."""
    if not k or not n:
        return []
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i % n] for i in range(k)]


def epoch_routes(n: int, mix_dp: float, seed: int, epoch: int, k: int | None = None
                 ) -> torch.Tensor:
    """Routes of the offline pairs for one epoch: ``k`` (default ``round(mix_dp * n)``) to DP,
    drawn from ``(seed, epoch)`` alone."""
    routes = torch.full((n,), int(Route.DPO), dtype=torch.long)
    k = round(mix_dp * n) if k is None else k
    if k:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        routes[torch.randperm(n, generator=g)[:k]] = int(Route.DP)
    return routes


def plan_epoch(counts: EpochCounts, online_routes: list[int], *, mix_dp: float, seed: int,
               epoch: int, round_index: int = -1) -> list[tuple[str, int, int]]:
    """The examples of one epoch, shuffled by ``(seed, epoch)``: ``(OFFLINE, i, route)`` for
    offline pair ``i``, ``(ONLINE, j, route)`` for pair ``j`` of the latest round, whose
    routes are ``online_routes``. A round smaller than its slots is reused (logged).

    Raises:
        RuntimeError: the epoch needs online pairs of a route the round has none of.
    """
    items: list[tuple[str, int, int]] = []
    if counts.offline and counts.offline > counts.pairs:  # dpo_updates: DP passes on top
        items += [(OFFLINE, i, int(Route.DPO)) for i in range(counts.pairs)]
        items += [(OFFLINE, i, int(Route.DP)) for i in dp_passes(counts.pairs, counts.dp, seed,
                                                                   epoch)]
    elif counts.offline:
        routes = epoch_routes(counts.offline, mix_dp, seed, epoch, k=counts.dp).tolist()
        items += [(OFFLINE, i, r) for i, r in enumerate(routes)]
    for route, need in ((Route.PP, counts.pp), (Route.PR, counts.pr)):
        if not need:
            continue
        pool = [j for j, r in enumerate(online_routes) if r == route]
        name = route.name
        if not pool:
            raise RuntimeError(
                f"data.mix_{name.lower()} > 0 but the pool has no {name} pairs: add "
                "PairGenerationCallback to trainer.callbacks (configs/method/*.yaml do)")
        if len(pool) < need:
            log.warning("round %d has %d %s pairs for the epoch's %d %s slots: %d slots "
                        "repeat a pair (gen/reused_slots); with PairGenerationCallback."
                        "prompts_per_round unset, a round has a pair for every slot",
                        round_index, len(pool), name, need, name, need - len(pool))
        items += [(ONLINE, pool[i % len(pool)], int(route)) for i in range(need)]
    # A stream of its own: the route draw's permutation would put every DP row first.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]


def plan_round(counts: EpochCounts, prompts: list[str], *, seed: int, round_index: int,
               prompts_per_round: int | None = None) -> RoundPlan:
    """The prompts and routes of one round: by default as many pairs as an epoch trains on
    (``counts.online``); distinct prompts first, in an order drawn from
    ``(seed, round_index)``; routes in the epoch's proportion, PP first, then PR."""
    n = prompts_per_round or counts.online
    if n == 0:
        return RoundPlan(round_index, [], [])
    g = torch.Generator().manual_seed(seed * 7_919 + round_index)
    order = torch.randperm(len(prompts), generator=g).tolist()
    seen, distinct = set(), []
    for i in order:
        if prompts[i] not in seen:
            seen.add(prompts[i])
            distinct.append(i)
    indices = [distinct[k % len(distinct)] for k in range(n)]
    n_pp = round(n * counts.pp / max(1, counts.online))
    return RoundPlan(round_index, indices, [int(Route.PP)] * n_pp + [int(Route.PR)] * (n - n_pp))


def bucket_by_length(lengths: list[int], batch_size: int, buckets: int, *, seed: int,
                     epoch: int) -> list[int]:
    """An order of an epoch's examples in which each batch holds examples of similar length,
    so that padding to the batch's longest costs less.

    The examples, in their (shuffled) epoch order, are cut into windows of
    ``buckets * batch_size``; each window is sorted by length and cut into batches; the full
    batches are then shuffled by ``(seed, epoch)``, so the lengths do not grow through the
    epoch, and a short last batch stays last (the loader cuts batches in order). A pure
    function of its arguments: every rank and a resumed run get the same order.

    Args:
        lengths: each example's padded length (its longest row).
        batch_size: examples per batch (the global batch under DDP).
        buckets: batches per window; more: less padding, less randomness within batches.
        seed, epoch: the shuffle of the batches.

    Returns:
        A permutation of ``range(len(lengths))``.
    """
    window = batch_size * buckets
    batches = []
    for start in range(0, len(lengths), window):
        # Ties keep the epoch order: the sort is stable.
        chunk = sorted(range(start, min(start + window, len(lengths))), key=lengths.__getitem__)
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    last = batches.pop() if batches and len(batches[-1]) < batch_size else []
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 900_007)
    order = torch.randperm(len(batches), generator=g).tolist()
    return [i for b in order for i in batches[b]] + last
