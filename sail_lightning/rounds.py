"""One online round: sample from the policy, label, select pairs, cache reference log-probs.

Pair modes (the methods differ here, not in the training step):

- ``two_samples``: two samples per prompt; SAIL-PP pairs are labelled by the policy's own
  Bradley-Terry model (a seeded Bernoulli draw), SAIL-PR / online DPO pairs by the labeller.
- ``best_worst``: ``num_samples`` samples per prompt, best and worst by labeller score
  (iterative DPO, rejection-sampling style).
- ``selm``: a greedy sample from the reference, ranked with the dataset's chosen and rejected
  responses; best and worst form the pair; the reference sample carries SELM's bonus.
- ``xpo``: a policy sample against a reference sample, labelled by the labeller; the
  reference sample carries XPO's bonus.
- ``spin``: the dataset's demonstration (its chosen response) against one policy sample,
  which is always rejected; no labeller (SPIN, ``objectives_selfplay``).
- ``sppo``: ``num_samples`` policy samples per prompt, each one's win probability against
  the others estimated from the labeller's scores; the highest and lowest form the pair
  and carry their estimates (SPPO, ``objectives_selfplay``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from sail_lightning.data.pool import OnlinePair
from sail_lightning.data.records import PreferenceRecord
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.engines import get_engine
from sail_lightning.generation import SamplingOptions, decode, generate_responses
from sail_lightning.labellers import Labeller, PolicyLabeller
from sail_lightning.objectives import Route
from sail_lightning.objectives_selfplay import win_probabilities
from sail_lightning.policy_pair import PolicyPair


def build_round(pair: PolicyPair, tokenizer: Any, records: list[PreferenceRecord],
                offline: list[TokenizedPair], labeller: Labeller | None,
                sampling: SamplingOptions, *, beta: float, pair_mode: str, round_index: int,
                routes: list[int], prompt_positions: list[int], seed: int,
                progress: bool = True, score_batch_size: int = 32,
                synced_gpus: bool = False) -> tuple[list[OnlinePair], dict]:
    """Pairs for the given prompts (one shard of a round) and timing statistics.

    Args:
        pair: the policy that samples (and its reference, for SELM / XPO and the cache).
        records, offline: the prompts' training records and their tokenized pairs.
        beta: the run's DPO beta (SAIL-PP's self-labels).
        routes: ``Route.PP`` or ``Route.PR`` per prompt.
        prompt_positions: each prompt's position in the whole round (the pool's order).
        seed: seed of this shard's sampling and label draws.
    """
    tok = tokenizer
    prompt_ids = [p.prompt_ids for p in offline]
    prompts = [r.prompt for r in records]
    messages = [r.messages for r in records]
    gen = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "progress": progress, "synced_gpus": synced_gpus}
    # The policy's samples come from sampling.engine (hf or vllm); the reference's from HF.
    sample = get_engine(sampling).generate
    t0 = time.perf_counter()
    if pair_mode in ("two_samples", "best_worst", "sppo"):
        samples = sample(pair.policy, prompt_ids, sampling, seed=seed, **gen)
    elif pair_mode == "spin":
        samples = sample(pair.policy, prompt_ids, replace(sampling, num_samples=1), seed=seed,
                         **gen)
    elif pair_mode == "selm":
        greedy = replace(sampling, num_samples=1, greedy=True)
        with pair.reference_model() as ref:
            samples = generate_responses(ref, prompt_ids, greedy, seed=seed, desc="reference",
                                         **gen)
    else:  # xpo
        one = replace(sampling, num_samples=1)
        policy = sample(pair.policy, prompt_ids, one, seed=seed, **gen)
        with pair.reference_model() as ref:
            reference = generate_responses(ref, prompt_ids, one, seed=seed + 1,
                                           desc="reference", **gen)
        samples = [p + r for p, r in zip(policy, reference, strict=True)]
    gen_seconds = time.perf_counter() - t0
    generated = [s for group in samples for s in group]
    texts = [[decode(tok, s) for s in group] for group in samples]

    t1 = time.perf_counter()
    selected: list[TokenizedPair] = []
    pair_texts: list[tuple[str, str]] = []  # each pair's chosen and rejected, decoded once
    label_names: list[str] = []
    scores: list[dict | None] = []
    if pair_mode in ("two_samples", "xpo"):
        a_pref = torch.zeros(len(samples), dtype=torch.bool)
        score_a = score_b = None
        pr = [k for k, r in enumerate(routes) if r == Route.PR]
        pp = [k for k, r in enumerate(routes) if r == Route.PP]
        if pr:
            if labeller is None:
                raise ValueError("SAIL-PR / online pairs need a labeller: set the callback's "
                                 "labeller (a reward model, judge, ranker or callable) or "
                                 "data.oracle")
            labels = labeller.label([prompts[k] for k in pr], [texts[k][0] for k in pr],
                                    [texts[k][1] for k in pr],
                                    messages=[messages[k] for k in pr])
            a_pref[pr] = labels.a_preferred
            if labels.scores_a is not None:
                score_a, score_b = torch.zeros(len(samples)), torch.zeros(len(samples))
                score_a[pr], score_b[pr] = labels.scores_a, labels.scores_b
        if pp:
            policy = PolicyLabeller(pair, beta, seed=seed, batch_size=score_batch_size)
            a_pref[pp] = policy.label_ids([prompt_ids[k] for k in pp],
                                          [samples[k][0] for k in pp],
                                          [samples[k][1] for k in pp]).a_preferred
        for k in range(len(samples)):
            c, r = (0, 1) if a_pref[k] else (1, 0)
            bonus = samples[k][1] if pair_mode == "xpo" else None
            selected.append(_pair(prompt_ids[k], samples[k][c], samples[k][r], bonus))
            pair_texts.append((texts[k][c], texts[k][r]))
            label_names.append("a" if a_pref[k] else "b")
            scores.append(None if score_a is None or routes[k] != Route.PR else
                          _ordered(float(score_a[k]), float(score_b[k]), bool(a_pref[k])))
    elif pair_mode == "spin":
        for k, o in enumerate(offline):
            selected.append(_pair(prompt_ids[k], o.chosen_ids, samples[k][0], None))
            # The demonstration as trained on: decoded from its (maybe truncated) tokens.
            pair_texts.append((decode(tok, o.chosen_ids), texts[k][0]))
            label_names.append("demonstration")
            scores.append(None)
    else:
        if labeller is None:
            raise ValueError(f"pair_mode={pair_mode!r} ranks candidates: set a scoring labeller")
        cands_ids, cands_txt = samples, texts
        if pair_mode == "selm":
            cands_ids = [s + [o.chosen_ids, o.rejected_ids] for s, o in zip(samples, offline,
                                                                              strict=True)]
            cands_txt = [t + [r.chosen, r.rejected] for t, r in zip(texts, records, strict=True)]
        flat_p = [prompts[k] for k, c in enumerate(cands_txt) for _ in c]
        flat_m = [messages[k] for k, c in enumerate(cands_txt) for _ in c]
        flat = labeller.score(flat_p, [t for c in cands_txt for t in c], messages=flat_m)
        if flat is None:
            raise ValueError(f"pair_mode={pair_mode!r} needs a labeller with scores "
                             f"(got {type(labeller).__name__})")
        start = 0
        for k, cands in enumerate(cands_ids):
            s = flat[start : start + len(cands)]
            start += len(cands)
            rank = win_probabilities(s[None].double())[0] if pair_mode == "sppo" else s
            best, worst = int(torch.argmax(rank)), int(torch.argmin(rank))
            bonus = samples[k][0] if pair_mode == "selm" else None
            selected.append(_pair(prompt_ids[k], cands[best], cands[worst], bonus))
            if pair_mode == "sppo":
                selected[-1] = replace(selected[-1], win_chosen=float(rank[best]),
                                       win_rejected=float(rank[worst]))
            # A policy sample's text is the one decoded above; a dataset response (selm) is
            # decoded from its tokens, which may be truncated, not taken from its record.
            pair_texts.append(tuple(texts[k][i] if i < len(texts[k]) else decode(tok, cands[i])
                                    for i in (best, worst)))
            label_names.append(f"best={best},worst={worst}")
            scores.append({"chosen": float(s[best]), "rejected": float(s[worst])})
    label_seconds = time.perf_counter() - t1

    # Reference log-probs once, now: the training step then skips the reference forward.
    t2 = time.perf_counter()
    _, ref = pair.pair_logprobs(selected, policy=False, batch_size=score_batch_size)
    ref_seconds = time.perf_counter() - t2
    out = []
    for k, p in enumerate(selected):
        p = replace(p, ref_chosen=float(ref[k, 0]), ref_rejected=float(ref[k, 1]),
                    ref_bonus=float(ref[k, 2]) if p.bonus_ids else None)
        out.append(OnlinePair(
            prompt=prompts[k], chosen=pair_texts[k][0], rejected=pair_texts[k][1],
            pair=p, route=int(routes[k]), round=round_index, prompt_index=prompt_positions[k],
            seed=seed, label=label_names[k], scores=scores[k]))
    eos = tok.eos_token_id
    stats = {
        "generated": len(generated),
        "tokens": sum(len(s) for s in generated),
        "eos": sum(bool(s) and s[-1] == eos for s in generated),
        "gen_seconds": gen_seconds,
        "label_seconds": label_seconds,
        "ref_seconds": ref_seconds,
    }
    return out, stats


def _pair(prompt_ids, chosen, rejected, bonus) -> TokenizedPair:
    return TokenizedPair(list(prompt_ids), list(chosen), list(rejected),
                         bonus_ids=list(bonus) if bonus is not None else None)


def _ordered(a: float, b: float, a_chosen: bool) -> dict[str, float]:
    return {"chosen": a, "rejected": b} if a_chosen else {"chosen": b, "rejected": a}
