"""A run's folder across a resume (the CLI's default logger), and none left by a run that
failed while starting."""

import csv

import pytest

from sail_lightning.cli import main
from tests.test_cli import QUICK, small

CHECKPOINTS = ["--trainer.callbacks+=ModelCheckpoint",
               "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_last=true"]


def rows(path):
    """metrics.csv's rows without the timings (they differ between runs), order-free."""
    with open(path, newline="") as f:
        return sorted(tuple(sorted((k, v) for k, v in r.items() if v and "second" not in k))
                      for r in csv.DictReader(f))


def test_a_resumed_run_continues_its_own_folder(tmp_path):
    """Killed after step 7 (checkpoint at 6), resumed from last.ckpt: one version folder whose
    metrics.csv equals an uninterrupted run's, its rounds and checkpoints beside."""
    main(["fit", "-c", QUICK, *small(tmp_path / "full", epochs=3), *CHECKPOINTS])
    args = ["fit", "-c", QUICK, *small(tmp_path / "run", epochs=3), *CHECKPOINTS]
    with pytest.raises(RuntimeError, match="killed after step 7"):
        main([*args, "--trainer.callbacks+=tests.helpers.RaiseAt", "--trainer.callbacks.step=7"])
    run = tmp_path / "run" / "sail_pr" / "version_0"
    main([*args, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert [p.name for p in (tmp_path / "run" / "sail_pr").iterdir()] == ["version_0"]
    assert rows(run / "metrics.csv") == rows(tmp_path / "full/sail_pr/version_0/metrics.csv")
    assert sorted(p.name for p in (run / "rounds").iterdir()) == [
        "round_0000.jsonl", "round_0001.jsonl", "round_0002.jsonl"]
    assert (run / "checkpoints" / "epoch=2-step=12.ckpt").exists()


def test_a_run_that_fails_while_starting_leaves_no_version_folder(tmp_path):
    with pytest.raises(ValueError, match="model.tokenizer 'synthetic' has 17 tokens"):
        main(["fit", "-c", QUICK, *small(tmp_path), "--model.model_config.vocab_size=12"])
    assert not list(tmp_path.glob("sail_pr/version_*"))
    main(["fit", "-c", QUICK, *small(tmp_path, epochs=1)])  # the next run is version_0
    assert [p.name for p in (tmp_path / "sail_pr").iterdir()] == ["version_0"]


def test_remove_if_unused_keeps_a_folder_with_results(tmp_path):
    from sail_lightning.run_folder import remove_if_unused

    started = tmp_path / "version_0"
    (started / "checkpoints").mkdir(parents=True)
    (started / "config.yaml").write_text("x")
    done = tmp_path / "version_1"
    done.mkdir()
    (done / "config.yaml").write_text("x")
    (done / "metrics.csv").write_text("step\n0\n")
    assert remove_if_unused(str(started)) and not started.exists()
    assert not remove_if_unused(str(done)) and (done / "metrics.csv").exists()
    assert not remove_if_unused(str(tmp_path))  # not a version folder


def test_validating_a_checkpoint_leaves_the_training_run_as_it_is(tmp_path):
    main(["fit", "-c", QUICK, *small(tmp_path, epochs=2)])
    run = tmp_path / "sail_pr" / "version_0"
    before = (run / "metrics.csv").read_text()
    (first,) = (run / "checkpoints").glob("*.ckpt")  # the last epoch's, as Lightning keeps
    main(["validate", "-c", QUICK, *small(tmp_path, epochs=2), f"--ckpt_path={first}"])
    assert (run / "metrics.csv").read_text() == before
    assert (tmp_path / "sail_pr" / "version_1").exists()  # the validation's own folder
