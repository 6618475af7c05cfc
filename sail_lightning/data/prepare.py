"""From the DataModule's options to its pairs: the options checked, the sources read, the
held-out split, tokenized, counted (``data/*`` stats) and checked against the oracle.

Kept apart from ``PreferenceDataModule``, which owns the Lightning side (loaders, the epoch
mixture, checkpoint state) and calls ``check_options`` and ``prepare_pairs`` once each.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sail_lightning.data.mixture import check_epoch_scaling
from sail_lightning.data.records import (
    BAD_RECORD_MODES,
    PreferenceRecord,
    ReadStats,
    check_reading_options,
    looks_like_path,
    read_preference_records,
    records_from_dicts,
)
from sail_lightning.data.tokenize import TokenizedPair, check_unk_rate, tokenize_and_filter
from sail_lightning.instructions.task import InstructionsTask
from sail_lightning.interfaces import Labeller
from sail_lightning.synthetic import SyntheticTask
from sail_lightning.tokenizer import build_tokenizer

log = logging.getLogger("sail_lightning.data")

SYNTHETIC_SOURCE = "synthetic"
BUILT_IN_SOURCES = {
    SYNTHETIC_SOURCE: lambda hp: SyntheticTask().make_pairs(hp["num_synthetic_pairs"],
                                                            seed=hp["seed"]),
}
"""Data made in code, by ``data.source`` name: each makes ``{"prompt", "chosen",
"rejected"}`` rows from the DataModule's options."""
INSTRUCTIONS_SOURCE = "instructions"  # sail_lightning.instructions: real prompts, exact reward


@dataclass
class PreparedPairs:
    """What ``prepare_pairs`` read: records (text, for judges) and their tokenized pairs."""

    tokenizer: Any
    train_records: list[PreferenceRecord]
    val_records: list[PreferenceRecord]
    train_pairs: list[TokenizedPair]
    val_pairs: list[TokenizedPair]
    fingerprint: str
    stats: dict[str, float] = field(default_factory=dict)


def prepare_pairs(hp: Mapping[str, Any], oracle: Labeller | None) -> PreparedPairs:
    """Reads ``hp.source`` (and ``hp.val_source``, or holds out ``hp.val_fraction`` by a
    seeded split), tokenizes both, drops pairs left identical by truncation, and counts
    everything in ``stats``. Raises naming the option or the file on bad input."""
    if hp["tokenizer"] is None:
        raise ValueError("data.tokenizer is not set (the CLI links it from model.tokenizer "
                         "or model.model_name_or_path)")
    tokenizer = build_tokenizer(hp["tokenizer"])
    stats: dict[str, float] = {}
    records = _read(hp, hp["source"], hp["split"], hp["limit"], stats)
    val_source, val_split = hp["val_source"], hp["val_split"]
    if _instructions_seed(hp["source"]) is not None and not val_source:
        # The task's own held-out prompts, disjoint from its training prompts by design.
        val_source, val_split = hp["source"], "heldout"
    if val_source:
        train, val = records, _read(hp, val_source, val_split, None, stats)
    else:
        g = torch.Generator().manual_seed(hp["seed"])
        order = torch.randperm(len(records), generator=g).tolist()
        n_val = round(hp["val_fraction"] * len(records))
        if hp["val_fraction"] > 0 and len(records) > 1:
            n_val = max(1, n_val)
        val = [records[i] for i in order[:n_val]]
        train = [records[i] for i in order[n_val:]]
    lengths = (hp["max_prompt_length"], hp["max_response_length"])
    cut = ReadStats()  # pairs left identical by truncation: dropped, records kept aligned
    train, train_pairs = tokenize_and_filter(tokenizer, train, *lengths, stats=cut)
    val, val_pairs = tokenize_and_filter(tokenizer, val, *lengths, stats=cut)
    stats["data/kept"] += cut.kept
    stats["data/dropped"] += sum(cut.dropped.values())
    sample = [t for r in train[:200] for t in (r.prompt, r.chosen, r.rejected)]
    stats["data/unk_rate"] = check_unk_rate(tokenizer, sample, tokenizer_name=hp["tokenizer"],
                                            source=hp["source"])
    _check_oracle(oracle, train[:1] or val[:1], hp["source"])
    stats.update({"data/train_pairs": len(train), "data/val_pairs": len(val)})
    log.info("train pairs: %d, validation pairs: %d", len(train), len(val))
    return PreparedPairs(tokenizer, train, val, train_pairs, val_pairs, _fingerprint(train),
                         stats)


def _read(hp: Mapping[str, Any], source: str, split: str, limit: int | None,
          totals: dict[str, float]) -> list[PreferenceRecord]:
    if source in BUILT_IN_SOURCES:
        rows = BUILT_IN_SOURCES[source](hp)
        records, stats = records_from_dicts(rows, source, fmt="prompt",
                                            on_bad_record=hp["on_bad_record"])
    elif (task_seed := _instructions_seed(source)) is not None:
        # Built pairs (a response meeting every constraint against one breaking some); a
        # policy's own labelled samples come in as a file (InstructionsTask.label_pairs).
        rows = InstructionsTask(seed=task_seed).make_pairs(split, limit=limit)
        records, stats = records_from_dicts(rows, f"instructions[{split}]", fmt="prompt",
                                            on_bad_record=hp["on_bad_record"])
    else:
        records, stats = read_preference_records(
            source, split=split, fmt=hp["format"], on_bad_record=hp["on_bad_record"],
            limit=limit, preference=hp["preference"], columns=hp["columns"])
    log.info("%s: %s", source, stats.summary())
    for key, n in (("read", stats.read), ("kept", stats.kept),
                   ("skipped", sum(stats.skipped.values())),
                   ("dropped", sum(stats.dropped.values()))):
        totals[f"data/{key}"] = totals.get(f"data/{key}", 0) + n
    if not records:
        raise ValueError(f"{source}: no usable preference pairs ({stats.summary()})")
    return records


def _instructions_seed(source: str | None) -> int | None:
    """The task seed of ``"instructions"`` (0) or ``"instructions:<seed>"``, else None: the
    task's own seed, not ``data.seed``, so that a sweep over data seeds keeps its prompts."""
    name, _, seed = (source or "").partition(":")
    if name != INSTRUCTIONS_SOURCE:
        return None
    if seed and not seed.isdigit():
        raise ValueError(f"data.source {source!r}: the instructions task is 'instructions' or "
                         "'instructions:<seed>' (a non-negative integer)")
    return int(seed or 0)


def _fingerprint(records: list[PreferenceRecord]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(r.prompt.encode())
        h.update(b"\0")
        h.update(r.chosen.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def check_options(args: Mapping[str, Any]) -> None:
    """Option errors name the option, and come before any model is loaded."""
    on_bad_record, online_pairs, val_fraction = (args["on_bad_record"], args["online_pairs"],
                                                 args["val_fraction"])
    mix_dp, mix_pp, mix_pr = args["mix_dp"], args["mix_pp"], args["mix_pr"]
    if on_bad_record not in BAD_RECORD_MODES:
        raise ValueError(f"data.on_bad_record must be one of {BAD_RECORD_MODES}, "
                         f"got {on_bad_record!r}")
    check_reading_options(args["format"], args["preference"], args["columns"], prefix="data.")
    for name, value in (("mix_dp", mix_dp), ("mix_pp", mix_pp), ("mix_pr", mix_pr)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.{name} must be in [0, 1], got {value}")
    if mix_dp + mix_pp + mix_pr > 1.0 + 1e-9:
        raise ValueError("data.mix_dp + data.mix_pp + data.mix_pr must be <= 1, got "
                         f"{mix_dp} + {mix_pp} + {mix_pr}")
    check_epoch_scaling(args["epoch_scaling"], mix_dp=mix_dp, mix_pp=mix_pp, mix_pr=mix_pr)
    if mix_pp + mix_pr >= 1.0 - 1e-9 and not online_pairs:
        raise ValueError("data.online_pairs must be set when data.mix_pp + data.mix_pr = 1 "
                         "(training on online pairs alone)")
    if online_pairs and mix_pp + mix_pr < 1.0 - 1e-9:
        from lightning.pytorch.utilities import rank_zero_warn

        # Below 1 the offline pairs set the epoch's size (data.epoch_scaling): said, since
        # the option reads as if it set the number of online pairs.
        rank_zero_warn(
            f"data.online_pairs={online_pairs} is ignored: it sets an epoch's size only when "
            f"data.mix_pp + data.mix_pr = 1 (here {mix_pp + mix_pr:g}); below 1 the online "
            "pairs are a share of an epoch sized by the offline pairs (data.epoch_scaling). "
            "Unset it, or set the mixture to 1 to train on online pairs alone")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if args["length_buckets"] < 0:
        raise ValueError(f"data.length_buckets must be >= 0, got {args['length_buckets']}")
    for name in ("max_prompt_length", "max_response_length", "batch_size"):
        if args[name] < 1:
            raise ValueError(f"data.{name} must be >= 1, got {args[name]}")
    for name in ("source", "val_source"):
        path = args[name]
        if path and looks_like_path(path) and not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"data.{name}: no such file or folder: {path}")


def _check_oracle(oracle: Labeller | None, records: list[PreferenceRecord], source: str) -> None:
    """An oracle that cannot score this data fails now, naming ``data.oracle``, not at the
    first round or evaluation (e.g. the synthetic task's oracle given real text)."""
    if oracle is None or not records:
        return
    r = records[0]
    try:
        oracle.score([r.prompt], [r.chosen], messages=[r.messages])
    except Exception as e:
        raise ValueError(f"data.oracle ({type(oracle).__name__}) cannot score the records of "
                         f"{source} ({r.location}: {e}); set data.oracle to this data's ground "
                         "truth, or to null (then online pairs need the callback's labeller)"
                         ) from e

