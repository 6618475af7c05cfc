"""Small samples of real preference data and prompt sets shipped with the package.

They make examples and tests work from a fresh clone or a ``pip install``, without the
full data sets; see ``README.md`` in this folder for provenance and licenses.

Example:
    >>> from sail_lightning.data import samples
    >>> from sail_lightning.data.records import read_preference_records
    >>> records, stats = read_preference_records(samples.path("ultrafeedback"))
    >>> stats.kept
    200
"""

from __future__ import annotations

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent

#: name -> file: 200 UltraFeedback-binarized pairs (prompt/chosen/rejected text) and the
#: first 100 HH-RLHF helpful-base test dialogues (whole-dialogue chosen/rejected), both MIT;
#: the prompt sets of the instructions task (``sail_lightning.instructions``): AlpacaEval's
#: 805 instructions (CC BY-NC 4.0), Vicuna-Bench's 80 questions (Apache-2.0) and the 668
#: prompts of at most 100 words of 1000 UltraFeedback pairs (MIT). Not preference pairs.
SAMPLES = {
    "ultrafeedback": "ultrafeedback.jsonl.gz",
    "hh-rlhf": "hh-rlhf-helpful-base.jsonl.gz",
    "alpaca-eval": "alpaca-eval-instructions.jsonl.gz",
    "vicuna-bench": "vicuna-bench-questions.jsonl.gz",
    "ultrafeedback-prompts": "ultrafeedback-prompts.jsonl.gz",
}


def path(name: str) -> str:
    """The absolute path of a packaged sample, readable by ``read_preference_records``.

    Args:
        name: One of :data:`SAMPLES` (``"ultrafeedback"``, ``"hh-rlhf"``, ...).

    Raises:
        KeyError: Unknown name (the message lists the known ones).
    """
    if name not in SAMPLES:
        raise KeyError(f"no packaged sample {name!r}; known: {', '.join(SAMPLES)}")
    return str(_FOLDER / SAMPLES[name])
