"""A real-text task with an exact reward: real instructions, IFEval-style constraints.

``InstructionsTask(seed=0)`` has ``train_prompts``, ``heldout_prompts`` (disjoint; 256) and
``score(prompts, responses)`` (the fraction of constraints met, with safeguards), as
``SyntheticTask.score``; ``InstructionsOracle`` is its labeller (``data.oracle``), and
``data.source: instructions`` (or ``instructions:<seed>``) makes the DataModule read its
prompts. See
``docs/instructions_task.md``.
"""

from sail_lightning.instructions.constraints import (
    KINDS,
    Constraint,
    count_words,
    parse_constraints,
    render,
)
from sail_lightning.instructions.oracle import InstructionsOracle
from sail_lightning.instructions.responses import build_response
from sail_lightning.instructions.task import PROMPT_SETS, InstructionsTask, read_instructions

__all__ = [
    "KINDS", "PROMPT_SETS", "Constraint", "InstructionsOracle",
    "InstructionsTask", "build_response", "count_words", "parse_constraints",
    "read_instructions", "render",
]
