"""The verifiable constraints of the instructions task, in the style of IFEval.

Each constraint is a sentence appended to a real instruction, rendered from a fixed template,
and a check of the response text that is exact (no model, no judgement). The sentences are
parsed back from the prompt text (:func:`parse_constraints`), so a scorer needs nothing but
the prompt: no table keyed by prompt, no seed that must match the one that made the data.

Words are ``\\w+`` runs, apostrophes inside a word kept (``"don't"`` is one word, ``"P.S."``
two), counted by :func:`count_words`. The table of kinds, their sentences and checks is in
``docs/instructions_task.md``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

WORD = re.compile(r"\w+(?:['\u2019]\w+)*")
# Words for the keyword constraint: common, lowercase, never in the filler vocabulary of the
# built responses (responses.py), so a built response contains one only when asked to.
KEYWORDS = ("river", "balance", "future", "garden", "signal", "window", "harvest", "bridge",
            "mirror", "journey", "lantern", "compass", "anchor", "canvas", "thunder", "meadow",
            "puzzle", "orbit", "ember", "harbor", "velvet", "summit", "echo", "marble")
# Ending phrases carry capitals, as IFEval's do; hence the conflict with "lowercase".
ENDINGS = ("Is there anything else I can help with?", "Any other questions?",
           "Let me know if you have additional questions.", "That is all I have to say.")


def count_words(text: str) -> int:
    """The number of words of ``text`` (``\\w+`` runs, inner apostrophes kept)."""
    return len(WORD.findall(text))


def _json_value(text: str) -> object | None:
    """``text`` as a JSON object or list (markdown fences allowed), else None."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?\s*```", body, re.DOTALL)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict | list) else None


def _paragraphs(text: str) -> int:
    return sum(1 for p in re.split(r"\n\s*\n", text.strip()) if p.strip())


BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")


@dataclass(frozen=True)
class Kind:
    """One kind of constraint.

    Attributes:
        template: The sentence; ``{v}`` is the value (absent for kinds without one).
        check: ``check(response, value) -> bool``, on the stripped response text.
        values: The values drawn from (empty: the kind has none).
        conflicts: Kinds it cannot be combined with (no response could meet both, or
            meeting one would force breaking the other's form).
    """

    template: str
    check: Callable[[str, object], bool]
    values: tuple = ()
    conflicts: frozenset[str] = frozenset()


KINDS: dict[str, Kind] = {
    "min_words": Kind("Answer with at least {v} words.",
                      lambda r, v: count_words(r) >= v, (30, 50, 80),
                      frozenset({"max_words"})),
    "max_words": Kind("Answer with at most {v} words.",
                      lambda r, v: count_words(r) <= v, (50, 80, 120),
                      frozenset({"min_words"})),
    "no_commas": Kind("Do not use any commas in your response.",
                      lambda r, v: "," not in r and "\uff0c" not in r),
    "lowercase": Kind("Your entire response must be in lowercase letters, with no capital "
                      "letters at all.",
                      lambda r, v: r == r.lower() and any(c.isalpha() for c in r),
                      conflicts=frozenset({"ending"})),
    "keyword": Kind('Include the keyword "{v}" in your response.',
                    lambda r, v: re.search(rf"\b{re.escape(v)}\b", r, re.IGNORECASE) is not None,
                    KEYWORDS),
    "ending": Kind('End your response with the exact phrase "{v}" and nothing after it.',
                   lambda r, v: r.endswith(v), ENDINGS,
                   frozenset({"lowercase", "json", "postscript", "quotation"})),
    "bullets": Kind('Your answer must contain exactly {v} bullet points, each on its own line '
                    'starting with "* ".',
                    lambda r, v: len(BULLET.findall(r)) == v, (2, 3, 4, 5),
                    frozenset({"json", "paragraphs", "quotation"})),
    "title": Kind("Give your answer a title wrapped in double angular brackets, such as "
                  "<<poem of joy>>.",
                  lambda r, v: re.search(r"<<[^<>\n]*\w[^<>\n]*>>", r) is not None,
                  conflicts=frozenset({"json"})),
    "json": Kind("Wrap your entire output in JSON format: a JSON object or list (markdown "
                 "ticks such as ``` are allowed).",
                 lambda r, v: _json_value(r) is not None,
                 conflicts=frozenset({"ending", "bullets", "title", "paragraphs", "postscript",
                                      "quotation"})),
    "paragraphs": Kind("Your response should contain exactly {v} paragraphs, separated from "
                       "each other by blank lines.",
                       lambda r, v: _paragraphs(r) == v, (2, 3, 4),
                       frozenset({"json", "bullets"})),
    "postscript": Kind("At the end of your response, add a postscript starting with P.S.",
                       lambda r, v: re.search(r"^\s*p\.\s?s\.\s*\S", r,
                                              re.IGNORECASE | re.MULTILINE) is not None,
                       conflicts=frozenset({"ending", "json", "quotation"})),
    "quotation": Kind("Wrap your entire response in double quotation marks.",
                      lambda r, v: len(r) > 2 and r[0] == '"' and r[-1] == '"',
                      conflicts=frozenset({"ending", "json", "bullets", "postscript"})),
    "placeholders": Kind("Include at least {v} placeholders in square brackets, such as "
                         "[address].",
                         lambda r, v: len(PLACEHOLDER.findall(r)) >= v, (1, 2, 3)),
}


@dataclass(frozen=True)
class Constraint:
    """A constraint: its kind (a key of :data:`KINDS`) and value (None for kinds without)."""

    kind: str
    value: int | str | None = None

    def text(self) -> str:
        """The sentence appended to the instruction."""
        return KINDS[self.kind].template.format(v=self.value)

    def check(self, response: str) -> bool:
        """Whether ``response`` (as decoded; surrounding whitespace ignored) meets it."""
        return bool(KINDS[self.kind].check(response.strip(), self.value))


def _sentence_pattern(kind: str) -> re.Pattern:
    head, _, tail = KINDS[kind].template.partition("{v}")
    value = r"(?P<v>\d+)" if KINDS[kind].values and isinstance(KINDS[kind].values[0], int) \
        else r'(?P<v>[^"]+)'
    return re.compile(re.escape(head) + (value + re.escape(tail) if "{v}" in
                                         KINDS[kind].template else ""))


_PATTERNS = {kind: _sentence_pattern(kind) for kind in KINDS}


def render(instruction: str, constraints: Sequence[Constraint]) -> str:
    """The prompt: the instruction, a blank line, then the constraints' sentences."""
    return instruction.rstrip() + "\n\n" + " ".join(c.text() for c in constraints)


def parse_constraints(prompt: str) -> list[Constraint]:
    """The constraints of a prompt made by :func:`render` (its last paragraph).

    Raises:
        ValueError: The prompt's last paragraph is not a sequence of constraint sentences.
    """
    block = prompt.rstrip().rpartition("\n\n")[2]
    found, pos = [], 0
    while pos < len(block):
        if block[pos] == " ":
            pos += 1
            continue
        for kind, pattern in _PATTERNS.items():
            m = pattern.match(block, pos)
            if m:
                raw = m.groupdict().get("v")
                found.append(Constraint(kind, int(raw) if raw and raw.isdigit() else raw))
                pos = m.end()
                break
        else:
            raise ValueError("not an instructions-task prompt: its last paragraph is not a "
                             f"list of constraint sentences (at {block[pos:pos + 40]!r})")
    if not found:
        raise ValueError(f"not an instructions-task prompt (no constraints): {prompt[-80:]!r}")
    return found


def sample_constraints(rng: random.Random, k: int) -> list[Constraint]:
    """``k`` constraints of distinct, mutually compatible kinds, drawn uniformly in turn."""
    chosen: list[Constraint] = []
    for _ in range(k):
        taken = {c.kind for c in chosen}
        blocked = taken | {x for c in chosen for x in KINDS[c.kind].conflicts}
        blocked |= {kind for kind, spec in KINDS.items() if spec.conflicts & taken}
        options = [kind for kind in KINDS if kind not in blocked]
        if not options:
            break
        kind = rng.choice(options)
        values = KINDS[kind].values
        chosen.append(Constraint(kind, rng.choice(values) if values else None))
    return chosen
