"""Built responses: text that meets a chosen subset of a prompt's constraints and breaks the
rest, so that the task has offline pairs (and the tests a witness that every combination the
task assigns can be met) without any model.

The text is filler (random common words), not an answer to the instruction: a policy trained
on these pairs learns the constraints' forms, not helpfulness. Real offline pairs are a
policy's own samples labelled by the oracle (``InstructionsTask.label_pairs``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Collection, Sequence

from sail_lightning.instructions.constraints import KEYWORDS, Constraint, count_words

# Filler: lowercase, no keyword of KEYWORDS, no word that starts "p.s.".
FILLER = tuple("""
the a of to and in that it for on with as at by from this be are was can will more
people time year way day thing world life hand part place case week work number point home
water room area money story fact month lot right study book eye job word business issue side
kind head house service friend power hour game line end member law car city name team minute
idea kid body back parent face others level office door health person art war history party
result change morning reason research girl guy moment air teacher force education food
simple clear useful good small large early often always many several new old great best
make know think take see come want look use find give tell ask seem feel try leave call
keep help start show hear play run move like live believe hold bring happen write provide
""".split())
assert not set(FILLER) & set(KEYWORDS)


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def _chunks(words: list[str], parts: int) -> list[list[str]]:
    """``words`` cut into ``parts`` non-empty runs (fewer words than parts: padded)."""
    words = words + ["more"] * max(0, parts - len(words))
    size, extra = divmod(len(words), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(words[start:end])
        start = end
    return out


def _compose(cs: dict[str, Constraint], meet: set[str], words: list[str],
             rng_state: random.Random) -> str:
    """The text for a given body; ``meet``: kinds to satisfy (the others in ``cs`` broken)."""
    def on(kind: str) -> bool:
        return kind in cs and kind in meet

    def off(kind: str) -> bool:
        return kind in cs and kind not in meet

    rng = random.Random(rng_state.random())  # the same extras for every body length
    body = list(words)
    if on("keyword"):
        body.insert(len(body) // 2, str(cs["keyword"].value))
    if "placeholders" in cs:
        n = int(cs["placeholders"].value) - (0 if on("placeholders") else 1)
        for i in range(n):
            body.insert((i * 7) % (len(body) + 1), f"[{rng.choice(FILLER)}]")
    comma = off("no_commas")
    if "bullets" in cs:
        n = int(cs["bullets"].value) + (0 if on("bullets") else 1)
        lines = [("* " + " ".join(c)) for c in _chunks(body, n)]
        blocks = [[" ".join(_words(rng, 4)) + (", as follows" if comma else ":"), *lines]]
    elif "paragraphs" in cs:
        n = int(cs["paragraphs"].value) + (0 if on("paragraphs") else 1)
        blocks = [[" ".join(c) + "."] for c in _chunks(body, n)]
    else:
        blocks = [[" ".join(body) + "."]]
    if comma:
        first = blocks[0][0].split(" ")
        blocks[0][0] = " ".join([first[0] + ",", *first[1:]])
    if on("title"):
        blocks[0].insert(0, "<<" + " ".join(_words(rng, 3)) + ">>")
    if on("postscript"):
        mark = "p.s." if on("lowercase") else "P.S."
        blocks[-1].append(f"{mark} " + " ".join(_words(rng, 4)) + ".")
    if on("ending"):
        blocks[-1][-1] += " " + str(cs["ending"].value)
    text = "\n\n".join("\n".join(b) for b in blocks)
    if not on("lowercase"):  # one capital: sentence case, and "lowercase" broken if asked
        text = re.sub(r"[a-z]", lambda m: m.group(0).upper(), text, count=1)
    if on("quotation"):
        text = f'"{text}"'
    if on("json"):
        text = json.dumps({"answer": text})
    return text


def build_response(constraints: Sequence[Constraint], rng: random.Random,
                   meet: Collection[str] | None = None) -> str:
    """A response that meets the constraints of the kinds in ``meet`` (default: all) and
    breaks the others.

    The word count is aimed inside a ``min_words`` / ``max_words`` bound when it is met, and
    outside when broken; without one, about 40 words.
    """
    cs = {c.kind: c for c in constraints}
    meet = set(cs) if meet is None else set(meet)
    target = 40
    if "min_words" in cs:
        v = int(cs["min_words"].value)
        target = v + 10 if "min_words" in meet else max(8, v // 3)
    if "max_words" in cs:
        v = int(cs["max_words"].value)
        target = v - 20 if "max_words" in meet else v + 20
    state = random.Random(rng.random())
    overhead = count_words(_compose(cs, meet, [], random.Random(state.random())))
    seed = state.random()
    words = _words(state, max(3, target - overhead))
    return _compose(cs, meet, words, random.Random(seed))
