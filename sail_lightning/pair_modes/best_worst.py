"""``best_worst`` (iterative DPO, rejection-sampling style): ``num_samples`` policy samples
per prompt; the best and the worst by the labeller's score form the pair (the first of
equal scores wins: ``torch.argmax`` / ``argmin``).

The ranking modes (``selm``, ``sppo``) subclass :class:`BestWorst` and change which
candidates are ranked, by what, and what the pair carries.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from sail_lightning.generation import decode
from sail_lightning.pair_modes.base import PairMode, RoundInputs, Selected, make_pair, register


@register
class BestWorst(PairMode):
    name = "best_worst"
    method = "iterative_dpo"
    needs_scores = True

    def candidates(self, inputs: RoundInputs) -> tuple[list[list[list[int]]], list[list[str]]]:
        """Per prompt, the candidates' token ids and texts. Default: the samples."""
        return inputs.samples, inputs.texts

    def rank(self, scores: Tensor) -> Tensor:
        """The value that picks the best and worst of one prompt's candidate ``scores``."""
        return scores

    def bonus(self, inputs: RoundInputs, k: int) -> list[int] | None:
        """The response of prompt ``k`` that carries an exploration bonus, if any."""
        return None

    def fields(self, rank: Tensor, best: int, worst: int) -> dict[str, float]:
        """Per-pair fields (``pair_fields``) of the pair ``best``, ``worst``."""
        return {}

    def select(self, inputs: RoundInputs) -> list[Selected]:
        labeller, texts = inputs.labeller, inputs.texts
        if labeller is None:
            raise ValueError(f"pair_mode={self.name!r} ranks candidates: set a scoring labeller")
        cands_ids, cands_txt = self.candidates(inputs)
        flat_p = [inputs.prompts[k] for k, c in enumerate(cands_txt) for _ in c]
        flat_m = [inputs.messages[k] for k, c in enumerate(cands_txt) for _ in c]
        flat = labeller.score(flat_p, [t for c in cands_txt for t in c], messages=flat_m)
        if flat is None:
            raise ValueError(f"pair_mode={self.name!r} needs a labeller with scores "
                             f"(got {type(labeller).__name__})")
        out, start = [], 0
        for k, cands in enumerate(cands_ids):
            s = flat[start : start + len(cands)]
            start += len(cands)
            rank = self.rank(s)
            best, worst = int(torch.argmax(rank)), int(torch.argmin(rank))
            pair = make_pair(inputs.prompt_ids[k], cands[best], cands[worst],
                             self.bonus(inputs, k))
            extra = self.fields(rank, best, worst)
            # A policy sample's text is the one decoded before; a dataset response (selm) is
            # decoded from its tokens, which may be truncated, not taken from its record.
            chosen, rejected = (texts[k][i] if i < len(texts[k]) else
                                decode(inputs.tokenizer, cands[i]) for i in (best, worst))
            out.append(Selected(replace(pair, **extra) if extra else pair, chosen, rejected,
                                f"best={best},worst={worst}",
                                {"chosen": float(s[best]), "rejected": float(s[worst])}))
        return out
