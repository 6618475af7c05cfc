"""One online round: sample from the policy, label, select pairs, cache reference log-probs.

The methods differ in their pair mode (``sail_lightning.pair_modes``: one class per mode, in
its own file), not in this loop or the training step: the mode generates the responses and
selects and orients one pair per prompt; this times the steps, decodes each sample once and
caches the pairs' reference log-probs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from sail_lightning.data.pool import OnlinePair
from sail_lightning.data.records import PreferenceRecord
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.generation import SamplingOptions, decode
from sail_lightning.interfaces import Labeller
from sail_lightning.pair_modes import RoundInputs, get_pair_mode
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
        pair_mode: a registered pair mode's name (``pair_modes.pair_mode_names()``).
        beta: the run's DPO beta (SAIL-PP's self-labels).
        routes: ``Route.PP`` or ``Route.PR`` per prompt.
        prompt_positions: each prompt's position in the whole round (the pool's order).
        seed: seed of this shard's sampling and label draws.
    """
    mode = get_pair_mode(pair_mode)
    tok = tokenizer
    prompt_ids = [p.prompt_ids for p in offline]
    t0 = time.perf_counter()
    samples = mode.generate(pair, prompt_ids, sampling, seed=seed,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            progress=progress, synced_gpus=synced_gpus)
    gen_seconds = time.perf_counter() - t0
    generated = [s for group in samples for s in group]
    texts = [[decode(tok, s) for s in group] for group in samples]

    t1 = time.perf_counter()
    selected = mode.select(RoundInputs(pair, tok, records, offline, labeller, samples, texts,
                                       routes, beta, seed, score_batch_size))
    label_seconds = time.perf_counter() - t1

    # Reference log-probs once, now: the training step then skips the reference forward.
    t2 = time.perf_counter()
    _, ref = pair.pair_logprobs([s.pair for s in selected], policy=False,
                                batch_size=score_batch_size)
    ref_seconds = time.perf_counter() - t2
    out = []
    for k, s in enumerate(selected):
        p = replace(s.pair, ref_chosen=float(ref[k, 0]), ref_rejected=float(ref[k, 1]),
                    ref_bonus=float(ref[k, 2]) if s.pair.bonus_ids else None)
        out.append(OnlinePair(
            prompt=records[k].prompt, chosen=s.chosen, rejected=s.rejected, pair=p,
            route=int(routes[k]), round=round_index, prompt_index=prompt_positions[k],
            seed=seed, label=s.label, scores=s.scores))
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

