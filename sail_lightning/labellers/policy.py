"""PolicyLabeller: the policy's own Bradley-Terry model labels its samples (SAIL-PP)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sail_lightning.data.tokenize import TokenizedPair, encode_responses
from sail_lightning.labellers.base import Labeller, Labels, Messages, check_lengths
from sail_lightning.objectives import margin, self_label_probability

if TYPE_CHECKING:
    from sail_lightning.policy_pair import PolicyPair


class PolicyLabeller(Labeller):
    """The policy's own implicit Bradley-Terry model (SAIL-PP): ``a`` is chosen with
    probability ``sigmoid(beta * h)`` (``objectives.self_label_probability``), ``h`` the
    log-ratio margin under the policy and reference of this moment, drawn from a seeded
    generator.

    Args:
        pair: the policy and its reference (``SAILModule.pair``).
        beta: the DPO beta of the run (``model.beta``).
        tokenizer: the policy's tokenizer, to label text; the online loop passes token ids
            to :meth:`label_ids` instead (exact, no re-tokenization).
        seed: seed of the draws (the online loop reseeds it per round and rank).
        batch_size: pairs per scoring forward.
    """

    def __init__(self, pair: PolicyPair, beta: float, tokenizer: Any = None, *, seed: int = 0,
                 batch_size: int = 32) -> None:
        self.pair = pair
        self.beta = beta
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def probabilities(self, prompt_ids: Sequence[list[int]], ids_a: Sequence[list[int]],
                      ids_b: Sequence[list[int]]) -> torch.Tensor:
        """``sigmoid(beta * h)`` per pair, in float64 on the CPU."""
        n = check_lengths(prompts=prompt_ids, responses_a=ids_a, responses_b=ids_b)
        pairs = [TokenizedPair(list(prompt_ids[k]), list(ids_a[k]), list(ids_b[k]))
                 for k in range(n)]
        pol, ref = self.pair.pair_logprobs(pairs, policy=True, batch_size=self.batch_size)
        h = margin(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1])
        return self_label_probability(h, beta=self.beta)

    def label_ids(self, prompt_ids: Sequence[list[int]], ids_a: Sequence[list[int]],
                  ids_b: Sequence[list[int]]) -> Labels:
        p = self.probabilities(prompt_ids, ids_a, ids_b)
        return Labels(a_preferred=torch.bernoulli(p, generator=self.generator).bool())

    def label(self, prompts: Sequence[str], responses_a: Sequence[str],
              responses_b: Sequence[str], *, messages: Messages | None = None) -> Labels:
        check_lengths(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
        if self.tokenizer is None:
            raise ValueError("PolicyLabeller.label needs the policy's tokenizer to label text")
        tok = self.tokenizer
        prompt_ids = tok(list(prompts))["input_ids"]
        # As the DataModule encodes responses, without a length limit.
        a = encode_responses(tok, responses_a, sys.maxsize)
        b = encode_responses(tok, responses_b, sys.maxsize)
        return self.label_ids(prompt_ids, a, b)
