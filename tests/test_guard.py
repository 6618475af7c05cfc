"""The non-finite guard (sail_lightning/guard.py): a bad step never updates the weights, the
run stops at the next sync naming the step, the non-finite loss parts, the batch's routes
and the likely option; no host sync on good steps with a fused optimizer."""

import os

import lightning as L
import pytest
import torch

from sail_lightning.guard import NonFiniteGuard, fused_kwargs, likely_cause, supports_found_inf
from sail_lightning.objectives import LossOptions
from tests.helpers import fit, module


class Poison(L.Callback):
    """Makes batch ``at`` non-finite (its reference log-probs NaN) and snapshots the policy
    and the optimizer's step count just before it."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            n = batch["route"].shape[0]
            batch["ref_logps"] = torch.full((2 * n,), float("nan"))
            self.before = {k: v.detach().clone()
                           for k, v in pl_module.pair.policy.state_dict().items()}
            opt = trainer.optimizers[0]
            self.steps = [float(s["step"]) for s in opt.state.values()]


def weights(m):
    return {k: v.detach().clone() for k, v in m.pair.policy.state_dict().items()}


def test_bad_step_never_updates_weights_and_names_step_parts_routes(tmp_path):
    m, poison = module(), Poison(at=2)
    with pytest.raises(FloatingPointError) as err:
        fit(m, tmp_path, steps=3, callbacks=[poison], log_every_n_steps=1)
    after = weights(m)
    assert all(torch.equal(after[k], v) for k, v in poison.before.items())
    opt = m.trainer.optimizers[0]
    assert supports_found_inf(opt)  # the fused path: skipped on the device
    assert [float(s["step"]) for s in opt.state.values()] == poison.steps
    msg = str(err.value)
    assert "global step 2" in msg and "1 such step(s)" in msg
    assert "non-finite loss parts: dpo_term" in msg and "routes in the batch: dpo" in msg
    assert "model.lr" in msg and "released_code" not in msg  # score_function: not blamed


def test_bad_step_between_logging_steps_is_skipped_and_reported_at_epoch_end(tmp_path):
    m, poison = module(), Poison(at=3)
    with pytest.raises(FloatingPointError, match="global step 3 .*loss parts unknown") as err:
        fit(m, tmp_path, steps=4, callbacks=[poison], log_every_n_steps=100)
    assert all(torch.equal(weights(m)[k], v) for k, v in poison.before.items())
    assert "routes in the batch: dpo" in str(err.value)


def test_good_run_is_unchanged_by_the_guard(tmp_path):
    m = module()
    fit(m, tmp_path, steps=3)
    assert int(m.guard.bad_steps) == 0 and m.guard.skipped_synced == 0


def test_unfused_optimizer_drops_a_bad_steps_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    guard = NonFiniteGuard()
    guard.record(0, torch.tensor(float("nan")), ("pr",))
    p.grad = torch.ones(3)
    guard.before_optimizer_step(opt, 0)
    assert p.grad is None and guard.skipped_synced == 1
    opt.step()
    assert torch.equal(p.data, torch.ones(3))


def test_a_bad_first_micro_batch_makes_the_accumulated_step_bad():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    guard = NonFiniteGuard()
    guard.record(0, torch.tensor(float("inf")), ("pr",))  # micro-batch 1 of 2
    guard.record(0, torch.tensor(1.0), ("pr",))  # micro-batch 2: finite, must not hide it
    p.grad = torch.ones(3)  # finite gradients
    guard.before_optimizer_step(opt, 0)
    assert p.grad is None and int(guard.bad_steps) == 1
    guard.record(1, torch.tensor(1.0), ("pr",))  # the next step starts afresh
    p.grad = torch.ones(3)
    guard.before_optimizer_step(opt, 1)
    assert p.grad is not None and int(guard.bad_steps) == 1


def test_under_16_mixed_the_grad_scaler_owns_overflows():
    class Plugin:  # Lightning's MixedPrecision("16-mixed") holds its GradScaler as .scaler
        scaler = object()

    m = module()
    quiet = type("Connector", (), {"should_update_logs": False})()  # not a logging step
    m.trainer = type("T", (), {"precision_plugin": Plugin(), "world_size": 1,
                               "current_epoch": 0, "_logger_connector": quiet})()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), float("inf"))  # an fp16 overflow: the scaler skips and rescales
    m.on_before_optimizer_step(torch.optim.SGD([p], lr=0.1))
    assert m.guard.bad_steps is None and p.grad is not None


def test_fused_only_for_plain_float_tensors_outside_mixed_precision():
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    params = [torch.nn.Parameter(torch.ones(2))]
    assert fused_kwargs(params) == fused_kwargs(params, Precision()) == {"fused": True}
    assert fused_kwargs([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]) == {}
    # Lightning's *-mixed plugins refuse to clip gradients of a fused optimizer.
    assert fused_kwargs(params, MixedPrecision("bf16-mixed", "cpu")) == {}


@pytest.mark.parametrize(("parts", "routes", "response_term", "expected", "absent"), [
    (["response_term"], ("pr",), "released_code", "model.response_term=released_code", None),
    (["response_term"], ("pr",), "score_function", "model.coef_pr", "released_code"),
    (["dpo_term"], ("dpo", "pr"), "released_code", "model.lr", "released_code"),
    ([], ("dpo",), "released_code", "model.beta", "released_code"),
    ([], ("pr",), "released_code", "released_code", None),
    (["bonus_term"], ("pr",), "score_function", "model.bonus_alpha", None),
])
def test_likely_option(parts, routes, response_term, expected, absent):
    options = LossOptions(response_term=response_term, beta=0.1, coef_pr=0.3)
    text = likely_cause(parts, routes, options, lr=1e-3)
    assert expected in text
    assert absent is None or absent not in text


@pytest.mark.slow
def test_ddp_a_bad_batch_on_one_rank_updates_no_rank_and_every_rank_names_it(tmp_path):
    """2-process DDP (CPU, gloo): rank 1's batch at step 3 is non-finite; the reduced
    gradients are non-finite on both ranks, so neither takes the step, and both stop."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.conftest import CONFIGS, REPO

    root = tmp_path / "run"
    cfg = {"trainer": {
        "default_root_dir": str(root), "max_epochs": 1, "limit_train_batches": 6,
        "limit_val_batches": 0, "enable_progress_bar": False, "log_every_n_steps": 1,
        "strategy": "ddp", "devices": 2, "logger": False, "enable_checkpointing": False,
        "callbacks": [{"class_path": "tests.helpers.PoisonOnRank",
                       "init_args": {"step": 3, "rank": 1, "path": str(root / "out")}}]}}
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "sail_lightning", "fit", "-c", str(CONFIGS / "quickstart.yaml"),
           "-c", str(CONFIGS / "method" / "dpo.yaml"), "-c", str(overlay),
           "--data.num_synthetic_pairs=400"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "global step 3" in out.stderr, out.stderr[-3000:]
    ranks = {p.name: json.loads(p.read_text()) for p in (root / "out").glob("rank*.json")}
    assert set(ranks) == {"rank0.json", "rank1.json"}
    for record in ranks.values():
        assert record["unchanged"], record
        assert "FloatingPointError" in record["error"] and "global step 3" in record["error"]
