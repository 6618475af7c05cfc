"""PairGenerationCallback: when rounds are built, what they hold, and what a fit trains on."""

import csv
import json
import os

import lightning as L
import pytest
import torch

import sail_lightning.callbacks as callbacks
from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.common import Route
from sail_lightning.generation import SamplingOptions
from tests.helpers import RestoreAfterSetup, datamodule, module

SAMPLING = SamplingOptions(num_samples=2, max_new_tokens=6, batch_size=32)


def online_data(**kw):
    return datamodule(setup=False, **{"num_synthetic_pairs": 120, "val_fraction": 0.1, **kw})


def fit(tmp_path, m, dm, callback, epochs=2, **trainer_kw):
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=3,
                        limit_val_batches=1, reload_dataloaders_every_n_epochs=1,
                        default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback], **trainer_kw)
    trainer.fit(m, datamodule=dm)
    return trainer


def test_rounds_are_built_persisted_restored_and_trained_on(tmp_path):
    dm = online_data(mix_pr=0.3, mix_pp=0.2)
    m = module(configure=False, coef_pr=0.3, coef_pp=0.2, baseline="mean")
    trainer = fit(tmp_path, m, dm, PairGenerationCallback(sampling=SAMPLING, progress=False))
    # Round 0 at fit start, round 1 after epoch 0; none after the last epoch.
    assert [r["round"] for r in dm.pool.rounds] == [0, 1]
    counts = dm.epoch_counts()
    for r in dm.pool.rounds:
        assert os.path.dirname(r["path"]) == os.path.join(trainer.log_dir, "rounds")
        lines = [json.loads(x) for x in open(r["path"])]
        assert len(lines) == r["pairs"] == counts.pp + counts.pr
        assert {x["route"] for x in lines} == {"pp", "pr"}
        assert all(x["ref_chosen"] is not None and x["round"] == r["round"] for x in lines)
        assert [x["prompt_index"] for x in lines] == list(range(len(lines)))
    # The latest round is what the pool holds, and what the state dict points to.
    state = dm.state_dict()
    assert state["rounds"] == dm.pool.rounds
    fresh = online_data(mix_pr=0.3, mix_pp=0.2)
    fresh.setup("fit")
    fresh.load_state_dict(state)
    assert [p.pair for p in fresh.pool.pairs] == [p.pair for p in dm.pool.pairs]
    routes = torch.cat([b["route"] for b in fresh.train_dataloader()])
    assert int((routes == Route.PR).sum()) == counts.pr
    assert int((routes == Route.PP).sum()) == counts.pp
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        keys = set(next(csv.reader(f)))
    for key in ("gen/round", "gen/prompts", "gen/mean_length", "gen/eos_rate",
                "gen/tokens_per_second", "gen/reward_mean", "gen/label_agreement",
                "gen/true_reward_mean", "gen/generation_seconds", "gen/labelling_seconds",
                "gen/reference_seconds", "gen/write_seconds", "gen/round_seconds"):
        assert key in keys, key
    assert "gen/seconds" not in keys and "gen/label_seconds" not in keys  # one name each


def test_the_data_oracle_labels_and_scores_rounds_unless_the_callback_names_a_labeller(tmp_path):
    from sail_lightning.labellers import CallableLabeller

    dm = online_data(mix_pr=0.5)
    # A labeller of its own: longer responses win, whatever the oracle says.
    cb = PairGenerationCallback(sampling=SAMPLING, progress=False,
                                labeller=CallableLabeller(lambda p, r: [len(x) for x in r]))
    fit(tmp_path, module(configure=False), dm, cb, epochs=1)
    assert all(len(p.chosen) >= len(p.rejected) for p in dm.pool.pairs)
    assert cb.labeller_for(dm) is cb.labeller
    assert PairGenerationCallback().labeller_for(dm) is dm.oracle


def test_callback_requires_reloading_dataloaders(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, reload_dataloaders_every_n_epochs=0,
                        callbacks=[PairGenerationCallback(sampling=SAMPLING)], logger=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        trainer.fit(module(configure=False), datamodule=online_data(mix_pr=0.3))


def test_restore_after_setup_generates_round_zero_once_and_not_on_resume(tmp_path, monkeypatch):
    # FSDP / FSDP2 restore checkpoints after on_fit_start, where trainer.ckpt_path is still
    # unset: round 0 must wait for the first train_dataloader() and be skipped on a resume,
    # or a resume regenerates (and rewrites) it with the un-restored weights.
    calls = []
    real = callbacks.build_round
    monkeypatch.setattr(callbacks, "build_round",
                        lambda *a, **k: calls.append(k["round_index"]) or real(*a, **k))

    def run(epochs, ckpt_path=None):
        calls.clear()
        cb = PairGenerationCallback(sampling=SAMPLING, progress=False)
        dm = online_data(mix_pr=0.3, pool_dir=str(tmp_path / "pool"))
        trainer = L.Trainer(accelerator="cpu", strategy=RestoreAfterSetup(), max_epochs=epochs,
                            limit_train_batches=3, limit_val_batches=0,
                            reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[cb])
        trainer.fit(module(configure=False, coef_pr=0.3), datamodule=dm, ckpt_path=ckpt_path)
        return trainer, dm, list(calls)

    trainer, dm, calls_run = run(2)
    assert calls_run == [0, 1] and [r["round"] for r in dm.pool.rounds] == [0, 1]
    ckpt = tmp_path / "after_two_epochs.ckpt"
    trainer.save_checkpoint(ckpt)
    files = {r["path"]: os.stat(r["path"]).st_mtime_ns for r in dm.pool.rounds}
    _, resumed, calls_run = run(3, ckpt_path=ckpt)
    # Round 0 is not generated again; the run extended to 3 epochs builds epoch 2's round
    # (before, epoch 2 silently trained on round 1 again).
    assert calls_run == [2]
    assert resumed.pool.rounds[:2] == dm.pool.rounds
    assert [r["round"] for r in resumed.pool.rounds] == [0, 1, 2]
    assert {path: os.stat(path).st_mtime_ns for path in files} == files  # none rewritten
