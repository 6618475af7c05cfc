"""Per-sequence log-probabilities of responses, from logits and masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """Sum of log pi(token) over response tokens, and the number of response tokens.

    Logits at position ``t`` predict token ``t + 1``, so both are shifted by one. Prompt and
    padding tokens are excluded by ``response_mask`` (1 on response tokens, eos included).

    Args:
        logits: ``(N, T, V)``.
        input_ids: ``(N, T)``.
        response_mask: ``(N, T)``, 1 where a token belongs to the response.

    Returns:
        ``(sums, counts)``, each of shape ``(N,)``; ``sums / counts`` is the per-token mean
        that IPO uses.
    """
    labels = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(torch.bool)
    token_logps = _token_logprobs(logits[:, :-1], labels)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def _token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    logits = logits.float()
    # log_softmax(x)[y] = x[y] - logsumexp(x): avoids materialising a second (..., V) tensor.
    return logits.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _head_logprobs(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    return _token_logprobs(head(hidden), labels)


def concatenated_logprobs(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 0
) -> tuple[Tensor, Tensor]:
    """One forward pass over chosen and rejected sequences stacked on the batch axis.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``response_mask`` of shape
    ``(2B, T)``: rows ``[:B]`` are chosen, ``[B:]`` rejected (see ``PreferenceCollator``).

    With ``chunk_size > 0`` the output layer runs on response positions only, ``chunk_size``
    of them at a time, and is recomputed in backward (``chunked_head_logprobs``): no
    ``(N, T, V)`` logits exist, which at real vocabularies are the step's largest tensors.
    """
    if chunk_size > 0:
        return chunked_head_logprobs(model, batch, chunk_size)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"])


def chunked_head_logprobs(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``concatenated_logprobs`` with the output layer applied ``chunk_size`` response tokens
    at a time, each chunk under activation checkpointing.

    The model runs as usual, but a forward pre-hook on its output layer keeps the final hidden
    states and lets the layer see the last position only. Each chunk's ``(chunk, V)`` logits
    are freed after its log-probs are taken and rebuilt in backward, so the logits' memory is
    one chunk's, whatever the batch and sequence length. Same values as the full path (up to
    float summation order).

    Raises:
        ValueError: when the model changes logits after its output layer (e.g. Gemma-2's soft
            capping): chunking would skip that step, so it is refused rather than wrong.
    """
    ids, mask = batch["input_ids"], batch["response_mask"][:, 1:].to(torch.bool)
    head = model.get_output_embeddings()
    captured: list[Tensor] = []

    def keep_hidden(_module, args):
        # Contiguous: a strided (N, 1, H) slice sends matmul down a batched path that copies
        # the output layer's weight N times (measured: 94 MiB per forward, N = 2 copies of a
        # bf16 32000 x 768 weight).
        captured[:] = [args[0], args[0][:, -1:].contiguous()]
        return (captured[1], *args[1:])

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        last = model(input_ids=ids, attention_mask=batch["attention_mask"],
                     use_cache=False).logits
    finally:
        handle.remove()
    hidden, hidden_last = captured
    if hidden.shape[:2] != ids.shape:
        raise ValueError(f"logprob_chunk_size: the output layer of {type(model).__name__} got "
                         f"hidden states of shape {tuple(hidden.shape)}, not one per token "
                         f"{tuple(ids.shape)}; set logprob_chunk_size: 0")
    _check_plain_head(model, head, hidden_last, last)
    rows, cols = mask.nonzero(as_tuple=True)
    positions = hidden[:, :-1][rows, cols]  # (M, H): the states that predict response tokens
    labels = ids[:, 1:][rows, cols]
    parts = []
    for start in range(0, labels.shape[0], chunk_size):
        h, y = positions[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_head_logprobs, head, h, y, use_reentrant=False))
        else:
            parts.append(_head_logprobs(head, h, y))
    token_logps = torch.cat(parts) if parts else positions.new_zeros(0, dtype=torch.float32)
    sums = token_logps.new_zeros(ids.shape[0]).index_add(0, rows, token_logps)
    return sums, mask.sum(-1)


def _check_plain_head(model: nn.Module, head: nn.Module, hidden_last: Tensor,
                      logits_last: Tensor) -> None:
    """The model's logits must be its output layer's output, unchanged (checked once)."""
    # A marker of ours on the model's own module (private so no model attribute clashes):
    # the check below runs once per head.
    if getattr(head, "_sail_plain_head", False):
        return
    with torch.no_grad():
        direct = head(hidden_last)
    if direct.shape != logits_last.shape or not torch.allclose(
            direct.float(), logits_last.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(f"logprob_chunk_size: {type(model).__name__} transforms its logits "
                         "after the output layer (e.g. soft capping or scaling), which the "
                         "chunked output layer would skip; set logprob_chunk_size: 0")
    head._sail_plain_head = True
