"""The instructions task's ground truth as a labeller, for ``data.oracle`` and the callbacks.

In YAML (``configs/data/instructions.yaml``)::

    data:
      source: instructions
      oracle:
        class_path: sail_lightning.instructions.InstructionsOracle
        init_args: {sample: true, seed: 0}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sail_lightning.instructions.task import InstructionsTask
from sail_lightning.interfaces import Labels, Messages, ScoringLabeller, check_lengths


class InstructionsOracle(ScoringLabeller):
    """Scores are the task's exact reward; labels its Bradley-Terry draws (or the argmax).

    The constraints are read from each prompt's text, so the oracle scores prompts of any
    seed of the task, and pairs written to files (``InstructionsTask.label_pairs``).

    Args:
        task: The task whose safeguards and temperature apply (default
            ``InstructionsTask()``; its prompts are never loaded by the oracle).
        sample: True draws from the Bradley-Terry oracle (``InstructionsTask.prefer``), as a
            human would; False takes the higher score (ties: ``a``).
        seed: Seed of the draws' generator (reseeded per round by the online loop).
    """

    def __init__(self, task: InstructionsTask | None = None, *, sample: bool = True,
                 seed: int = 0) -> None:
        self.task = task if task is not None else InstructionsTask()
        self.sample = sample
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        check_lengths(prompts=prompts, responses=responses, messages=messages)
        return self.task.score(prompts, responses)

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        labels = super().label(prompts, responses_a, responses_b, messages=messages)
        if self.sample:
            margin = labels.scores_a - labels.scores_b
            prob = torch.sigmoid(margin / self.task.temperature)
            labels.a_preferred = torch.rand(prob.shape, generator=self.generator) < prob
        return labels
