"""Per-sequence log-probabilities of responses, from logits and masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sequence_logprobs(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_size: int = 0
) -> tuple[Tensor, Tensor]:
    """Sum of log pi(token) over response tokens, and the number of response tokens.

    Logits at position ``t`` predict token ``t + 1``, so both are shifted by one. Prompt and
    padding tokens are excluded by ``response_mask`` (1 on response tokens, eos included).

    Args:
        logits: ``(N, T, V)``.
        input_ids: ``(N, T)``.
        response_mask: ``(N, T)``, 1 where a token belongs to the response.
        chunk_size: if > 0, rows are processed this many at a time: the ``(N, T, V)``
            float32 log-softmax is the peak of a training step for large vocabularies.

    Returns:
        ``(sums, counts)``, each of shape ``(N,)``; ``sums / counts`` is the per-token mean
        that IPO uses.
    """
    labels = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(torch.bool)
    logits = logits[:, :-1]
    step = chunk_size if chunk_size > 0 else logits.shape[0]
    sums = []
    for start in range(0, logits.shape[0], step):
        part = logits[start : start + step].float()
        # log_softmax(x)[y] = x[y] - logsumexp(x): avoids materialising a second (N,T,V).
        picked = part.gather(-1, labels[start : start + step, :, None]).squeeze(-1)
        token_logps = picked - torch.logsumexp(part, dim=-1)
        sums.append((token_logps * mask[start : start + step]).sum(-1))
    return torch.cat(sums), mask.sum(-1)


def concatenated_logprobs(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 0
) -> tuple[Tensor, Tensor]:
    """One forward pass over chosen and rejected sequences stacked on the batch axis.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``response_mask`` of shape
    ``(2B, T)``: rows ``[:B]`` are chosen, ``[B:]`` rejected (see ``PreferenceCollator``).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"], chunk_size)
