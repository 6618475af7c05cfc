"""The fixed starting point of a method comparison on the synthetic task.

Three artefacts, each saved with ``save_pretrained`` so the CLI loads them by path:

- a base policy: a tiny Llama trained briefly by SFT on noisy demonstrations (the ideal
  response corrupted at a random low level), so it is better than random but imperfect;
- an offline preference data set: two samples per prompt from the base policy at
  temperature 1, labelled by the task's Bradley-Terry oracle, as prompt/chosen/rejected jsonl;
- a reward model: a tiny ``LlamaForSequenceClassification`` trained with the Bradley-Terry
  loss on those pairs, so that SAIL-PR and the online methods label with a learned,
  imperfect reward (as in the paper), while evaluation uses the true reward.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from sail_lightning.common import win_rate
from sail_lightning.data.tokenize import encode_responses
from sail_lightning.labellers import RewardModelLabeller, prompt_response_ids
from sail_lightning.models import build_causal_lm
from sail_lightning.synthetic import SyntheticTask, tiny_llama_config

# The quickstart's tiny model (configs/model/tiny.yaml): what every method then trains.
MODEL_SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 256}
MAX_NEW_TOKENS = 12  # the method configs' sampling.max_new_tokens


def _tokenizer(task: SyntheticTask):
    return task.build_tokenizer()


def fresh_causal_lm(tok, seed: int):
    return build_causal_lm(None, tiny_llama_config(tok, **MODEL_SIZE), tok, init_seed=seed)


def load_policy(path: str):
    """A saved policy (``save_pretrained`` folder, or a LoRA adapter) in eval mode, with its
    tokenizer (``tasks.load_policy``)."""
    from benchmarks.experiments.tasks import load_policy as load

    return load(path)


def sample_responses(model, tok, prompts: Sequence[str], *, greedy: bool = True,
                     num_samples: int = 1, temperature: float = 1.0, seed: int = 0
                     ) -> list[list[str]]:
    """``num_samples`` decoded responses per prompt of the synthetic task (greedy: one)."""
    from benchmarks.experiments.tasks import SyntheticComparison

    return SyntheticComparison().sample(model, tok, prompts, greedy=greedy,
                                        num_samples=num_samples, temperature=temperature,
                                        seed=seed)


def greedy_reward(model, tok, prompts: Sequence[str], task: SyntheticTask | None = None
                  ) -> tuple[list[str], torch.Tensor]:
    """Greedy responses and their true rewards r* (synthetic task)."""
    task = task or SyntheticTask()
    responses = [g[0] for g in sample_responses(model, tok, prompts, greedy=True)]
    return responses, task.score(prompts, responses)


def train_base_policy(out_dir: str, *, steps: int = 400, batch_size: int = 64,
                      lr: float = 3e-3, max_noise: float = 0.3, seed: int = 0,
                      task: SyntheticTask | None = None) -> dict:
    """SFT of a fresh tiny Llama on noisy demonstrations; saves model and tokenizer.

    Each demonstration is ``task.corrupt(ideal, level, rng)`` with ``level ~ U(0, max_noise)``,
    so the targets themselves are imperfect, and the training is short (``steps`` batches):
    the base policy is better than random, and leaves room to improve.

    Returns:
        ``{"path", "seconds", "steps", "true_reward"}`` (greedy, on 256 fresh prompts).
    """
    task = task or SyntheticTask()
    tok = _tokenizer(task)
    model = fresh_causal_lm(tok, seed)
    rng = random.Random(f"experiments.sft:{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        prompts = task.sample_prompts(batch_size, seed=seed * 1_000_003 + step)
        targets = [task.corrupt(task.ideal_response(p), rng.uniform(0, max_noise), rng)
                   for p in prompts]
        input_ids, labels = _sft_batch(tok, prompts, targets)
        logits = model(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id)
                       .long()).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    _, reward = greedy_reward(model, tok, task.sample_prompts(256, seed=99_991), task)
    return {"path": out_dir, "seconds": seconds, "steps": steps,
            "true_reward": float(reward.mean())}


def _sft_batch(tok, prompts: Sequence[str], targets: Sequence[str]):
    """Right-padded ``prompt + response + eos`` ids, labels only on the response and eos."""
    rows, labels = [], []
    responses = encode_responses(tok, targets, sys.maxsize)  # no truncation
    for p, y_ids in zip(prompts, responses, strict=True):
        p_ids = tok(p)["input_ids"]
        rows.append(torch.tensor(p_ids + y_ids))
        labels.append(torch.tensor([-100] * len(p_ids) + y_ids))
    return (pad_sequence(rows, batch_first=True, padding_value=tok.pad_token_id),
            pad_sequence(labels, batch_first=True, padding_value=-100))


def sample_offline_pairs(policy_dir: str, out_path: str, n: int, *, seed: int = 1,
                         temperature: float | None = None, comparison=None,
                         heldout: bool = False) -> dict:
    """``n`` oracle-labelled pairs of two base-policy samples per prompt, written as jsonl.

    Prompts come from the comparison's task (``tasks.ComparisonTask.prompt_draw``: its
    training prompts, or with ``heldout`` prompts disjoint from them and from the
    evaluation's). Pairs with identical or empty responses are skipped (the DataModule would
    drop or refuse them) and more prompts are drawn, so the file holds exactly ``n`` usable
    pairs.

    Returns:
        ``{"path", "pairs", "prompts_drawn", "label_agreement"}`` (labels vs the true reward
        ordering, ties half: how noisy the oracle's draws are).
    """
    from benchmarks.experiments.tasks import SyntheticComparison

    comparison = comparison or SyntheticComparison()
    task = comparison.task
    temperature = comparison.pair_temperature if temperature is None else temperature
    model, tok = load_policy(policy_dir)
    draw = comparison.prompt_draw(seed, heldout=heldout)
    rows: list[dict[str, str]] = []
    drawn, attempt = 0, 0
    generator = torch.Generator().manual_seed(seed)
    while len(rows) < n:
        prompts = draw(2 * (n - len(rows)) + 16)
        if not prompts:
            raise ValueError(f"{comparison.name}: prompts ran out after {drawn}, with "
                             f"{len(rows)} of {n} usable pairs")
        drawn += len(prompts)
        samples = comparison.sample(model, tok, prompts, greedy=False, num_samples=2,
                                    temperature=temperature, seed=seed + attempt)
        keep = [(x, a, b) for x, (a, b) in zip(prompts, samples, strict=True)
                if a.strip() and b.strip() and a != b]
        xs, as_, bs = zip(*keep, strict=True) if keep else ((), (), ())
        wins = task.prefer(xs, as_, bs, generator=generator).tolist() if keep else []
        for x, a, b, w in zip(xs, as_, bs, wins, strict=True):
            rows.append({"prompt": x, "chosen": a if w else b, "rejected": b if w else a})
        attempt += 1
    rows = rows[:n]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    prompts = [r["prompt"] for r in rows]
    rc = task.score(prompts, [r["chosen"] for r in rows])
    rr = task.score(prompts, [r["rejected"] for r in rows])
    return {"path": out_path, "pairs": len(rows), "prompts_drawn": drawn,
            "label_agreement": win_rate(rc, rr)}


def read_pairs(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_reward_model(pairs_path: str, out_dir: str, *, epochs: int = 4, batch_size: int = 64,
                       lr: float = 2e-3, seed: int = 0, task: SyntheticTask | None = None
                       ) -> dict:
    """A tiny ``LlamaForSequenceClassification`` (one label) fit by the Bradley-Terry loss
    ``-log sigmoid(r(x, y_c) - r(x, y_r))`` on the pairs of ``pairs_path``; saved with its
    tokenizer so ``RewardModelLabeller(out_dir)`` loads it.

    Returns:
        ``{"path", "seconds", "train_accuracy"}`` (final-epoch accuracy on the training pairs).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    task = task or SyntheticTask()
    tok = _tokenizer(task)
    rows = read_pairs(pairs_path)
    config = dict(tiny_llama_config(tok, **MODEL_SIZE), num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config))
    model.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    accuracy = 0.0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=g).tolist()
        correct = 0
        for s in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[s:s + batch_size]]
            xs = [r["prompt"] for r in batch] * 2
            ys = [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
            seqs = [torch.tensor(prompt_response_ids(tok, x, y))
                    for x, y in zip(xs, ys, strict=True)]
            ids = pad_sequence(seqs, batch_first=True, padding_value=tok.pad_token_id)
            mask = pad_sequence([torch.ones_like(r) for r in seqs], batch_first=True)
            r = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            margin = r[: len(batch)] - r[len(batch):]
            loss = -F.logsigmoid(margin).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            correct += int((margin > 0).sum())
        accuracy = correct / len(rows)
    seconds = time.perf_counter() - t0
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"path": out_dir, "seconds": seconds, "train_accuracy": accuracy}


def reward_model_agreement(rm_dir: str, pairs: Sequence[dict[str, str]],
                           task: SyntheticTask | None = None) -> dict:
    """How often the reward model orders held-out pairs as the oracle does.

    Returns:
        ``{"vs_labels"}``: agreement with the oracle's (sampled) chosen/rejected labels, and
        ``{"vs_true_reward"}``: with the true reward's order on pairs whose rewards differ.
    """
    task = task or SyntheticTask()
    rm = RewardModelLabeller(rm_dir, batch_size=256, progress=False)
    xs = [p["prompt"] for p in pairs]
    sc = rm.score(xs, [p["chosen"] for p in pairs])
    sr = rm.score(xs, [p["rejected"] for p in pairs])
    tc = task.score(xs, [p["chosen"] for p in pairs])
    tr = task.score(xs, [p["rejected"] for p in pairs])
    differ = tc != tr
    true_order = ((sc > sr) == (tc > tr))[differ].float()
    return {"vs_labels": float((sc > sr).float().mean()),
            "vs_true_reward": float(true_order.mean()) if differ.any() else float("nan")}
