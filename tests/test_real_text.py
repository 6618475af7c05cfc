"""The real-text example (docs/real_text.md, the README's "Real text on CPU"): build the
models, SFT, SAIL-PR with the reward model labelling, evaluation. The default suite runs the
documented commands on a small budget; the slow test runs them exactly as written."""

import shlex

import pytest

from benchmarks.real_text import MARKED, clone_like, column, documented_commands, metrics, run
from sail_lightning.cli import main
from tests.conftest import REPO

DOC = (REPO / "docs" / "real_text.md").read_text()


def documented() -> list[str]:
    return documented_commands(DOC)


def rows(folder, method: str) -> list[dict]:
    return metrics(folder, method)


def values(table: list[dict], key: str) -> list[float]:
    return column(table, key)


def test_the_doc_and_the_readme_show_the_same_commands():
    commands = documented()
    assert commands[0].startswith("sail-lightning build-models --output models/tiny")
    assert [c.split(" -c ")[-1] for c in commands[1:]] == ["configs/real_text/sft.yaml",
                                                         "configs/real_text/sail_pr.yaml"]
    readme = (REPO / "README.md").read_text()
    # A missing or unmarked section fails: it cannot turn into a skip.
    assert MARKED.findall(readme), "README.md lacks its marked real-text command block"
    assert MARKED.findall(readme) == MARKED.findall(DOC)


# The documented commands, a few batches long: fewer pairs, a smaller tokenizer and reward
# model, one epoch per stage (argparse and jsonargparse take the last value of an option).
BUILD_BUDGET = ["--limit", "60", "--vocab-size", "1024", "--reward-vocab-size", "768",
                "--reward-steps", "20", "--reward-max-length", "64"]
FIT_BUDGET = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
              "--trainer.limit_val_batches=1", "--data.limit=60"]


def test_the_documented_commands_on_a_small_budget(tmp_path, monkeypatch, capsys):
    clone_like(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command in documented():
        words = shlex.split(command)
        assert words[0] == "sail-lightning", command
        budget = BUILD_BUDGET if words[1] == "build-models" else FIT_BUDGET
        main([*words[1:], *budget])
    # Exported under the runs' folders: the built models (models/tiny) are left as built.
    assert (tmp_path / "runs/real_text/sft/policy/config.json").exists()
    assert (tmp_path / "runs/real_text/sail_pr/version_0/policy/config.json").exists()
    assert sorted(p.name for p in (tmp_path / "models/tiny").iterdir() if p.is_dir()) == [
        "policy", "reward"]
    sft, sail = rows(tmp_path, "sft"), rows(tmp_path, "sail_pr")
    assert values(sft, "val/loss") and values(sft, "val/eval_reward")
    # The reward model (its own tokenizer) labelled the round and judged the evaluation.
    assert values(sail, "gen/reward_mean") and values(sail, "val/eval_reward")
    assert values(sail, "val/win_rate_vs_ref") and values(sail, "val/kl")
    (round_file,) = tmp_path.glob("runs/real_text/sail_pr/version_0/rounds/round_0000.jsonl")
    assert round_file.read_text().count("\n") == values(sail, "gen/prompts")[0]
    # No progress bar in these configs: the summary's one line per epoch, for each stage.
    out = capsys.readouterr().out
    assert out.count("epoch 1/1  ") == 2 and "gen/reward_mean" in out


@pytest.mark.slow
def test_the_documented_commands_as_written(tmp_path):
    """From a folder laid out as a fresh clone, in a shell, exactly as documented
    (``benchmarks/real_text.py``, which measured the figures the doc quotes)."""
    results = run(tmp_path)
    val_loss = results["sft"]["val/loss"]
    assert val_loss[-1] < val_loss[0] - 0.2  # SFT learns the chosen responses
    rewards = results["sail_pr"]["gen/reward_mean"]
    assert len(rewards) == 3 and rewards[-1] > rewards[0]  # samples the reward model prefers
