"""A labeller of your own: a plain function that scores responses, higher is better.

CallableLabeller calls ``score(prompts, responses)`` with two lists of strings and takes a
list of floats (or a tensor) back; the higher-scored response of a pair becomes the chosen
one. Here, for the synthetic task (prompts like ``"d b a ="``, ideal response ``"a b d"``):
the share of positions where the response has the sorted prompt's letter, minus a penalty
for each missing or extra word (the task's rule, without the oracle's Bradley-Terry noise).
Swap in a call to your own scorer, a rule set or a model.
"""


def score(prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for prompt, response in zip(prompts, responses, strict=True):
        ideal = sorted(prompt.replace("=", " ").split())
        words = response.split()
        hits = sum(a == b for a, b in zip(words, ideal, strict=False))
        scores.append(hits / len(ideal) - 0.5 * abs(len(words) - len(ideal)) / len(ideal))
    return scores
