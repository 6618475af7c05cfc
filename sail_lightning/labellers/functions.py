"""Labellers around plain Python functions: a pairwise ranker and a scoring function."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sail_lightning.labellers.base import (
    Labeller,
    Labels,
    Messages,
    ScoringLabeller,
    as_callable,
    as_scores,
    check_lengths,
)


class PairwiseRankerLabeller(Labeller):
    """A PairRM-style ranker comparing the two responses directly; it has no scores.

    Args:
        ranker: ``compare(prompts, responses_a, responses_b) -> P(a > b)`` per pair (floats in
            [0, 1], a tensor, or bools; no messages), or its import path ``"pkg.mod:fn"``.
        sample: False chooses ``a`` where ``p >= 0.5``; True draws ``Bernoulli(p)``.
        seed: Seed of the draws' generator, which advances across calls (a run's labels are
            reproducible); give each rank its own seed under DDP.
    """

    def __init__(self, ranker: str | Callable, *, sample: bool = False, seed: int = 0) -> None:
        self.compare, self.ranker_name = as_callable(ranker, "ranker")
        self.sample = sample
        self.generator = torch.Generator().manual_seed(seed)

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        n = check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b,
                           messages=messages)
        prob = as_scores(self.compare(prompts, responses_a, responses_b), n,
                          f"ranker {self.ranker_name!r}")
        if ((prob < 0) | (prob > 1)).any():
            raise ValueError(f"ranker {self.ranker_name!r} returned values outside [0, 1]")
        if self.sample:
            return Labels(torch.rand(n, generator=self.generator) < prob)
        return Labels(prob >= 0.5)


class CallableLabeller(ScoringLabeller):
    """A plain Python function scoring responses; the chosen one scores higher (ties: ``a``).

    Args:
        fn: ``fn(prompts, responses) -> floats`` (or a tensor; no messages), or its import
            path ``"package.module:function"``, as named in YAML.
        lower_is_better: ``fn`` returns costs: ``score`` returns them negated.
    """

    def __init__(self, fn: str | Callable, *, lower_is_better: bool = False) -> None:
        self.fn, self.fn_name = as_callable(fn, "fn")
        self.lower_is_better = bool(lower_is_better)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *,
              messages: Messages | None = None) -> torch.Tensor:
        n = check_lengths(prompts=prompts, responses=responses, messages=messages)
        return self.oriented(as_scores(self.fn(list(prompts), list(responses)), n,
                                       f"fn {self.fn_name!r}"))
