"""A user's own model through the CLI: by path, with its tokenizer by path, and every
real-model config pointed at a small local model (save_pretrained to a temporary folder)."""

import pytest
import yaml

from sail_lightning.cli import main
from tests.conftest import CONFIGS, save_tiny_llama
from tests.test_cli import QUICK, column, metrics, small


def fit_own(tmp_path, *args):
    main(["fit", "-c", QUICK, "--model.model_config=null", *args, *small(tmp_path, epochs=1),
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])
    return metrics(tmp_path)


def test_fit_with_a_model_by_path_and_its_own_tokenizer(tmp_path, tiny_model_dir):
    # tokenizer null: the model folder's own tokenizer, for the module and the data alike.
    rows = fit_own(tmp_path / "run", f"--model.model_name_or_path={tiny_model_dir}",
                   "--model.tokenizer=null")
    assert column(rows, "val/rewards/accuracies")
    hparams = yaml.safe_load(next((tmp_path / "run").glob("*/version_*/hparams.yaml"))
                             .read_text())
    assert hparams["tokenizer"] == str(tiny_model_dir)


def test_fit_with_a_tokenizer_by_path(tmp_path, tiny_model_dir, synthetic_tokenizer):
    tok_dir = tmp_path / "tokenizer"
    synthetic_tokenizer.save_pretrained(tok_dir)
    rows = fit_own(tmp_path / "run", f"--model.model_name_or_path={tiny_model_dir}",
                   f"--model.tokenizer={tok_dir}")
    assert column(rows, "val/rewards/accuracies")


REAL_MODEL_CONFIGS = sorted(p.name for p in (CONFIGS / "model").glob("*.yaml")
                            if yaml.safe_load(p.read_text())["model"].get("model_name_or_path"))


def test_every_real_model_config_is_covered():
    assert {"qwen2.5-0.5b.yaml", "llama-3-8b.yaml", "llama-3-8b-qlora.yaml"} <= set(
        REAL_MODEL_CONFIGS)


@pytest.mark.parametrize("config", REAL_MODEL_CONFIGS)
def test_real_model_configs_fit_a_small_local_model(tmp_path, synthetic_tokenizer, config):
    cfg = yaml.safe_load((CONFIGS / "model" / config).read_text())
    model_type = "qwen2" if "qwen" in config else "llama"
    model_dir = save_tiny_llama(tmp_path / "model", synthetic_tokenizer, hidden_size=32, seed=0,
                                model_type=model_type)
    args = ["-c", str(CONFIGS / "model" / config), f"--model.model_name_or_path={model_dir}",
            "--trainer.accelerator=cpu", "--trainer.devices=1"]
    if cfg["model"].get("logprob_chunk_size"):
        args.append("--model.logprob_chunk_size=8")  # chunks smaller than a response
    main(["fit", "-c", QUICK, *args, *small(tmp_path / "run", epochs=1),
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.accumulate_grad_batches=1"])
    rows = metrics(tmp_path / "run")
    assert column(rows, "val/rewards/accuracies")
    assert column(rows, "gen/round")  # the online loop ran with the model's own tokenizer


def test_own_data_with_a_tokenizer_that_does_not_cover_it_is_warned_and_logged(tmp_path,
                                                                              caplog):
    # The quickstart's word-level tokenizer on English: every word is <unk>. The run goes
    # on (a user may mean it) but says so, naming the tokenizer and the source, and logs the
    # rate where dashboards show it.
    import logging

    from sail_lightning.data import samples

    source = samples.path("hh-rlhf")
    args = ["fit", "-c", QUICK, "-c", str(CONFIGS / "method" / "dpo.yaml"),
            *small(tmp_path, epochs=1), f"--data.source={source}", "--data.format=hh"]
    # The quickstart's oracle is the synthetic task's truth: named, before any model is built.
    with pytest.raises(ValueError, match=r"data\.oracle \(OracleLabeller\) cannot score"):
        main(args)
    with caplog.at_level(logging.WARNING, logger="sail_lightning.data"):
        main([*args, "--data.oracle=null"])
    warning = next(r.getMessage() for r in caplog.records if "unknown token" in r.getMessage())
    assert "'synthetic'" in warning and source in warning
    assert column(metrics(tmp_path), "data/unk_rate")[0] > 0.5


def test_a_model_by_path_takes_its_own_tokenizer_over_the_quickstarts(tmp_path,
                                                                       synthetic_tokenizer):
    """The quickstart's `tokenizer: synthetic` left set: the model folder's own tokenizer (a
    larger vocabulary here) is used by the module and the data alike, and a warning says so."""
    import copy

    tok = copy.deepcopy(synthetic_tokenizer)
    tok.add_tokens([f"<extra{i}>" for i in range(8)])
    model_dir = save_tiny_llama(tmp_path / "model", tok, hidden_size=32, seed=0)
    with pytest.warns(UserWarning, match=r"model.tokenizer: 'synthetic' .* replaced by the "
                                         r"tokenizer of model.model_name_or_path="):
        rows = fit_own(tmp_path / "run", f"--model.model_name_or_path={model_dir}")
    assert column(rows, "val/rewards/accuracies")
    (hparams,) = (tmp_path / "run").glob("*/version_*/hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["tokenizer"] == str(model_dir)


def test_a_tokenizer_larger_than_the_models_vocabulary_fails_naming_both(tmp_path,
                                                                          synthetic_tokenizer):
    model_dir = save_tiny_llama(tmp_path / "model", synthetic_tokenizer, hidden_size=32, seed=0,
                                vocab_size=12)
    with pytest.raises(ValueError, match=r"model.tokenizer 'synthetic' has 17 tokens but the "
                                         rf"model {model_dir} embeds only 12"):
        fit_own(tmp_path / "run", f"--model.model_name_or_path={model_dir}",
                "--model.tokenizer=synthetic")
