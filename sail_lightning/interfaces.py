"""The interfaces that the online loop, the evaluation and the data read, with no import of
the package: a labeller (which of two responses is chosen, scores where there are any) and
a pairwise judge. ``sail_lightning.labellers`` holds the implementations.

The interface is small (``label``, ``score``, ``reseed``, ``to``) and kept stable, so that
configs naming a labeller by ``class_path`` keep working.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Per example, the prompt as ``((role, content), ...)`` turns, as in ``PreferenceRecord``.
Messages = Sequence[Sequence[tuple[str, str]]]


@dataclass
class Labels:
    """The verdict on ``n`` pairs (CPU tensors).

    Attributes:
        a_preferred: Bool ``(n,)``: True where response ``a`` is chosen.
        scores_a: Float ``(n,)`` scores of the ``a`` responses, or None without scores.
        scores_b: The same for the ``b`` responses.
    """

    a_preferred: torch.Tensor
    scores_a: torch.Tensor | None = None
    scores_b: torch.Tensor | None = None


class Labeller(abc.ABC):
    """Given prompts and two responses each: which is chosen, plus scores where there are any."""

    @abc.abstractmethod
    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        """Labels ``n`` pairs; responses are text only (no prompt).

        Args:
            messages: Optionally the prompts as chat turns, for labellers with a chat template.

        Raises:
            ValueError: If the inputs' lengths differ (the message gives every length).
        """

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor | None:
        """Float32 CPU scores ``(n,)`` (best-of-n, eval reward), or None without scores."""
        return None

    def reseed(self, seed: int) -> None:
        """Restart the labeller's random draws (if any) from ``seed``. The online loop calls
        it before each round with a seed of (round, rank), so labels do not depend on how
        many rounds ran before in this process: a resumed run labels as an uninterrupted one.
        """
        if getattr(self, "generator", None) is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def to(self, device: str | torch.device) -> Labeller:
        """Moves whatever the labeller runs on to ``device``; a no-op by default."""
        return self


def check_lengths(**named: Sequence | None) -> int:
    """Returns the common length of the given sequences, or raises naming every length."""
    present = {k: v for k, v in named.items() if v is not None}
    if bad := [name for name, seq in present.items() if isinstance(seq, str)]:
        raise TypeError(f"{bad} must be sequences, got a single string (a forgotten list?)")
    lengths = {name: len(seq) for name, seq in present.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{n} {name}" for name, n in lengths.items())
        raise ValueError(f"inputs must have equal lengths, got {desc}")
    return next(iter(lengths.values()))


class ScoringLabeller(Labeller):
    """Scores each response; the chosen one scores higher, ties going to ``a`` (argmax).

    A cost model (lower is better, as PKU-SafeRLHF's beaver cost model) is read with
    ``lower_is_better=True`` in a subclass's options: its ``score`` then returns the negated
    costs (:meth:`oriented`), so every consumer (labels, best-of-n, judged win rates) keeps
    reading "higher is better".
    """

    lower_is_better: bool = False

    def oriented(self, scores: torch.Tensor) -> torch.Tensor:
        """The model's raw scores as higher-is-better scores (negated for a cost model)."""
        return -scores if self.lower_is_better else scores

    def score_pair(self, prompts: Sequence[str], responses_a: Sequence[str],
                   responses_b: Sequence[str], messages: Messages | None) -> tuple:
        """Scores of both responses of every pair, in one ``score`` call over each distinct
        input once: full batches across pairs, and identical responses tie exactly (-> a)
        instead of by batching noise."""
        n = len(prompts)
        turns = [None] * n if messages is None else [tuple(map(tuple, m)) for m in messages]
        keys = [*zip(prompts, responses_a, turns, strict=True),
                *zip(prompts, responses_b, turns, strict=True)]
        unique = list(dict.fromkeys(keys))
        scores = self.score([k[0] for k in unique], [k[1] for k in unique],
                            messages=None if messages is None else [k[2] for k in unique])
        where = {k: i for i, k in enumerate(unique)}
        both = scores[[where[k] for k in keys]]
        return both[:n], both[n:]

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b,
                       messages=messages)
        scores_a, scores_b = self.score_pair(prompts, responses_a, responses_b, messages)
        return Labels(scores_a >= scores_b, scores_a, scores_b)


class PairwiseJudge(abc.ABC):
    """A judge that compares two responses without scoring either (an LLM judge): what the
    evaluation asks of a judge without scores (``EvaluationCallback``)."""

    @abc.abstractmethod
    def compare(self, prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], *, messages: Messages | None = None
                ) -> torch.Tensor:
        """Float64 CPU outcomes ``(n,)``: 1 where ``a`` wins, 0 where ``b`` does, 0.5 for a
        tie (their mean is ``a``'s win rate, ties counting half)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Usage counters so far: ``judge_requests``, ``judge_prompt_tokens``,
        ``judge_completion_tokens``, ``judge_unparsed``."""


class TaskOracle(ScoringLabeller):
    """A task's ground truth as a labeller: scores are ``task.score``, labels its
    Bradley-Terry draws (``task.prefer``) or, with ``sample=False``, the higher score (ties:
    ``a``). The synthetic task's ``OracleLabeller`` and the instructions task's
    ``InstructionsOracle`` are this with their task as the default.

    Args:
        task: Anything with ``score(prompts, responses)`` and ``prefer(prompts, a, b,
            generator)``.
        sample: Draw from the task's Bradley-Terry oracle, as a human would.
        seed: Seed of the draws' generator (reseeded per round by the online loop).
    """

    def __init__(self, task: Any, *, sample: bool = True, seed: int = 0) -> None:
        self.task = task
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
            # The task's own oracle, so labels stay exactly its draws if it ever changes.
            labels.a_preferred = self.task.prefer(prompts, responses_a, responses_b,
                                                  self.generator)
        return labels
