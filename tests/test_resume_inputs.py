"""Bad input around a resume and a run's options: each fails naming the file, line or option,
before any model is built where the input allows (sail_lightning/resume.py and the checks
of the CLI, the module and the generation callback)."""

import lightning as L
import pytest
import torch

from sail_lightning.callbacks import PairGenerationCallback
from sail_lightning.cli import main
from sail_lightning.generation import SamplingOptions
from sail_lightning.module import SAILModule
from sail_lightning.resume import check_checkpoint_file
from tests.conftest import CONFIGS, TINY_CONFIG
from tests.helpers import datamodule, module

QUICK = str(CONFIGS / "quickstart.yaml")


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 1}, path)
    return path


def test_a_complete_checkpoint_and_lightning_aliases_pass(checkpoint):
    check_checkpoint_file(checkpoint)
    for alias in ("last", "best", None):
        check_checkpoint_file(alias)


def test_empty_cut_off_or_foreign_checkpoint_names_the_path(tmp_path, checkpoint):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"ckpt_path: the checkpoint file {empty} is empty"):
        check_checkpoint_file(empty)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{cut} .* not a complete checkpoint"):
        check_checkpoint_file(cut)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        check_checkpoint_file(text)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        check_checkpoint_file(tmp_path / "missing.ckpt")
    (tmp_path / "sharded").mkdir()
    with pytest.raises(ValueError, match="folder .* is empty"):
        check_checkpoint_file(tmp_path / "sharded")


def test_cli_refuses_an_empty_checkpoint_before_building_the_model(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(SAILModule, "configure_model", lambda self: built.append(1))
    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"--ckpt_path: the checkpoint file {empty} is empty"):
        main(["fit", "-c", QUICK, f"--trainer.default_root_dir={tmp_path}",
              f"--ckpt_path={empty}"])
    assert built == []


def test_abbreviated_option_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", QUICK, "--model.bet=0.5", "--print_config"])
    assert "unrecognized arguments: --model.bet=0.5" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [
    ("lr", -1.0), ("lr", 0.0), ("lr", float("nan")), ("beta", 0.0), ("beta", float("nan")),
    ("weight_decay", -0.1), ("label_smoothing", 0.5), ("bonus_alpha", -1e-3),
    ("logprob_chunk_size", -1)])
def test_numeric_module_option_named_before_any_model(option, value):
    with pytest.raises(ValueError, match=f"model.{option} must be"):
        SAILModule(model_config=TINY_CONFIG, tokenizer="synthetic", **{option: value})


def test_cli_names_a_negative_learning_rate(tmp_path):
    with pytest.raises(ValueError, match="model.lr must be > 0, got -1"):
        main(["fit", "-c", QUICK, f"--trainer.default_root_dir={tmp_path}", "--model.lr=-1"])


@pytest.mark.parametrize(("option", "value"), [("mix_pr", 1.2), ("mix_dp", -0.1)])
def test_mixture_weight_outside_unit_interval_is_named(option, value):
    with pytest.raises(ValueError, match=f"data.{option} must be in \\[0, 1\\]"):
        datamodule(setup=False, **{option: value})


def test_mixture_weights_summing_to_one_need_online_pairs():
    with pytest.raises(ValueError, match="data.mix_dp \\+ data.mix_pp \\+ data.mix_pr"):
        datamodule(setup=False, mix_dp=0.6, mix_pr=0.6)
    with pytest.raises(ValueError, match="data.online_pairs must be set"):
        datamodule(setup=False, mix_pr=1.0)


@pytest.mark.parametrize(("option", "value"), [("prompts_per_round", -1),
                                               ("score_batch_size", 0)])
def test_callback_numeric_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        PairGenerationCallback(**{option: value})


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


def test_unwritable_rounds_folder_fails_at_setup_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made inside a file (root ignores chmod)
    pool_dir = blocker / "rounds"
    steps = CountSteps()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path,
                        callbacks=[steps, PairGenerationCallback(
                            progress=False, sampling=SamplingOptions(max_new_tokens=4))])
    model = module(configure=False, coef_pr=0.3)
    with pytest.raises(PermissionError, match=f"data.pool_dir: cannot write round files to "
                                              f"{pool_dir}"):
        trainer.fit(model, datamodule=datamodule(setup=False, mix_pr=0.3,
                                                 pool_dir=str(pool_dir)))
    assert steps.steps == 0 and model.pair is None  # no model built, nothing trained
