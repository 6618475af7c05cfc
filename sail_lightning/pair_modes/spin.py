"""``spin`` (SPIN, Chen et al. 2024): the dataset's demonstration (its chosen response)
against one policy sample, which is always rejected; no labeller. SPIN trains DPO's logistic
loss (``model.loss_type: sigmoid``) and updates the reference each iteration
(``configs/method/spin.yaml``)."""

from __future__ import annotations

from typing import Any

from sail_lightning.generation import SamplingOptions, decode
from sail_lightning.pair_modes.base import (
    PairMode,
    RoundInputs,
    Selected,
    make_pair,
    one_sample,
    register,
)
from sail_lightning.policy_pair import PolicyPair


@register
class SPIN(PairMode):
    name = "spin"
    method = "spin"
    needs_labeller = False
    loss_types = ("sigmoid",)

    def generate(self, pair: PolicyPair, prompt_ids: list[list[int]],
                 sampling: SamplingOptions, *, seed: int, **gen: Any) -> list[list[list[int]]]:
        return super().generate(pair, prompt_ids, one_sample(sampling), seed=seed, **gen)

    def select(self, inputs: RoundInputs) -> list[Selected]:
        # The demonstration as trained on: decoded from its (maybe truncated) tokens.
        return [Selected(make_pair(o.prompt_ids, o.chosen_ids, inputs.samples[k][0]),
                         decode(inputs.tokenizer, o.chosen_ids), inputs.texts[k][0],
                         "demonstration")
                for k, o in enumerate(inputs.offline)]
