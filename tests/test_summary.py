"""Results on the console: ConsoleSummary's line per epoch and closing line, on by default
through the CLI."""

import re

from sail_lightning.cli import main
from tests.test_cli import QUICK, small


def test_fit_prints_a_line_per_epoch_and_where_the_logs_are(tmp_path, capsys):
    main(["fit", "-c", QUICK, *small(tmp_path, epochs=2)])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"epoch \d/2  ", line)]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    for line in lines:  # the headline metrics, names whole, and the round they are of
        for name in ("train/loss", "val/loss", "val/rewards/accuracies", "(round 1)",
                     "gen/reward_mean", "gen/true_reward_mean", "val/eval_reward"):
            assert name in line, (name, line)
    done = out[out.index("fit done after 2 epochs"):]
    assert "val/rewards/accuracies" in done.splitlines()[0]
    run = tmp_path / "sail_pr" / "version_0"
    assert f"logs: {run} (metrics.csv)" in done
    assert f"checkpoint: {run / 'checkpoints'}" in done


def test_summary_can_be_turned_off(tmp_path, capsys):
    main(["fit", "-c", QUICK, *small(tmp_path, epochs=1), "--summary.enabled=false"])
    out = capsys.readouterr().out
    assert "epoch 1/1" not in out and "fit done" not in out


def test_a_line_shows_only_the_metrics_a_run_has():
    from types import SimpleNamespace

    import torch

    from sail_lightning.summary import ConsoleSummary

    trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(1.5), "other": 2.0},
                              callbacks=[SimpleNamespace(last_round_metrics={})])
    assert ConsoleSummary().line(trainer) == "val/loss 1.5000"
    assert ConsoleSummary(metrics=["other"]).line(trainer) == "other 2.0000"


def test_the_progress_bar_shows_only_short_names(tmp_path):
    """Names on the bar fit an 80-column terminal whole (rich cuts a longer one: "train/rewards/
    ac..."); the long ones are in the summary line."""
    import lightning as L

    from sail_lightning.summary import ConsoleSummary
    from tests.helpers import datamodule, module

    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        log_every_n_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[ConsoleSummary(enabled=False)])
    trainer.fit(module(), datamodule=datamodule(num_synthetic_pairs=40, setup=False))
    shown = set(trainer.progress_bar_metrics)
    assert {"train/loss", "val/loss"} <= shown
    assert all(len(name) <= 12 for name in shown), shown
