"""SAILModule: model building, reference, training step, accumulation, clipping, options."""

import lightning as L
import pytest
import torch

from sail_lightning.common import Route
from sail_lightning.models import LoraOptions
from sail_lightning.module import SAILModule
from tests.helpers import collate, datamodule, module


def tiny_module(**kw):
    return module(configure=False, **kw)


def batch_of(dm, n=4):
    return collate(dm.train_pairs[:n])


@pytest.fixture(scope="module")
def dm():
    return datamodule(val_fraction=0.125)


def test_configure_model_is_idempotent_and_reference_frozen():
    m = tiny_module()
    m.configure_model()
    policy = m.pair.policy
    m.configure_model()
    assert m.pair.policy is policy
    assert not any(p.requires_grad for p in m.pair.reference.parameters())
    assert all(p.requires_grad for p in m.pair.policy.parameters())


def test_local_path_loads_like_a_hub_name_and_reference_starts_equal(tiny_model_dir, dm):
    m = SAILModule(model_name_or_path=str(tiny_model_dir))  # tokenizer defaults to the path
    m.configure_model()
    lp, ref = m.logprobs(batch_of(dm))
    torch.testing.assert_close(lp, ref)


def test_lora_reference_is_the_base_model_with_adapters_disabled(tiny_model_dir, dm):
    from transformers import AutoModelForCausalLM

    m = SAILModule(model_name_or_path=str(tiny_model_dir), lora=LoraOptions(r=4, alpha=8,
                   dropout=0.0))
    m.configure_model()
    assert m.pair.reference is None
    trainable = [n for n, p in m.pair.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # Move the adapters away from their zero init, so policy and reference differ.
    with torch.no_grad():
        for n, p in m.pair.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    batch = batch_of(dm)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from sail_lightning.logprobs import concatenated_logprobs

    with torch.no_grad():
        expected, _ = concatenated_logprobs(base, batch)
    ref, _ = m.pair.reference_logprobs(batch)
    torch.testing.assert_close(ref, expected)
    m.pair.policy.eval()
    pol, _ = concatenated_logprobs(m.pair.policy, batch)
    assert not torch.allclose(pol, expected)


class GradCapture(L.Callback):
    def __init__(self):
        self.grads, self.norms = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.pair.policy.parameters()])

    def on_train_batch_end(self, trainer, pl_module, *args):
        grads = [p.grad for p in pl_module.pair.policy.parameters() if p.grad is not None]
        if grads:  # after clipping, before the next zero_grad
            self.norms.append(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item())


def fit_once(batch_size, accumulate, clip=None, mix_dp=0.0, coef_dp=0.0):
    L.seed_everything(0)
    dm = datamodule(setup=False, num_synthetic_pairs=80, batch_size=batch_size,
                    val_fraction=0.0, mix_dp=mix_dp)
    cap = GradCapture()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate,
                        gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cap],
                        limit_val_batches=0)
    trainer.fit(tiny_module(coef_dp=coef_dp), datamodule=dm)
    return cap


def test_accumulating_two_batches_of_4_gives_the_gradient_of_one_batch_of_8():
    one = fit_once(batch_size=8, accumulate=1).grads[0]
    two = fit_once(batch_size=4, accumulate=2).grads[0]
    for a, b in zip(one, two, strict=False):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_gradient_clipping_bounds_the_update():
    unclipped = fit_once(batch_size=8, accumulate=1).norms[0]
    clipped = fit_once(batch_size=8, accumulate=1, clip=1e-3).norms[0]
    assert unclipped > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("kwargs,option", [
    ({"model_config": None}, "model_name_or_path"),
    ({"loss_type": "kto"}, "loss_type"),
    ({"loss_type": "ipo", "coef_dp": 0.2}, "loss_type"),
    ({"coef_pr": -0.1}, "coef_pr"),
    ({"response_term": "hook"}, "response_term"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
    ({"beta": 0.0}, "beta"),
])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        tiny_module(**kwargs)


def test_training_step_computes_metrics_only_on_logging_steps(dm, monkeypatch, tmp_path):
    import sail_lightning.objectives.sail as objectives

    calls = []
    real = objectives.preference_metrics
    monkeypatch.setattr(objectives, "preference_metrics",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    m = tiny_module(coef_dp=0.2, coef_pp=0.3, coef_pr=0.4, baseline="mean")
    m.configure_model()
    m.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    logged = []
    m.log = lambda name, value, **k: logged.append(name)
    m.log_dict = lambda d, **k: logged.extend(d)
    batch = batch_of(dm, 8)
    batch["route"] = torch.tensor([Route.DPO, Route.DP, Route.PP, Route.PR] * 2)
    batch["routes_present"] = (0, 1, 2, 3)  # as the collator records them with the routes

    def step(logging):
        m.logging_step = lambda: logging
        m.zero_grad()
        loss = m.training_step(batch, 3)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.pair.policy.parameters()]

    loss_off, grads_off = step(False)
    assert calls == [] and logged == []  # no metric computed on a step the logger skips
    loss_on, grads_on = step(True)
    assert calls == [1] and "train/loss/route_dp" in logged and "train/dp/flip_rate" in logged
    assert torch.equal(loss_on, loss_off)  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off, strict=True))


def test_grad_norm_is_logged_on_logging_steps_only_and_is_the_total_norm(dm, tmp_path):
    m = tiny_module()
    m.configure_model()
    m.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, value)
    m.logging_step = lambda: False
    m.training_step(batch_of(dm, 8), 0).backward()
    optimizer = torch.optim.AdamW(m.pair.policy.parameters())  # the guard reads its params
    m.on_before_optimizer_step(optimizer)
    assert logged == {}
    m.logging_step = lambda: True
    m.on_before_optimizer_step(optimizer)
    grads = [p.grad.flatten() for p in m.pair.policy.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat(grads))
    torch.testing.assert_close(logged["train/grad_norm"], expected)


def test_a_logging_step_computes_the_gradient_norm_once(dm, tmp_path, monkeypatch):
    m = tiny_module()
    m.configure_model()
    m.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    m.log = lambda name, value, **k: None
    m.logging_step = lambda: True
    m.training_step(batch_of(dm, 8), 0).backward()
    calls = []
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    m.on_before_optimizer_step(torch.optim.AdamW(m.pair.policy.parameters()))
    assert len(calls) == 1  # the guard's, which the log reuses


def test_bonus_term_is_added_to_the_loss(dm, tmp_path):
    from sail_lightning.data.tokenize import TokenizedPair

    m = module(bonus_alpha=0.5, bonus_form="selm")
    bonus = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, bonus_ids=p.chosen_ids)
             for p in dm.train_pairs[:4]]
    batch = collate(bonus, Route.PR)
    assert batch["input_ids"].shape[0] == 12 and batch["bonus_mask"].all()
    m.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    lp, ref = m.logprobs(batch)
    expected = 0.5 * 0.1 * (lp[8:] - ref[8:]).mean()
    m.log = lambda *a, **k: None
    m.log_dict = lambda *a, **k: None
    with_bonus = m.training_step(batch, 0)
    m.hparams.bonus_alpha = 0.0
    without = m.training_step(batch, 0)
    torch.testing.assert_close(with_bonus - without, expected)


def test_ipo_trains_on_length_averaged_logprobs(dm):
    m = module(loss_type="ipo")
    batch = batch_of(dm)
    lp, ref = m.logprobs(batch)
    sums, ref_sums, counts = m.pair.logprobs(batch)
    torch.testing.assert_close(lp, sums / counts)
    torch.testing.assert_close(ref, ref_sums / counts)
