"""The instructions task: real instructions with verifiable constraints, an exact reward.

Prompts are real instructions (AlpacaEval's 805, Vicuna-Bench's 80 questions, 668 prompts of
1000 UltraFeedback pairs; packaged in ``sail_lightning/data/samples``), each followed by a
blank line and one to three IFEval-style constraints (``constraints.py``), drawn
deterministically from the task's seed and the instruction's text. The reward of a response
is the fraction of its prompt's constraints that it meets, with safeguards against answers
that game it by being empty or endless (:meth:`InstructionsTask.score`).

Example:
    >>> task = InstructionsTask(seed=0)
    >>> len(task.heldout_prompts) >= 128
    True
    >>> task.score(["Name a colour.\\n\\nDo not use any commas in your response."],
    ...            ["blue is a colour that many people like a lot"]).tolist()
    [1.0]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from sail_lightning.data import samples
from sail_lightning.instructions.constraints import (
    WORD,
    Constraint,
    count_words,
    parse_constraints,
    render,
    sample_constraints,
)
from sail_lightning.instructions.responses import build_response

# Prompt set -> (packaged sample, the field that holds the instruction).
PROMPT_SETS = {
    "alpaca_eval": ("alpaca-eval", "instruction"),
    "vicuna": ("vicuna-bench", "turns"),
    "ultrafeedback": ("ultrafeedback-prompts", "prompt"),
}
HELDOUT_SPLITS = ("heldout", "test", "validation")


def read_instructions(name: str, data_dir: str | None = None) -> list[str]:
    """The instructions of one prompt set (:data:`PROMPT_SETS`), packaged or in ``data_dir``
    (a folder holding the same file names as ``sail_lightning/data/samples``)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    sample, field = PROMPT_SETS[name]
    path = samples.path(sample)
    if data_dir is not None:
        path = os.path.join(os.path.expanduser(data_dir), os.path.basename(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"InstructionsTask.data_dir: no {os.path.basename(path)} "
                                    f"in {data_dir}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row[field][0] if field == "turns" else row[field] for row in rows]


@dataclass(frozen=True)
class InstructionsTask:
    """Real instructions with verifiable constraints, and their exact reward.

    Attributes:
        seed: Seed of the train / held-out split and of each prompt's constraints.
        prompt_sets: Which sets to pool (keys of :data:`PROMPT_SETS`); AlpacaEval's data is
            CC BY-NC 4.0: leave it out for other than non-commercial use.
        num_heldout: Held-out prompts (the rest are the training prompts; disjoint).
        min_constraints: Fewest constraints per prompt.
        max_constraints: Most constraints per prompt.
        max_instruction_words: Instructions longer than this are left out (a small model's
            prompt budget).
        min_response_words: A response with fewer words scores 0 (empty or trivial answers).
        max_response_words: Above this many words the score falls linearly, to 0 at twice it
            (endless answers).
        min_distinct: Below this share of distinct word trigrams the score falls in
            proportion (answers that loop).
        temperature: Bradley-Terry temperature of :meth:`prefer`.
        data_dir: Read the prompt sets from this folder instead of the packaged files.
    """

    seed: int = 0
    prompt_sets: tuple[str, ...] = ("alpaca_eval", "vicuna", "ultrafeedback")
    num_heldout: int = 256
    min_constraints: int = 1
    max_constraints: int = 3
    max_instruction_words: int = 100
    min_response_words: int = 10
    max_response_words: int = 300
    min_distinct: float = 0.5
    temperature: float = 0.1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_constraints <= self.max_constraints <= 3:
            raise ValueError("need 1 <= min_constraints <= max_constraints <= 3, got "
                             f"{self.min_constraints}, {self.max_constraints}")
        if self.num_heldout < 1 or self.max_response_words < 1 or self.temperature <= 0:
            raise ValueError("num_heldout and max_response_words must be >= 1 and "
                             "temperature > 0")
        for name in self.prompt_sets:
            if name not in PROMPT_SETS:
                raise ValueError(f"InstructionsTask.prompt_sets: unknown set {name!r}; "
                                 f"known: {', '.join(PROMPT_SETS)}")

    # -- prompts ---------------------------------------------------------------------------

    @cached_property
    def instructions(self) -> list[str]:
        """Every instruction used: pooled, stripped, de-duplicated, short enough, sorted."""
        pool = {text.strip() for name in self.prompt_sets
                for text in read_instructions(name, self.data_dir)}
        return sorted(t for t in pool if t and count_words(t) <= self.max_instruction_words)

    @cached_property
    def _split(self) -> tuple[list[str], list[str]]:
        order = list(self.instructions)
        if len(order) <= self.num_heldout:
            raise ValueError(f"InstructionsTask.num_heldout={self.num_heldout} leaves no "
                             f"training prompts (the pool has {len(order)})")
        random.Random(f"sail_lightning.instructions.split:{self.seed}").shuffle(order)
        return order[self.num_heldout:], order[:self.num_heldout]

    def constraints_for(self, instruction: str) -> list[Constraint]:
        """The constraints given to ``instruction``: a function of the seed and the text
        alone (not of the pool or its order)."""
        digest = hashlib.sha256(instruction.strip().encode()).hexdigest()
        rng = random.Random(f"sail_lightning.instructions:{self.seed}:{digest}")
        k = rng.randint(self.min_constraints, self.max_constraints)
        return sample_constraints(rng, k)

    def prompt(self, instruction: str) -> str:
        """``instruction`` with its constraints appended (see ``constraints.render``)."""
        return render(instruction.strip(), self.constraints_for(instruction))

    @cached_property
    def train_prompts(self) -> list[str]:
        """The training prompts (for online rounds), disjoint from :attr:`heldout_prompts`."""
        return [self.prompt(t) for t in self._split[0]]

    @cached_property
    def heldout_prompts(self) -> list[str]:
        """The held-out prompts (evaluation), ``num_heldout`` of them."""
        return [self.prompt(t) for t in self._split[1]]

    def prompts(self, split: str) -> list[str]:
        """``"train"`` or ``"heldout"`` (also ``"test"``, ``"validation"``) prompts."""
        if split == "train":
            return self.train_prompts
        if split in HELDOUT_SPLITS:
            return self.heldout_prompts
        raise ValueError(f"instructions task split must be 'train' or one of "
                         f"{HELDOUT_SPLITS}, got {split!r}")

    # -- reward ----------------------------------------------------------------------------

    def constraint_rate(self, prompt: str, response: str) -> float:
        """The fraction of the prompt's constraints that the response meets (no safeguard)."""
        constraints = parse_constraints(prompt)
        return sum(c.check(response) for c in constraints) / len(constraints)

    def safeguard(self, response: str) -> float:
        """The factor in [0, 1] the constraint rate is multiplied by: 0 below
        ``min_response_words``; falling linearly above ``max_response_words`` (0 at twice
        it); ``distinct / min_distinct`` where the share of distinct word trigrams is below
        ``min_distinct``."""
        words = [w.lower() for w in WORD.findall(response)]
        if len(words) < self.min_response_words:
            return 0.0
        factor = 1.0
        if len(words) > self.max_response_words:
            factor = max(0.0, 2.0 - len(words) / self.max_response_words)
        trigrams = list(zip(words, words[1:], words[2:], strict=False))
        if trigrams:
            distinct = len(set(trigrams)) / len(trigrams)
            factor *= min(1.0, distinct / self.min_distinct)
        return factor

    def reward(self, prompt: str, response: str) -> float:
        """One response's reward: constraint rate times :meth:`safeguard`; 0 for a response
        that repeats one of its prompt's constraint sentences verbatim (an echo of the
        prompt meets ``title`` and ``placeholders`` with the sentences' own examples)."""
        constraints = parse_constraints(prompt)
        if any(c.text() in response for c in constraints):
            return 0.0
        met = sum(c.check(response) for c in constraints) / len(constraints)
        return met * self.safeguard(response)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """The exact reward (:meth:`reward`) of each response, in [0, 1].

        Args:
            prompts: Prompts made by this task (or any text ending in a constraint block
                rendered by ``constraints.render``: the constraints are read from it).
            responses: One response per prompt, the text as decoded.

        Returns:
            A float32 tensor of shape ``(n,)`` (``.tolist()`` for a list of floats).

        Raises:
            ValueError: Lengths differ, or a prompt has no constraint block.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([self.reward(p, r) for p, r in zip(prompts, responses, strict=True)],
                            dtype=torch.float32)

    def prefer(self, prompts: Sequence[str], responses_a: Sequence[str],
               responses_b: Sequence[str], generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """One Bradley-Terry draw per pair: True where ``a`` is preferred, with probability
        ``sigmoid((r(a) - r(b)) / temperature)`` (as ``SyntheticTask.prefer``)."""
        margin = self.score(prompts, responses_a) - self.score(prompts, responses_b)
        prob = torch.sigmoid(margin / self.temperature)
        return torch.rand(prob.shape, generator=generator) < prob

    # -- offline pairs ---------------------------------------------------------------------

    def label_pairs(self, prompts: Sequence[str], responses_a: Sequence[str],
                    responses_b: Sequence[str], *, seed: int = 0, sample: bool = True
                    ) -> list[dict]:
        """Preference records of two responses per prompt (a policy's samples, say), by the
        Bradley-Terry oracle (``sample``; a generator seeded with ``seed``) or by the higher
        score (ties: ``a``). Rows ``{prompt, chosen, rejected, metadata: {score_chosen,
        score_rejected}}``, readable by ``PreferenceDataModule`` (``format: prompt``)."""
        sa, sb = self.score(prompts, responses_a), self.score(prompts, responses_b)
        if sample:
            a_wins = self.prefer(prompts, responses_a, responses_b,
                                 torch.Generator().manual_seed(seed)).tolist()
        else:
            a_wins = (sa >= sb).tolist()
        rows = []
        for i, (x, a, b) in enumerate(zip(prompts, responses_a, responses_b, strict=True)):
            (c, sc), (r, sr) = ((a, sa[i]), (b, sb[i])) if a_wins[i] else ((b, sb[i]), (a, sa[i]))
            rows.append({"prompt": x, "chosen": c, "rejected": r,
                         "metadata": {"score_chosen": float(sc), "score_rejected": float(sr)}})
        return rows

    def make_pairs(self, split: str = "train", limit: int | None = None) -> list[dict]:
        """Built pairs, one per prompt of ``split``: a response meeting every constraint
        (chosen) against one that breaks at least one (rejected), both filler text
        (``responses.build_response``): no model needed, the forms only. Deterministic."""
        rows = []
        for prompt in self.prompts(split)[:limit]:
            constraints = parse_constraints(prompt)
            rng = random.Random(f"sail_lightning.instructions.pairs:{self.seed}:{prompt}")
            kinds = [c.kind for c in constraints]
            broken = set(rng.sample(kinds, rng.randint(1, len(kinds))))
            chosen = build_response(constraints, rng)
            rejected = build_response(constraints, rng, meet=set(kinds) - broken)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows
