"""``two_samples``: two policy samples per prompt, oriented by a label (SAIL, online DPO).

On the SAIL-PP route the policy's own Bradley-Terry model labels the pair (a seeded
Bernoulli draw, ``PolicyLabeller``); on the PR route the labeller does (SAIL-PR, online DPO).
The first sample is chosen where the label prefers it (``label="a"``), else the second.
"""

from __future__ import annotations

import torch

from sail_lightning.common import Route
from sail_lightning.labellers import PolicyLabeller
from sail_lightning.pair_modes.base import (
    PairMode,
    RoundInputs,
    Selected,
    make_pair,
    ordered,
    register,
)


@register
class TwoSamples(PairMode):
    name = "two_samples"
    min_samples = 2
    policy_labels = True
    response_term = True
    bonus_index: int | None = None  # which sample carries a bonus (XPO's subclass)

    def select(self, inputs: RoundInputs) -> list[Selected]:
        samples, texts, routes = inputs.samples, inputs.texts, inputs.routes
        prompts, messages, prompt_ids = inputs.prompts, inputs.messages, inputs.prompt_ids
        a_pref = torch.zeros(len(samples), dtype=torch.bool)
        score_a = score_b = None
        pr = [k for k, r in enumerate(routes) if r == Route.PR]
        pp = [k for k, r in enumerate(routes) if r == Route.PP]
        if pr:
            if inputs.labeller is None:
                raise ValueError("SAIL-PR / online pairs need a labeller: set the callback's "
                                 "labeller (a reward model, judge, ranker or callable) or "
                                 "data.oracle")
            labels = inputs.labeller.label([prompts[k] for k in pr], [texts[k][0] for k in pr],
                                           [texts[k][1] for k in pr],
                                           messages=[messages[k] for k in pr])
            a_pref[pr] = labels.a_preferred
            if labels.scores_a is not None:
                score_a, score_b = torch.zeros(len(samples)), torch.zeros(len(samples))
                score_a[pr], score_b[pr] = labels.scores_a, labels.scores_b
        if pp:
            policy = PolicyLabeller(inputs.pair, inputs.beta, seed=inputs.seed,
                                    batch_size=inputs.score_batch_size)
            a_pref[pp] = policy.label_ids([prompt_ids[k] for k in pp],
                                          [samples[k][0] for k in pp],
                                          [samples[k][1] for k in pp]).a_preferred
        out = []
        for k in range(len(samples)):
            c, r = (0, 1) if a_pref[k] else (1, 0)
            bonus = samples[k][self.bonus_index] if self.bonus_index is not None else None
            out.append(Selected(
                make_pair(prompt_ids[k], samples[k][c], samples[k][r], bonus),
                texts[k][c], texts[k][r], "a" if a_pref[k] else "b",
                None if score_a is None or routes[k] != Route.PR else
                ordered(float(score_a[k]), float(score_b[k]), bool(a_pref[k]))))
        return out
