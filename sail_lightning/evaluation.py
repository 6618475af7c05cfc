"""Evaluation on held-out prompts: eval reward, win rates, KL to the reference, length.

What the SAIL paper reports, computed during ``fit`` (every ``every_n_epochs``) and by
``sail-lightning validate``; the reward margin and accuracy on held-out pairs come from
``SAILModule.validation_step``. The default judge is the data's ``oracle``: on the synthetic
task its ground truth, so win rates are exact rather than a judge's opinion.
"""

from __future__ import annotations

import json
import logging
import os

import lightning as L
import torch

from sail_lightning.common import win_rate
from sail_lightning.data.tokenize import TokenizedPair
from sail_lightning.distributed import generation_context, synced_generation
from sail_lightning.engines import check_engine_strategy, get_engine
from sail_lightning.generation import ENGINES, SamplingOptions, decode, generate_responses
from sail_lightning.interfaces import Labeller, PairwiseJudge
from sail_lightning.policy_pair import PolicyPair
from sail_lightning.run_folder import run_dir

log = logging.getLogger("sail_lightning.eval")


def judged_win_rate(judge: PairwiseJudge, prompts: list[str], responses: list[str],
                    chosen: list[str], messages: list | None = None) -> dict[str, float]:
    """A pairwise judge's win rate of ``responses`` against the dataset's ``chosen`` ones
    (``PairwiseJudge.compare``; ``JudgeLabeller`` asks in both orders, ties half) and the
    API usage this cost (its counters' growth, so a judge that also labels keeps its own
    counts)."""
    before = judge.stats()
    outcome = judge.compare(prompts, responses, chosen, messages=messages)
    used = {k: v - before[k] for k, v in judge.stats().items()}
    tokens = used["judge_prompt_tokens"] + used["judge_completion_tokens"]
    return {"val/judge_win_rate": float(outcome.mean()),
            "val/judge_ties": float((outcome == 0.5).double().mean()),
            **{f"gen/judge_{k}": float(used[f"judge_{k}"])
               for k in ("requests", "prompt_tokens", "completion_tokens", "unparsed")},
            "gen/judge_tokens": float(tokens)}


class EvaluationCallback(L.Callback):
    """Greedy responses of the policy (and of the reference) on held-out prompts, judged.

    Logs ``val/eval_reward`` (mean judge score of the policy's greedy responses),
    ``val/win_rate_vs_ref`` (against the reference policy's greedy responses),
    ``val/win_rate_vs_chosen`` (against the dataset's chosen responses), ``val/kl``
    (mean ``log pi(y) - log pi_ref(y)`` over responses sampled from the policy: an unbiased
    estimate of KL(pi || pi_ref)) and ``val/mean_length`` (tokens of the greedy responses).
    A policy trained without a reference (SFT) gets neither ``win_rate_vs_ref`` nor ``kl``.

    A pairwise judge (``JudgeLabeller``: an LLM behind an OpenAI-compatible API, as the
    paper judged with GPT-4) has no scores: it compares the greedy responses with the
    dataset's chosen ones in both orders and logs ``val/judge_win_rate`` (ties half),
    ``val/judge_ties`` (their share), and what the evaluation cost:
    ``gen/judge_requests``, ``gen/judge_prompt_tokens``, ``gen/judge_completion_tokens``,
    ``gen/judge_tokens`` and ``gen/judge_unparsed``.

    Args:
        judge: a scoring labeller (reward model, callable, oracle) or a pairwise judge
            (``interfaces.PairwiseJudge``: ``sail_lightning.labellers.JudgeLabeller``).
            Default: the DataModule's ``oracle``; without either, win rates are skipped.
        num_prompts: held-out prompts evaluated (the first ones of the validation split).
        max_new_tokens: response length limit.
        every_n_epochs: during fit, evaluate after every this many epochs.
        seed: seed of the sampled responses behind the KL estimate.
        engine: what generates the policy's responses: ``hf`` or ``vllm`` (the process's
            engine, shared with ``PairGenerationCallback``: ``sail_lightning.engines``); the
            reference's are generated with HF.
    """

    def __init__(self, judge: Labeller | None = None, num_prompts: int = 128,
                 max_new_tokens: int = 64, every_n_epochs: int = 1, seed: int = 0,
                 engine: str = "hf") -> None:
        if engine not in ENGINES:
            raise ValueError(f"EvaluationCallback.engine must be one of {ENGINES}, got "
                             f"{engine!r}")
        self.judge = judge
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.samples: list[dict] = []  # the last evaluation's responses (write_samples)
        self.engine = engine

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_engine_strategy(trainer.strategy, self.engine, "EvaluationCallback.engine")
        judge = self.judge if self.judge is not None else getattr(trainer.datamodule, "oracle",
                                                                  None)
        if judge is not None:
            judge.to(trainer.strategy.root_device)  # where the policy runs (Labeller.to)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        with generation_context(trainer):
            metrics = self.evaluate(trainer.datamodule, pl_module.pair,
                                    synced_gpus=synced_generation(trainer))
        for name, value in metrics.items():
            pl_module.log(name, value)
        if trainer.is_global_zero and trainer.log_dir and self.samples:

            # The run's own folder, beside its checkpoints (W&B's log_dir is shared by runs).
            self.write_samples(os.path.join(run_dir(trainer), "eval",
                                            f"epoch_{trainer.current_epoch:03d}.jsonl"))

    def write_samples(self, path: str) -> None:
        """The last evaluation's prompts, responses and scores as jsonl, one prompt a line:
        what a reader wants to look at next to ``val/eval_reward``."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in self.samples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    @torch.no_grad()
    def evaluate(self, datamodule, pair: PolicyPair, synced_gpus: bool = False
                 ) -> dict[str, float]:
        """The metrics above, as a dict (notebooks call it directly with ``module.pair``)."""
        records = datamodule.val_records[: self.num_prompts]
        pairs = datamodule.val_pairs[: self.num_prompts]
        if not records:
            return {}
        tok = datamodule.tokenizer
        judge = self.judge if self.judge is not None else getattr(datamodule, "oracle", None)
        prompt_ids = [p.prompt_ids for p in pairs]
        gen = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
               "progress": False, "synced_gpus": synced_gpus}
        greedy = SamplingOptions(num_samples=1, greedy=True, max_new_tokens=self.max_new_tokens,
                                 engine=self.engine)
        sample = get_engine(greedy).generate  # the policy's engine; the reference's is HF
        policy = [s[0] for s in sample(pair.policy, prompt_ids, greedy, seed=self.seed,
                                       desc="eval", **gen)]
        metrics = {"val/mean_length": sum(len(r) for r in policy) / len(policy)}
        reference = None
        if pair.has_reference:
            with pair.reference_model() as ref:
                reference = [s[0] for s in generate_responses(ref, prompt_ids, greedy,
                                                              seed=self.seed, **gen)]
            sampled = SamplingOptions(num_samples=1, temperature=1.0,
                                      max_new_tokens=self.max_new_tokens, engine=self.engine)
            samples = [s[0] for s in sample(pair.policy, prompt_ids, sampled, seed=self.seed,
                                            **gen)]
            # KL(pi || pi_ref) = E_{y ~ pi}[log pi(y) - log pi_ref(y)], on the samples.
            # One row per sample (chosen_only): a pair of it with itself cost twice the forwards.
            kl_pairs = [TokenizedPair(p, s, s) for p, s in zip(prompt_ids, samples, strict=True)]
            pol, ref_lp = pair.pair_logprobs(kl_pairs, chosen_only=True)
            metrics["val/kl"] = float((pol[:, 0] - ref_lp[:, 0]).mean())
        prompts = [r.prompt for r in records]
        texts = [decode(tok, r) for r in policy]
        ref_texts = None if reference is None else [decode(tok, r) for r in reference]
        self.samples = [{"prompt": p, "response": t} for p, t in zip(prompts, texts, strict=True)]
        if ref_texts is not None:
            for row, text in zip(self.samples, ref_texts, strict=True):
                row["reference_response"] = text
        if judge is not None:
            messages = [r.messages for r in records]
            chosen = [r.chosen for r in records]
            ours = judge.score(prompts, texts, messages=messages)
            if ours is not None:
                theirs = chosen_scores = judge.score(prompts, chosen, messages=messages)
                metrics["val/eval_reward"] = float(ours.mean())
                metrics["val/win_rate_vs_chosen"] = win_rate(ours, chosen_scores)
                for row, score in zip(self.samples, ours.tolist(), strict=True):
                    row["score"] = score
                if ref_texts is not None:
                    theirs = judge.score(prompts, ref_texts, messages=messages)
                    # The reference's own reward: with LoRA or a frozen copy it is the
                    # starting policy, so one evaluation gives the before and the after.
                    metrics["val/ref_eval_reward"] = float(theirs.mean())
                    metrics["val/win_rate_vs_ref"] = win_rate(ours, theirs)
                    for row, score in zip(self.samples, theirs.tolist(), strict=True):
                        row["reference_score"] = score
            elif isinstance(judge, PairwiseJudge):
                metrics.update(judged_win_rate(judge, prompts, texts, chosen, messages))
        log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items()})
        return metrics
