"""The CLI end to end on CPU, as a user runs it."""

import csv
import subprocess
import sys

import pytest
import yaml

from sail_lightning.cli import main
from tests.conftest import CONFIGS, REPO

QUICK = str(CONFIGS / "quickstart.yaml")


def out_args(tmp_path):
    return [f"--trainer.default_root_dir={tmp_path}"]


def small(tmp_path, epochs=2):
    return out_args(tmp_path) + [
        f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        "--data.num_synthetic_pairs=200",
    ]


def metrics(tmp_path):
    (path,) = tmp_path.glob("*/version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


def column(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


def test_quickstart_as_written_learns(tmp_path):
    main(["fit", "--config", QUICK, *out_args(tmp_path), "--trainer.enable_progress_bar=false"])
    rows = metrics(tmp_path)
    acc = column(rows, "val/rewards/accuracies")
    assert len(acc) == 3 and acc[-1] > 0.5
    assert column(rows, "data/train_pairs") == [3600.0]
    # Filed under the method's name, checkpoints and rounds beside the logs.
    run = tmp_path / "sail_pr" / "version_0"
    assert (run / "metrics.csv").exists() and list((run / "checkpoints").glob("*.ckpt"))
    assert sorted(p.name for p in (run / "rounds").iterdir()) == [
        "round_0000.jsonl", "round_0001.jsonl", "round_0002.jsonl"]


def print_config(capsys, args):
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_stacked_pieces_equal_the_quickstart(capsys):
    pieces = [f"-c={CONFIGS / p}" for p in ("trainer/cpu.yaml", "model/tiny.yaml",
                                            "data/synthetic.yaml", "method/sail_pr.yaml")]
    assert print_config(capsys, pieces) == print_config(capsys, ["-c", QUICK])


# Methods that run on the synthetic task (the *_rm ones need a reward model from the hub).
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml") if not p.stem.endswith("_rm"))
OFFLINE = {"dpo", "ipo", "sail_dp", "sft"}


def test_every_method_of_the_issue_has_a_config():
    assert set(METHODS) >= OFFLINE | {"online_dpo", "iterative_dpo", "sail_pp", "sail_pr",
                                      "selm", "xpo"}


@pytest.mark.parametrize("method", METHODS)
def test_method_configs_run_stacked_on_the_quickstart(tmp_path, method):
    args = ["fit", "-c", QUICK, "-c", str(CONFIGS / "method" / f"{method}.yaml"),
            *small(tmp_path)]
    only_online = yaml.safe_load((CONFIGS / "method" / f"{method}.yaml").read_text())["data"]
    if only_online.get("online_pairs"):
        args.append("--data.online_pairs=64")  # keep the test small
    main(args)
    rows = metrics(tmp_path)
    # SFT has no reference, hence no implicit rewards: its validation is the NLL.
    assert column(rows, "val/loss" if method == "sft" else "val/rewards/accuracies")
    rounds = column(rows, "gen/round")
    assert rounds == ([] if method in OFFLINE else [0.0, 1.0])
    if method not in OFFLINE:
        assert len(list(tmp_path.rglob("rounds/round_*.jsonl"))) == 2
    dp = column(rows, "train/routes/dp_fraction")
    assert (len(dp) > 0) == (method == "sail_dp")
    if method == "sail_dp":
        # The module wires coef_dp and the routes into the loss: the label term is live.
        assert all(v < 0 for v in column(rows, "train/loss/label_term"))
        assert column(rows, "train/dp/flip_rate")


ALL_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_every_config_has_a_header_naming_its_command(path):
    first = (CONFIGS / path).read_text().splitlines()[0]
    assert first.startswith("# sail-lightning ")


def test_same_seed_same_run(tmp_path):
    runs = []
    for name in ("a", "b"):
        main(["fit", "-c", QUICK, *small(tmp_path / name, epochs=1)])
        runs.append(column(metrics(tmp_path / name), "train/loss"))
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_resume_from_checkpoint_continues(tmp_path):
    main(["fit", "-c", QUICK, *small(tmp_path / "first", epochs=1)])
    (ckpt,) = (tmp_path / "first").rglob("*.ckpt")
    main(["fit", "-c", QUICK, *small(tmp_path / "resumed", epochs=2), f"--ckpt_path={ckpt}"])
    rows = metrics(tmp_path / "resumed")
    assert {int(r["epoch"]) for r in rows if r.get("train/loss")} == {1}


def test_bad_data_option_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source"):
        main(["fit", "-c", QUICK, *small(tmp_path), "--data.source=./nowhere.jsonl"])


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "sail_lightning", "fit", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model.coef_dp" in out.stdout and "--data.mix_dp" in out.stdout


def test_top_level_help_says_what_the_tool_is_and_offers_what_works():
    out = subprocess.run([sys.executable, "-m", "sail_lightning", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    # Every command in the usage line, as `sail-lightning` (not __main__.py).
    # (argparse wraps the usage line at the terminal's width)
    assert " ".join(out.stdout.split()).startswith(
        "usage: sail-lightning [-c CONFIG] {fit,validate,serve-reward,serve-judge,build-models}")
    for text in ("SAIL and the online DPO family", "Host a reward model over HTTP",
                 "chat completions on the OpenAI protocol",
                 "Train BPE tokenizers",
                 "--trainer.callbacks.help sail_lightning.callbacks.PairGenerationCallback"):
        assert text in out.stdout, text
    for gone in ("test", "predict"):  # no test_step / forward: refused, not offered
        with pytest.raises(SystemExit):
            main([gone, "-c", QUICK])


def test_callback_options_are_reachable_from_fit_help():
    out = subprocess.run([sys.executable, "-m", "sail_lightning", "fit", "--trainer.callbacks.help",
                          "sail_lightning.callbacks.PairGenerationCallback"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--trainer.callbacks.pair_mode" in out.stdout


@pytest.mark.parametrize("method,folder", [("dpo", "dpo"), ("sail_dp", "sail_dp")])
def test_runs_are_filed_under_default_root_dir_and_the_method(tmp_path, method, folder):
    main(["fit", "-c", QUICK, "-c", str(CONFIGS / "method" / f"{method}.yaml"),
          *small(tmp_path / "root", epochs=1)])
    assert (tmp_path / "root" / folder / "version_0" / "metrics.csv").exists()
    # A logger the config names is kept as it is.
    main(["fit", "-c", QUICK, "-c", str(CONFIGS / "method" / f"{method}.yaml"),
          *small(tmp_path / "root", epochs=1),
          "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.name=mine",
          f"--trainer.logger.save_dir={tmp_path / 'elsewhere'}"])
    assert (tmp_path / "elsewhere" / "mine" / "version_0" / "metrics.csv").exists()

