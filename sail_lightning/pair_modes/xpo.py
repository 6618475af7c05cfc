"""``xpo`` (XPO, Xie et al.): a policy sample against a reference sample, labelled by the
labeller; the reference sample carries XPO's bonus (``model.bonus_form: xpo``)."""

from __future__ import annotations

from typing import Any

from sail_lightning.engines import get_engine
from sail_lightning.generation import SamplingOptions, generate_responses
from sail_lightning.pair_modes.base import one_sample, register
from sail_lightning.pair_modes.two_samples import TwoSamples
from sail_lightning.policy_pair import PolicyPair


@register
class XPO(TwoSamples):
    name = "xpo"
    method = "xpo"
    min_samples = 1
    policy_labels = False
    response_term = False
    bonus_form = "xpo"
    bonus_index = 1

    def generate(self, pair: PolicyPair, prompt_ids: list[list[int]],
                 sampling: SamplingOptions, *, seed: int, **gen: Any) -> list[list[list[int]]]:
        one = one_sample(sampling)
        policy = get_engine(one).generate(pair.policy, prompt_ids, one, seed=seed, **gen)
        with pair.reference_model() as ref:
            reference = generate_responses(ref, prompt_ids, one, seed=seed + 1,
                                           desc="reference", **gen)
        return [p + r for p, r in zip(policy, reference, strict=True)]
