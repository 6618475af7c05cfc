"""The online loop: rounds, labels, the pool, cached reference log-probs, reference updates."""

import json
import os

import lightning as L
import pytest
import torch

from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.data.datamodule import PreferenceDataModule
from sail_lightning.data.tokenize import PreferenceCollator, TokenizedPair
from sail_lightning.generation import SamplingOptions
from sail_lightning.labellers import PolicyLabeller
from sail_lightning.models import LoraOptions
from sail_lightning.module import SAILModule
from sail_lightning.objectives import Route
from tests.conftest import TINY_CONFIG, assert_reference_becomes_the_policy

SAMPLING = SamplingOptions(num_samples=2, max_new_tokens=6, batch_size=32)


def datamodule(**kw):
    kw = {"tokenizer": "synthetic", "num_synthetic_pairs": 120, "batch_size": 8,
          "val_fraction": 0.1, "max_prompt_length": 16, "max_response_length": 16, **kw}
    dm = PreferenceDataModule(**kw)
    dm.setup("fit")
    return dm


def module(**kw):
    m = SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic", lr=1e-3, **kw)
    m.configure_model()
    return m


def fit(tmp_path, m, dm, callback, epochs=2, **trainer_kw):
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=3,
                        limit_val_batches=1, reload_dataloaders_every_n_epochs=1,
                        default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback], **trainer_kw)
    trainer.fit(m, datamodule=dm)
    return trainer


def test_epoch_counts_follow_the_paper_scaling():
    dm = datamodule(mix_dp=0.2, mix_pp=0.1, mix_pr=0.3)
    n_off = len(dm.train_pairs)
    c = dm.epoch_counts()
    assert c["offline"] == n_off and c["total"] == round(n_off / 0.6)
    assert c["pp"] == round(0.1 * c["total"]) and c["pp"] + c["pr"] + n_off == c["total"]
    assert c["dp"] == round(0.2 * c["total"])
    only = datamodule(mix_pr=1.0, online_pairs=50).epoch_counts()
    assert only == {"total": 50, "offline": 0, "dp": 0, "dpo": 0, "pp": 0, "pr": 50}


@pytest.mark.parametrize("kw,match", [({"mix_dp": 0.5, "mix_pr": 0.6}, "<= 1"),
                                      ({"mix_pr": 1.0}, "online_pairs"),
                                      ({"mix_pp": -0.1}, "mix_pp")])
def test_mixture_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        PreferenceDataModule(**kw)


def test_rounds_are_built_persisted_restored_and_trained_on(tmp_path):
    dm = datamodule(mix_pr=0.3, mix_pp=0.2)
    m = module(coef_pr=0.3, coef_pp=0.2, baseline="mean")
    cb = PairGenerationCallback(sampling=SAMPLING, progress=False)
    trainer = fit(tmp_path, m, dm, cb)
    # Round 0 at fit start, round 1 after epoch 0; none after the last epoch.
    assert [r["round"] for r in dm.rounds] == [0, 1]
    need = dm.online_needed()
    for r in dm.rounds:
        lines = [json.loads(x) for x in open(r["path"])]
        assert len(lines) == r["pairs"] == need["pp"] + need["pr"]
        assert {x["route"] for x in lines} == {"pp", "pr"}
        assert all(x["ref_chosen"] is not None and x["round"] == r["round"] for x in lines)
        assert [x["prompt_index"] for x in lines] == list(range(len(lines)))
    # The latest round is what the pool holds, and what the state dict points to.
    state = dm.state_dict()
    assert state["rounds"] == dm.rounds
    fresh = datamodule(mix_pr=0.3, mix_pp=0.2)
    fresh.load_state_dict(state)
    assert [p.pair for p in fresh.round_pairs] == [p.pair for p in dm.round_pairs]
    routes = torch.cat([b["route"] for b in fresh.train_dataloader()])
    assert int((routes == Route.PR).sum()) == need["pr"]
    assert int((routes == Route.PP).sum()) == need["pp"]
    # Logged per round.
    import csv

    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        keys = set(next(csv.reader(f)))
    for key in ("gen/round", "gen/prompts", "gen/mean_length", "gen/eos_rate", "gen/seconds",
                "gen/tokens_per_second", "gen/reward_mean", "gen/label_agreement"):
        assert key in keys, key


def test_lost_round_file_is_a_clear_error(tmp_path):
    dm = datamodule(mix_pr=0.3)
    fit(tmp_path, module(), dm, PairGenerationCallback(sampling=SAMPLING, progress=False), 1)
    state = dm.state_dict()
    import os

    os.remove(state["rounds"][-1]["path"])
    with pytest.raises(FileNotFoundError, match="round_0000"):
        datamodule(mix_pr=0.3).load_state_dict(state)


def test_callback_requires_reloading_dataloaders(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, reload_dataloaders_every_n_epochs=0,
                        callbacks=[PairGenerationCallback(sampling=SAMPLING)], logger=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer.fit(module(), datamodule=datamodule(mix_pr=0.3))


def test_pp_labels_are_the_policys_own_bradley_terry_draws():
    m = module(beta=1.0)
    dm = datamodule()
    prompts = [p.prompt_ids for p in dm.train_pairs[:40]]
    samples = [[p.chosen_ids, p.rejected_ids] for p in dm.train_pairs[:40]]
    label = lambda seed, bs: PolicyLabeller(m, seed=seed, batch_size=bs).label_ids(  # noqa: E731
        prompts, [s[0] for s in samples], [s[1] for s in samples]).a_preferred
    labels = label(5, 16)
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in dm.train_pairs[:40]]
    pol, ref = m.pair_logprobs(pairs)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    expected = torch.bernoulli(torch.sigmoid(1.0 * h.double()),
                               generator=torch.Generator().manual_seed(5)).bool()
    assert torch.equal(labels, expected)
    assert torch.equal(labels, label(5, 7))
    # The same labeller on text: tokenized like the DataModule, same draws.
    records = [dm.train_records[i] for i in range(40)]
    text = PolicyLabeller(m, dm.tokenizer, seed=5).label(
        [r.prompt for r in records], [r.chosen for r in records], [r.rejected for r in records])
    assert torch.equal(text.a_preferred, labels)


def test_cached_reference_logps_equal_the_reference_forward():
    m = module()
    dm = datamodule()
    with torch.no_grad():  # move the policy away from the reference
        for p in m.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pairs = dm.train_pairs[:12]
    _, ref = m.pair_logprobs(pairs, policy=False, batch_size=5)
    batch = PreferenceCollator(0)([p.example(0) for p in pairs])
    direct, _ = m.reference_logprobs(batch)
    torch.testing.assert_close(ref.T.reshape(-1), direct, atol=1e-5, rtol=1e-5)
    cached = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, float(r[0]), float(r[1]))
              for p, r in zip(pairs, ref, strict=True)]
    with_cache = PreferenceCollator(0)([p.example(0) for p in cached])
    assert "ref_logps" in with_cache and "ref_logps" not in batch
    torch.testing.assert_close(m._logprobs(with_cache)[2], m._logprobs(batch)[2], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_update_reference_copies_the_policy(lora, tiny_model_dir):
    kw = {"lora": LoraOptions(r=4, alpha=8, dropout=0.0)} if lora else {}
    m = SAILModule(model_name_or_path=str(tiny_model_dir), **kw)
    m.configure_model()
    with torch.no_grad():
        for p in m.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert_reference_becomes_the_policy(m, datamodule().train_pairs[:6])
    trainable = [n for n, p in m.policy.named_parameters() if p.requires_grad]
    if lora:  # a second, frozen adapter; the policy's own adapter is still the trained one
        assert trainable and all(".default." in n for n in trainable)
        assert any(".reference." in n for n, _ in m.policy.named_parameters())
    else:
        assert not any(p.requires_grad for p in m.reference.parameters())


def test_bonus_term_is_added_to_the_loss(tmp_path):
    m = module(bonus_alpha=0.5, bonus_form="selm")
    pairs = datamodule().train_pairs[:4]
    bonus = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, bonus_ids=p.chosen_ids)
             for p in pairs]
    batch = PreferenceCollator(0)([b.example(int(Route.PR)) for b in bonus])
    assert batch["input_ids"].shape[0] == 12 and batch["bonus_mask"].all()
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    m.trainer = trainer
    lp, ref = m._forward(batch)
    expected = 0.5 * 0.1 * (lp[8:] - ref[8:]).mean()
    m.log = lambda *a, **k: None
    m.log_dict = lambda *a, **k: None
    with_bonus = m.training_step(batch, 0)
    m.hparams.bonus_alpha = 0.0
    without = m.training_step(batch, 0)
    torch.testing.assert_close(with_bonus - without, expected)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    m = module()
    batch = PreferenceCollator(0)([p.example(0) for p in datamodule().train_pairs[:2]])
    batch["ref_logps"] = torch.full((4,), float("nan"))
    m.trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="released_code"):
        m.training_step(batch, 0)


@pytest.mark.parametrize("pair_mode", ["two_samples", "best_worst", "selm", "xpo"])
def test_round_decodes_each_sample_once_and_records_its_pair_texts(pair_mode, monkeypatch):
    import sail_lightning.rounds as rounds
    from sail_lightning.labellers import OracleLabeller

    decoded = []

    def counting_decode(tok, ids):
        decoded.append(list(ids))
        return tok.decode(ids, skip_special_tokens=True)

    monkeypatch.setattr(rounds, "decode", counting_decode)
    m, dm, n = module(), datamodule(), 6
    sampling = SamplingOptions(num_samples=3 if pair_mode == "best_worst" else 2,
                               max_new_tokens=6, batch_size=32)
    routes = [int(Route.PP)] * 2 + [int(Route.PR)] * (n - 2)
    out, stats = rounds.build_round(
        m, dm, OracleLabeller(seed=0), sampling, pair_mode=pair_mode, round_index=0,
        prompt_indices=list(range(n)), routes=routes if pair_mode == "two_samples" else
        [int(Route.PR)] * n, prompt_positions=list(range(n)), seed=3, progress=False)
    tok = dm.tokenizer
    for p in out:  # the texts are those of the pair's token ids, as when decoded again
        assert p.chosen == tok.decode(p.pair.chosen_ids, skip_special_tokens=True)
        assert p.rejected == tok.decode(p.pair.rejected_ids, skip_special_tokens=True)
    # Each sample decoded once; selm also decodes the dataset responses it picks (index >= 1).
    picked = 0
    if pair_mode == "selm":
        picked = sum(int(x.split("=")[1]) >= 1 for p in out for x in p.label.split(","))
        assert picked < 2 * n  # some picks are the sample: the old code decoded 3 per prompt
    assert len(decoded) == stats["generated"] + picked


def test_restore_after_setup_generates_round_zero_once_and_not_on_resume(tmp_path):
    # FSDP / FSDP2 restore checkpoints after on_fit_start, where trainer.ckpt_path is still
    # unset: round 0 must wait for the first train_dataloader() and be skipped on a resume,
    # or a resume regenerates (and rewrites) it with the un-restored weights.
    from tests.helpers import RestoreAfterSetup

    def run(epochs, ckpt_path=None):
        calls = []
        cb = PairGenerationCallback(sampling=SAMPLING, progress=False)
        real = cb._round
        cb._round = lambda trainer, pl_module, index: calls.append(index) or real(
            trainer, pl_module, index)
        dm = datamodule(mix_pr=0.3, pool_dir=str(tmp_path / "pool"))
        trainer = L.Trainer(accelerator="cpu", strategy=RestoreAfterSetup(), max_epochs=epochs,
                            limit_train_batches=3, limit_val_batches=0,
                            reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[cb])
        trainer.fit(module(coef_pr=0.3), datamodule=dm, ckpt_path=ckpt_path)
        return trainer, dm, calls

    trainer, dm, calls = run(2)
    assert calls == [0, 1] and [r["round"] for r in dm.rounds] == [0, 1]
    ckpt = tmp_path / "after_two_epochs.ckpt"
    trainer.save_checkpoint(ckpt)
    files = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in dm.rounds}
    _, resumed, calls = run(3, ckpt_path=ckpt)
    assert calls == []  # nothing generated: epoch 2 trains on the restored round 1
    assert resumed.rounds == dm.rounds
    assert {path: os.stat(path).st_mtime_ns for path in files} == files  # none rewritten
