"""The instructions task's ground truth as a labeller, for ``data.oracle`` and the callbacks.

In YAML (``configs/data/instructions.yaml``)::

    data:
      source: instructions
      oracle:
        class_path: sail_lightning.instructions.InstructionsOracle
        init_args: {sample: true, seed: 0}
"""

from __future__ import annotations

from sail_lightning.instructions.task import InstructionsTask
from sail_lightning.interfaces import TaskOracle


class InstructionsOracle(TaskOracle):
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
        super().__init__(task if task is not None else InstructionsTask(), sample=sample,
                         seed=seed)
