"""``selm`` (SELM, Zhang et al.): one greedy sample from the reference, ranked with the
dataset's chosen and rejected responses by the labeller's scores; the best and worst form
the pair, and the reference sample carries SELM's bonus (``model.bonus_form: selm``)."""

from __future__ import annotations

from typing import Any

from sail_lightning.generation import SamplingOptions, generate_responses
from sail_lightning.pair_modes.base import RoundInputs, one_sample, register
from sail_lightning.pair_modes.best_worst import BestWorst
from sail_lightning.policy_pair import PolicyPair


@register
class SELM(BestWorst):
    name = "selm"
    method = "selm"
    bonus_form = "selm"

    def generate(self, pair: PolicyPair, prompt_ids: list[list[int]],
                 sampling: SamplingOptions, *, seed: int, **gen: Any) -> list[list[list[int]]]:
        with pair.reference_model() as ref:
            return generate_responses(ref, prompt_ids, one_sample(sampling, greedy=True),
                                      seed=seed, desc="reference", **gen)

    def candidates(self, inputs: RoundInputs):
        ids = [s + [o.chosen_ids, o.rejected_ids]
               for s, o in zip(inputs.samples, inputs.offline, strict=True)]
        txt = [t + [r.chosen, r.rejected] for t, r in zip(inputs.texts, inputs.records,
                                                          strict=True)]
        return ids, txt

    def bonus(self, inputs: RoundInputs, k: int) -> list[int]:
        return inputs.samples[k][0]
