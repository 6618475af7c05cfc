"""Names shared across the package, with no import of it: a leaf that ``data/``, the
objectives, the labellers and the online loop all read (docs/architecture.md, import graph).
"""

from __future__ import annotations

import os
from enum import IntEnum

import torch


class Route(IntEnum):
    """Where an example's responses and label come from, and so which SAIL terms apply.

    DPO: offline pair, dataset label (plain DPO). DP: dataset responses, label resampled
    from the policy (label term). PP: policy responses, policy label (label + response
    terms). PR: policy responses, reward-model label (response term).
    """

    DPO = 0
    DP = 1
    PP = 2
    PR = 3


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The weight dtypes an option may name (``model.torch_dtype``, a reward model's...)."""

PATH_STARTS = tuple(p for p in (os.sep, os.altsep, ".", "~") if p)
"""How a local path begins (so that a missing one is named as a file, not tried as a hub
name)."""

PAIR_FIELDS = {"win_chosen": 1.0, "win_rejected": 0.0}
"""Per-pair float fields that a pair mode may set on its pairs (``PairMode.pair_fields``)
and a loss may read (``PairLoss.fields``), each with the value a pair without it reads as
in a batch (SPPO's hard labels). Each is a ``TokenizedPair`` field of the same name; the
round files, the collator and the batches carry them all by this table."""

SFT = "sft"
"""``model.loss_type`` of supervised fine-tuning on the chosen responses: no reference, no
preference (``sft_loss``); SAIL starts from such a model."""


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor) -> float:
    """Fraction of prompts where ``a`` scores higher than ``b``; a tie counts half."""
    wins = (scores_a > scores_b).double() + 0.5 * (scores_a == scores_b).double()
    return float(wins.mean())
