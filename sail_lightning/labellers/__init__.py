"""Labellers: which of two sampled responses is chosen, in online DPO / SAIL rounds.

The interface is small (``label``, ``score``, ``to``) and kept stable, so that configs naming
a labeller by ``class_path`` keep working. Every labeller is built from YAML primitives, as
LightningCLI instantiates it from ``class_path`` / ``init_args``; callables go by import path::

    labeller:
      class_path: sail_lightning.labellers.RewardModelLabeller
      init_args: {name_or_path: path/to/reward_model, device: "cuda:1", batch_size: 32}
"""

from sail_lightning.labellers.base import (
    Labeller,
    Labels,
    Messages,
    ScoringLabeller,
    as_callable,
    as_scores,
    check_lengths,
    resolve_callable,
)
from sail_lightning.labellers.functions import CallableLabeller, PairwiseRankerLabeller
from sail_lightning.labellers.judge import JudgeLabeller
from sail_lightning.labellers.policy import PolicyLabeller
from sail_lightning.labellers.remote import RemoteRewardLabeller, RemoteServiceError
from sail_lightning.labellers.reward_model import RewardModelLabeller, prompt_response_ids

__all__ = [
    "CallableLabeller", "JudgeLabeller", "Labeller", "Labels", "Messages",
    "PairwiseRankerLabeller", "PolicyLabeller", "RemoteRewardLabeller", "RemoteServiceError",
    "RewardModelLabeller", "ScoringLabeller", "as_callable", "as_scores", "check_lengths",
    "prompt_response_ids", "resolve_callable",
]
