"""One method run through the library's CLI, and the evaluation of its final policy.

Every run is ``sail_lightning.cli.main(["fit", "-c", "configs/quickstart.yaml", "-c",
"configs/method/<m>.yaml", "-c", <overlay>, ...])``. The overlay, generated per run and kept
beside its logs, replaces the trainer's callback list: the ``PairGenerationCallback`` of the
method's config (its ``init_args`` copied) with the learned reward model as labeller, plus
``export.ExportPolicyCallback``, which writes the final policy with ``save_pretrained`` for
evaluation. The
quickstart's ``EvaluationCallback`` is left out (the comparison evaluates once, at the end,
with the true reward), and so is validation.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch
import yaml

from benchmarks.experiments.base import read_pairs
from benchmarks.experiments.tasks import ComparisonTask, SyntheticComparison, load_policy
from sail_lightning.common import win_rate
from sail_lightning.data.mixture import offline_pairs_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
_CALLBACK = "sail_lightning.callbacks.PairGenerationCallback"


@dataclass(frozen=True)
class Method:
    """A compared method: its config under ``configs/method/`` and extra CLI arguments."""

    config: str
    label: str
    args: tuple[str, ...] = field(default_factory=tuple)
    # Tried in order when a run diverges (FloatingPointError): smaller response-term weights.
    fallbacks: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    # An ablation runs at the default label source only.
    ablation: bool = False
    # Warm start: the policy and reference come from one epoch of this method, and the run
    # trains one epoch less (the same pairs in all).
    warm_start: str | None = None


METHODS: dict[str, Method] = {
    "dpo": Method("dpo", "DPO"),
    "iterative_dpo": Method("iterative_dpo", "iterative DPO"),
    "online_dpo": Method("online_dpo", "online DPO"),
    "sail_dp": Method("sail_dp", "SAIL-DP"),
    "sail_pp": Method("sail_pp", "SAIL-PP"),
    "sail_pr": Method("sail_pr", "SAIL-PR"),
    # The authors' gradient hook sums over the batch and divides by log pi(y): at the
    # quickstart's lr it diverges (README); gamma is cut tenfold, then a hundredfold, if so.
    "sail_pr_released": Method(
        "sail_pr", "SAIL-PR (released_code)", ("--model.response_term=released_code",),
        (("--model.coef_pr=0.03",), ("--model.coef_pr=0.003",))),
    "selm": Method("selm", "SELM"),
    "xpo": Method("xpo", "XPO"),
    "spin": Method("spin", "SPIN"),
    "sppo": Method("sppo", "SPPO"),
    # Ablations at equal data (the default label source). SAIL-PR's response term:
    "sail_pr_g0": Method("sail_pr", "SAIL-PR gamma 0 (online DPO, mixed)",
                         ("--model.coef_pr=0.0",), ablation=True),
    "sail_pr_g0.1": Method("sail_pr", "SAIL-PR gamma 0.1", ("--model.coef_pr=0.1",),
                           ablation=True),
    "sail_pr_g1": Method("sail_pr", "SAIL-PR gamma 1", ("--model.coef_pr=1.0",), ablation=True),
    "sail_pr_nobase": Method("sail_pr", "SAIL-PR baseline none", ("--model.baseline=none",),
                             ablation=True),
    # SAIL-DP's label term (rho = 0: labels resampled, no label term):
    "sail_dp_rho0": Method("sail_dp", "SAIL-DP rho 0", ("--model.coef_dp=0.0",), ablation=True),
    "sail_dp_rho0.5": Method("sail_dp", "SAIL-DP rho 0.5", ("--model.coef_dp=0.5",),
                             ablation=True),
    # SAIL-PP after one epoch of offline DPO: are its self-labels then informative?
    "sail_pp_warm": Method("sail_pp", "SAIL-PP, DPO warm start", ablation=True,
                           warm_start="dpo"),
}


def _method_yaml(config: str) -> dict:
    with open(os.path.join(CONFIGS, "method", f"{config}.yaml")) as f:
        return yaml.safe_load(f)


def budget_args(method: str, pairs_per_epoch: int) -> list[str]:
    """Data arguments that make one epoch of ``method`` exactly ``pairs_per_epoch`` pairs.

    The offline file may hold more pairs (the reward model trains on all of them); a method
    reads its first ones (``data.limit``). Online-only methods (``mix_pp + mix_pr = 1``)
    read ``pairs_per_epoch`` records (their prompts; SELM also ranks their responses) and
    train on ``online_pairs = pairs_per_epoch`` fresh pairs. The others read as many offline
    pairs as make an epoch of ``pairs_per_epoch`` under the default epoch scaling
    (``data.mixture.offline_pairs_for``: ``(1 - r - p - g) * pairs_per_epoch``).
    """
    data = _method_yaml(METHODS[method].config).get("data", {})
    mix = {k: float(data.get(k, 0.0)) for k in ("mix_dp", "mix_pp", "mix_pr")}
    if mix["mix_pp"] + mix["mix_pr"] >= 1.0 - 1e-9:
        return [f"--data.limit={pairs_per_epoch}", f"--data.online_pairs={pairs_per_epoch}"]
    return [f"--data.limit={offline_pairs_for(pairs_per_epoch, **mix)}"]


def uses_labeller(method: str) -> bool:
    """Whether the method's online pairs are labelled by the labeller (the label axis
    matters): SAIL-PR and online routes; not offline methods, SAIL-PP's self-labels or
    SPIN's demonstrations."""
    cfg = _method_yaml(METHODS[method].config)
    mix_pr = float(cfg.get("data", {}).get("mix_pr", 0.0))
    modes = [cb.get("init_args", {}).get("pair_mode", "two_samples")
             for cb in cfg.get("trainer", {}).get("callbacks", [])
             if cb.get("class_path") == _CALLBACK]
    return mix_pr > 0 and bool(modes) and modes[0] != "spin"


def write_overlay(method: str, path: str, *, rm_dir: str | None, policy_out: str,
                  run_dir: str, seed: int, epochs: int, labeller: dict | None = None,
                  comparison: ComparisonTask | None = None) -> str:
    """The per-run YAML: trainer settings and the full callback list (see module docstring).
    ``labeller`` (class_path and init_args) replaces the reward model at ``rm_dir``; the
    comparison's task sets the rounds' response length and batch (the method configs'
    are the synthetic task's) and how the policy is exported (a LoRA adapter alone)."""
    comparison = comparison or SyntheticComparison()
    callbacks: list[dict] = []
    for cb in _method_yaml(METHODS[method].config).get("trainer", {}).get("callbacks", []):
        if cb.get("class_path") != _CALLBACK:
            continue
        init = dict(cb.get("init_args") or {})
        init.update(seed=seed, progress=False)
        if comparison.round_sampling():
            init["sampling"] = {**init.get("sampling", {}), **comparison.round_sampling()}
        if labeller is not None:
            init["labeller"] = labeller
        elif rm_dir is not None:
            init["labeller"] = {"class_path": "sail_lightning.labellers.RewardModelLabeller",
                                "init_args": {"name_or_path": rm_dir, "progress": False,
                                              "batch_size": 256}}
        callbacks.append({"class_path": _CALLBACK, "init_args": init})
    callbacks.append({"class_path": "sail_lightning.export.ExportPolicyCallback",
                      "init_args": {"dirpath": policy_out, **comparison.export_args()}})
    overlay = {
        "seed_everything": seed,
        "trainer": {
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": run_dir,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": run_dir, "name": "csv"}},
            "callbacks": callbacks,
        },
        "model": {"label_seed": seed},
        "data": {"seed": seed, "val_fraction": 0.0},
    }
    with open(path, "w") as f:
        yaml.safe_dump(overlay, f, sort_keys=False)
    return path


def cli_args(method: str, *, base_dir: str, offline_path: str, overlay: str,
             pairs_per_epoch: int, extra: tuple[str, ...] = (),
             comparison: ComparisonTask | None = None) -> list[str]:
    """The ``main()`` arguments of one run: the task's config, the method's, the overlay."""
    m = METHODS[method]
    comparison = comparison or SyntheticComparison()
    return ["fit", "-c", comparison.config,
            "-c", os.path.join(CONFIGS, "method", f"{m.config}.yaml"), "-c", overlay,
            f"--model.model_name_or_path={base_dir}", *comparison.run_args(),
            f"--model.tokenizer={base_dir}", f"--data.source={offline_path}",
            *budget_args(method, pairs_per_epoch), *m.args, *extra]


def quiet() -> None:
    """Lightning's banners and warnings off: the comparison prints its own table."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "sail_lightning",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def run_method(method: str, *, base_dir: str, rm_dir: str | None, offline_path: str,
               work_dir: str, seed: int, epochs: int, pairs_per_epoch: int,
               extra: tuple[str, ...] = (), labeller: dict | None = None,
               run_name: str | None = None, comparison: ComparisonTask | None = None) -> dict:
    """Trains ``method`` from the base policy through the CLI; returns where the policy is.

    On divergence (the run raises ``FloatingPointError``) the method's fallbacks are tried in
    order; the result names the arguments that were finally used.

    Returns:
        ``{"policy_dir", "wall_seconds", "args", "attempts"}``; ``policy_dir`` is None when
        every attempt diverged.
    """
    from sail_lightning.cli import main

    quiet()
    m = METHODS[method]
    run_dir = os.path.join(work_dir, "runs", run_name or method, f"seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # no stale policy or round files
    os.makedirs(run_dir, exist_ok=True)
    policy_out = os.path.join(run_dir, "policy")
    overlay = write_overlay(method, os.path.join(run_dir, "overlay.yaml"), rm_dir=rm_dir,
                            policy_out=policy_out, run_dir=run_dir, seed=seed, epochs=epochs,
                            labeller=labeller, comparison=comparison)
    attempts = []
    t0 = time.perf_counter()
    for fallback in ((), *m.fallbacks):
        args = cli_args(method, base_dir=base_dir, offline_path=offline_path, overlay=overlay,
                        pairs_per_epoch=pairs_per_epoch, extra=(*extra, *fallback),
                        comparison=comparison)
        try:
            main(args)
        except FloatingPointError as e:
            attempts.append({"args": list(fallback), "error": str(e).split(".")[0]})
            continue
        attempts.append({"args": list(fallback), "error": None})
        return {"policy_dir": policy_out, "wall_seconds": time.perf_counter() - t0,
                "args": list(fallback), "attempts": attempts,
                "rounds": round_stats(run_dir, comparison)}
    return {"policy_dir": None, "wall_seconds": time.perf_counter() - t0, "args": None,
            "attempts": attempts, "rounds": []}


def round_stats(run_dir: str, comparison: ComparisonTask | None = None) -> list[dict]:
    """Per online round of the run's last attempt, judged by the true reward r*.

    ``label_agreement``: how often the pair's label (reward model, or the policy's own
    Bradley-Terry draw for SAIL-PP) orders it as r* does, ties half; ``chosen`` /
    ``rejected``: mean r* of each side. Empty for offline methods.
    """
    task = (comparison or SyntheticComparison()).task
    versions = glob.glob(os.path.join(run_dir, "csv", "version_*"))
    if not versions:
        return []
    last = max(versions, key=lambda v: int(v.rsplit("_", 1)[1]))
    out = []
    for path in sorted(glob.glob(os.path.join(last, "rounds", "round_*.jsonl"))):
        rows = read_pairs(path)
        if not rows:
            continue
        xs = [r["prompt"] for r in rows]
        rc = task.score(xs, [r["chosen"] for r in rows])
        rr = task.score(xs, [r["rejected"] for r in rows])
        out.append({"round": len(out), "pairs": len(rows),
                    "label_agreement": win_rate(rc, rr), "chosen": float(rc.mean()),
                    "rejected": float(rr.mean())})
    return out


def evaluate_policy(policy_dir: str, prompts: list[str], base_rewards: torch.Tensor,
                    comparison: ComparisonTask | None = None) -> dict:
    """True reward of the policy's greedy responses, and their win rate against the base's.

    Args:
        base_rewards: true rewards of the base policy's greedy responses to ``prompts``.

    Returns:
        ``{"win_rate", "true_reward", "win_rate_ci", "true_reward_ci"}`` and the task's
        ``metrics``; ties count half (``common.win_rate``); the intervals are 95% bootstrap
        intervals over the prompts (``report.bootstrap_ci``).
    """
    from benchmarks.experiments.report import bootstrap_ci

    comparison = comparison or SyntheticComparison()
    model, tok = load_policy(policy_dir)
    responses, rewards = comparison.greedy_reward(model, tok, prompts)
    wins = (rewards > base_rewards).float() + 0.5 * (rewards == base_rewards).float()
    return {"win_rate": win_rate(rewards, base_rewards), "true_reward": float(rewards.mean()),
            "win_rate_ci": bootstrap_ci(wins), "true_reward_ci": bootstrap_ci(rewards),
            **comparison.metrics(prompts, responses)}
