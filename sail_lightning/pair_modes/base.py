"""The pair-mode interface and its registry.

A pair mode is how one online round turns prompts into training pairs: how many responses it
samples, from which model, how it picks and orients the chosen and rejected response, what
it needs (a labeller, scores, the reference) and which per-pair fields it carries. Each mode
is one class in one file of this package, registered by name (``@register``); the online
loop (``rounds.build_round``), the callback and ``MethodSpec`` ask it for its rules, and no
code elsewhere tests a mode's name. ``docs/architecture.md`` says how to add one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from sail_lightning.common import PAIR_FIELDS
from sail_lightning.data.records import PreferenceRecord
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.engines import get_engine
from sail_lightning.generation import SamplingOptions
from sail_lightning.interfaces import Labeller
from sail_lightning.policy_pair import PolicyPair


@dataclass
class RoundInputs:
    """What a mode selects pairs from: one shard of a round, its samples and their texts.

    Attributes:
        samples: per prompt, the token ids of each response :meth:`PairMode.generate` made.
        texts: the same, decoded (once, here: modes reuse them).
        routes: ``Route.PP`` or ``Route.PR`` per prompt.
    """

    pair: PolicyPair
    tokenizer: Any
    records: list[PreferenceRecord]
    offline: list[TokenizedPair]
    labeller: Labeller | None
    samples: list[list[list[int]]]
    texts: list[list[str]]
    routes: list[int]
    beta: float
    seed: int
    score_batch_size: int

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [p.prompt_ids for p in self.offline]

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    @property
    def messages(self) -> list:
        return [r.messages for r in self.records]


@dataclass
class Selected:
    """One selected pair: its tokens (and per-pair fields), the texts of its chosen and
    rejected response, the label recorded in the round file, and the labeller's scores of
    chosen and rejected (None without)."""

    pair: TokenizedPair
    chosen: str
    rejected: str
    label: str
    scores: dict[str, float] | None = None


class PairMode:
    """One pair mode (subclass it, set the class attributes, ``@register`` it).

    Attributes:
        name: ``PairGenerationCallback.pair_mode``.
        method: the method's name when this mode defines it (``MethodSpec.name``); None for
            ``two_samples``, whose methods are named by their SAIL routes.
        needs_labeller: its pairs on the PR route need a labeller.
        needs_scores: it ranks candidates by the labeller's scores.
        min_samples: the fewest ``sampling.num_samples`` it works with.
        policy_labels: it labels SAIL-PP pairs with the policy's own model (``data.mix_pp``).
        response_term: SAIL's response term (``model.coef_pp`` / ``coef_pr``) is derived
            for its pairs: two policy samples per prompt.
        bonus_form: the exploration bonus its bonus responses carry (``model.bonus_form``);
            None when it makes none.
        pair_fields: per-pair fields it sets on ``TokenizedPair`` (a loss that reads them
            needs this mode).
        loss_types: the ``model.loss_type`` values it trains (None: any without fields).
    """

    name: ClassVar[str]
    method: ClassVar[str | None] = None
    needs_labeller: ClassVar[bool] = True
    needs_scores: ClassVar[bool] = False
    min_samples: ClassVar[int] = 1
    policy_labels: ClassVar[bool] = False
    response_term: ClassVar[bool] = False
    bonus_form: ClassVar[str | None] = None
    pair_fields: ClassVar[tuple[str, ...]] = ()
    loss_types: ClassVar[tuple[str, ...] | None] = None

    def check_sampling(self, sampling: SamplingOptions) -> None:
        """Refuses sampling options the mode cannot work with (the callback calls it)."""
        if sampling.num_samples < self.min_samples:
            raise ValueError(f"pair_mode={self.name} needs {self.min_samples} samples per "
                             f"prompt: sampling.num_samples must be >= {self.min_samples}, got "
                             f"{sampling.num_samples}")

    def generate(self, pair: PolicyPair, prompt_ids: list[list[int]],
                 sampling: SamplingOptions, *, seed: int, **gen: Any) -> list[list[list[int]]]:
        """Per prompt, the responses the mode selects from. Default: ``num_samples`` policy
        samples."""
        # The policy's samples come from sampling.engine (hf or vllm); a reference's from HF.
        return get_engine(sampling).generate(pair.policy, prompt_ids, sampling, seed=seed, **gen)

    def select(self, inputs: RoundInputs) -> list[Selected]:
        """One pair per prompt, chosen first."""
        raise NotImplementedError

    def conflicts(self, spec: Any) -> list[str]:
        """Mode-specific disagreements with a ``MethodSpec`` beyond the declared rules."""
        return []


_REGISTRY: dict[str, PairMode] = {}


def register(cls: type[PairMode]) -> type[PairMode]:
    """Class decorator: makes ``cls`` available as ``pair_mode: <cls.name>``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pair mode {cls.name!r} is registered twice")
    if unknown := set(cls.pair_fields) - set(PAIR_FIELDS):
        raise ValueError(f"pair mode {cls.name!r} sets {sorted(unknown)}, which are not "
                         f"per-pair fields (common.PAIR_FIELDS: {sorted(PAIR_FIELDS)})")
    _REGISTRY[cls.name] = cls()
    return cls


def pair_mode_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_pair_mode(name: str) -> PairMode:
    """The registered mode called ``name``; ValueError naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"pair_mode must be one of {pair_mode_names()}, got {name!r}")
    return _REGISTRY[name]


def one_sample(sampling: SamplingOptions, **changes: Any) -> SamplingOptions:
    return replace(sampling, num_samples=1, **changes)


def make_pair(prompt_ids: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
              bonus: Sequence[int] | None = None) -> TokenizedPair:
    return TokenizedPair(list(prompt_ids), list(chosen), list(rejected),
                         bonus_ids=list(bonus) if bonus is not None else None)


def ordered(a: float, b: float, a_chosen: bool) -> dict[str, float]:
    return {"chosen": a, "rejected": b} if a_chosen else {"chosen": b, "rejected": a}


