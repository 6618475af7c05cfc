"""Turn preference records into token ids, and batches of them into padded tensors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sail_lightning.common import PAIR_FIELDS
from sail_lightning.data.records import DROP_REASONS, PreferenceRecord, ReadStats

logger = logging.getLogger("sail_lightning.data")

# Above this share of unknown tokens the model is trained on noise: a word-level
# tokenizer (the synthetic task's) reading English maps nearly every word to <unk>.
UNK_WARN_RATE = 0.05


@dataclass(frozen=True)
class TokenizedPair:
    """A prompt and two responses as token ids (responses end with eos unless truncated).

    Optional: reference log-probs computed once per pool (then the training step skips the
    reference forward), and a third response that carries an exploration bonus (SELM's
    reference sample, XPO's reference sample) with its reference log-prob.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    bonus_ids: list[int] | None = None
    ref_bonus: float | None = None
    # Per-pair fields (common.PAIR_FIELDS). SPPO: each response's estimated probability of
    # beating the policy.
    win_chosen: float | None = None
    win_rejected: float | None = None

    def example(self, route: int) -> dict:
        """The dict a DataLoader yields for this pair with its route."""
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids,
                "rejected_ids": self.rejected_ids, "route": int(route),
                "ref_chosen": self.ref_chosen, "ref_rejected": self.ref_rejected,
                "bonus_ids": self.bonus_ids, "ref_bonus": self.ref_bonus,
                **{k: getattr(self, k) for k in PAIR_FIELDS}}


def encode_prompts(
    tokenizer, records: Sequence[PreferenceRecord], max_length: int
) -> list[list[int]]:
    """Prompt ids, through the tokenizer's chat template when it has one, in one batched call
    (one call per text costs seconds on thousands of pairs).

    Truncated from the left: the end of a dialogue, next to the response, matters most.
    """
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in r.messages],
            add_generation_prompt=True, tokenize=False) for r in records]
        # The template already holds any bos token: do not add it twice. verbose=False: no
        # "sequence length is longer than ... indexing errors" warning, the ids are cut here.
        ids = (tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
               if texts else [])
    else:
        ids = tokenizer([r.prompt for r in records], verbose=False)["input_ids"] if records else []
    return [x[-max_length:] for x in ids]


def encode_responses(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Response ids followed by eos, truncated from the right (a truncated one has no eos)."""
    if not texts:
        return []
    if getattr(tokenizer, "chat_template", None):
        # Chat templates render assistant turns trimmed; raw HH keeps "Assistant: reply".
        texts = [t.lstrip() for t in texts]
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]  # cut here
    return [(x + [tokenizer.eos_token_id])[:max_length] for x in ids]


def encode_prompt(tokenizer, record: PreferenceRecord, max_length: int) -> list[int]:
    """:func:`encode_prompts` of one record."""
    return encode_prompts(tokenizer, [record], max_length)[0]


def encode_response(tokenizer, text: str, max_length: int) -> list[int]:
    """:func:`encode_responses` of one text."""
    return encode_responses(tokenizer, [text], max_length)[0]


def tokenize_records(
    tokenizer, records: Sequence[PreferenceRecord], max_prompt_length: int, max_response_length: int
) -> list[TokenizedPair]:
    """Tokenize every record, one pair per record in order; nothing is dropped here.

    Pairs whose responses become identical after truncation are kept: use
    :func:`tokenize_and_filter` to drop and count them.
    """
    prompts = encode_prompts(tokenizer, records, max_prompt_length)
    chosen = encode_responses(tokenizer, [r.chosen for r in records], max_response_length)
    rejected = encode_responses(tokenizer, [r.rejected for r in records], max_response_length)
    return [TokenizedPair(p, c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def tokenize_and_filter(
    tokenizer,
    records: Sequence[PreferenceRecord],
    max_prompt_length: int,
    max_response_length: int,
    *,
    stats: ReadStats | None = None,
) -> tuple[list[PreferenceRecord], list[TokenizedPair]]:
    """Tokenize every record and drop the pairs whose two responses have the same ids.

    Distinct texts share their ids when they differ only after ``max_response_length``
    tokens (or only in what the tokenizer drops); the DPO loss of such a pair is constant,
    and a preference between identical responses is noise. Dropped pairs are logged in
    one warning with the first location.

    Args:
        tokenizer: As in :func:`tokenize_records`.
        records: The records.
        max_prompt_length: As in :func:`tokenize_records`.
        max_response_length: As in :func:`tokenize_records`.
        stats: Updated if given: the dropped pairs move from ``kept`` to
            ``dropped["identical_tokens"]``, so the stats of the read stay consistent.

    Returns:
        The kept records and their pairs, aligned, in order.
    """
    pairs = tokenize_records(tokenizer, records, max_prompt_length, max_response_length)
    keep = [i for i, p in enumerate(pairs) if p.chosen_ids != p.rejected_ids]
    dropped = len(pairs) - len(keep)
    if dropped:
        first = next(r.location for r, p in zip(records, pairs, strict=True)
                     if p.chosen_ids == p.rejected_ids)
        logger.warning("dropped %d pair(s) [identical_tokens: %s, max_response_length=%d], "
                       "first at %s", dropped, DROP_REASONS["identical_tokens"],
                       max_response_length, first)
        if stats is not None:
            stats.dropped["identical_tokens"] += dropped
            stats.kept -= dropped
    return [records[i] for i in keep], [pairs[i] for i in keep]


def unk_rate(tokenizer, texts: Sequence[str]) -> float:
    """The share of the tokens of ``texts`` that are the tokenizer's unknown token.

    Args:
        tokenizer: A Hugging Face tokenizer; one without an unknown token (byte-level BPE
            has none: every byte is in its vocabulary) gives 0.0.
        texts: Plain texts, tokenized without special tokens.

    Returns:
        ``unknown tokens / tokens``, 0.0 when there are no tokens.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return 0.0
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    total = sum(len(x) for x in ids)
    return sum(x.count(unk) for x in ids) / total if total else 0.0


def check_unk_rate(
    tokenizer,
    texts: Sequence[str],
    *,
    tokenizer_name: str,
    source: str,
    threshold: float = UNK_WARN_RATE,
) -> float:
    """:func:`unk_rate`, with a warning naming the tokenizer and the source above ``threshold``.

    Returns:
        The rate (the DataModule logs it as ``data/unk_rate``).
    """
    rate = unk_rate(tokenizer, texts)
    if rate > threshold:
        logger.warning(
            "tokenizer %r maps %.1f%% of the tokens of %s to its unknown token %r (more than "
            "%.0f%%): the model would learn from noise; use a tokenizer that covers the text "
            "(data.tokenizer, linked from model.tokenizer)", tokenizer_name, 100 * rate, source,
            tokenizer.unk_token, 100 * threshold)
    return rate


def padded_length(example: dict) -> int:
    """The longest row of an example (``TokenizedPair.example``) as the collator lays it out:
    prompt plus its longest response (the batch is padded to its longest row)."""
    responses = (example.get(k) or [] for k in ("chosen_ids", "rejected_ids", "bonus_ids"))
    return len(example["prompt_ids"]) + max(len(r) for r in responses)


class PreferenceCollator:
    """Pads a list of examples into one batch with chosen and rejected stacked.

    Rows ``[:B]`` of ``input_ids``, ``attention_mask`` and ``response_mask`` are
    prompt+chosen, rows ``[B:2B]`` prompt+rejected, right-padded to one length so that each
    model runs once per batch. ``route`` has shape ``(B,)``; ``routes_present`` is the
    sorted tuple of the distinct routes (not a tensor: the training step reads it without a
    host sync; code that changes ``route`` must update it, or delete it). When any example carries a
    bonus response, rows ``[2B:3B]`` are prompt+bonus and ``bonus_mask`` (B,) marks the
    examples that have one. When every example has cached reference log-probs, they come
    as ``ref_logps`` of shape ``(2B,)`` (``(3B,)`` with bonus rows). When any example carries
    SPPO's win probabilities, ``win_chosen`` and ``win_rejected`` are ``(B,)`` (the hard
    ``1`` and ``0`` for examples without).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        rows, masks = [], []
        has_bonus = any(ex.get("bonus_ids") for ex in examples)
        keys = ("chosen_ids", "rejected_ids", "bonus_ids") if has_bonus else ("chosen_ids",
                                                                               "rejected_ids")
        for key in keys:
            for ex in examples:
                response = ex.get(key) or []
                rows.append(ex["prompt_ids"] + response)
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(response))
        routes = [int(ex["route"]) for ex in examples]
        width = max(len(r) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        response_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (row, mask) in enumerate(zip(rows, masks, strict=False)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            response_mask[i, : len(row)] = torch.tensor(mask)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "route": torch.tensor(routes, dtype=torch.long),
            # The routes present, as a plain Python value: the training step decides which
            # terms to compute from it without asking the device (a host sync per check).
            "routes_present": tuple(sorted(set(routes))),
        }
        ref_keys = ("ref_chosen", "ref_rejected") + (("ref_bonus",) if has_bonus else ())
        if all(ex.get("ref_chosen") is not None for ex in examples) and (
            not has_bonus or all(ex.get("ref_bonus") is not None or not ex.get("bonus_ids")
                                 for ex in examples)):
            batch["ref_logps"] = torch.tensor(
                [float(ex.get(k) or 0.0) for k in ref_keys for ex in examples])
        if has_bonus:
            batch["bonus_mask"] = torch.tensor([bool(ex.get("bonus_ids")) for ex in examples])
        for key, absent in PAIR_FIELDS.items():
            if any(ex.get(key) is not None for ex in examples):
                # float64: the loss casts them to its inputs' dtype, whatever that is.
                batch[key] = torch.tensor([absent if ex.get(key) is None else float(ex[key])
                                           for ex in examples], dtype=torch.float64)
        return batch
